"""Sliding-window attention in plain mode: bytes and time per decode token past the window.

    python bench/windows.py [--window 128] [--context 4] [--decode 32] [--layers 6]

A tiny Gemma 3-like model (Gemma 3's pattern: five sliding-window layers to one global, random weights,
written with transformers' Gemma3ForCausalLM) runs through the verified plain split on an in-process
server: a prefill of context x window tokens, then `decode` single-token steps. Printed per decode
token: the bytes of every request's and reply's tensors (what crosses the boundary) and the median wall
time. Run it on two checkouts (PYTHONPATH) to compare a server that scores every earlier key with one
that scores only the window's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from tempfile import TemporaryDirectory

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from tsqp.server.engine import Engine
from tsqp.tee.compose import tee_model
from tsqp.tee.remote import InProcess

PATTERN = 6  # Gemma 3: every sixth layer global


class Counting(InProcess):
    """InProcess that adds up the bytes of each call's tensors, both ways."""

    bytes = 0

    def __call__(self, method, args=None, tensors=(), session=None, reply_bytes=0):
        reply = super().__call__(method, args, tensors, session=session, reply_bytes=reply_bytes)
        self.bytes += sum(t.numel() * t.element_size() for t in (*tensors, *reply.tensors))
        return reply


def write_model(path: str, window: int, layers: int, context: int) -> None:
    config = Gemma3TextConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        query_pre_attn_scalar=64,
        sliding_window=window,
        layer_types=["full_attention" if (i + 1) % PATTERN == 0 else "sliding_attention" for i in range(layers)],
        max_position_embeddings=context,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--context", type=int, default=4, help="the prefill, in windows")
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    prompt = args.context * args.window
    with TemporaryDirectory() as folder:
        write_model(folder, args.window, args.layers, prompt + args.decode)
        link = Counting(Engine(folder))
        tee = tee_model(folder, link)
        tee.attach()
        tee.ops.open_session(prompt + args.decode)
        generator = torch.Generator().manual_seed(1)
        tee.forward(torch.randint(0, 1024, (prompt,), generator=generator))
        per_token, seconds = [], []
        for step in range(args.decode):
            before, start = link.bytes, time.perf_counter()
            tee.forward(torch.randint(0, 1024, (1,), generator=generator), pos=prompt + step)
            seconds.append(time.perf_counter() - start)
            per_token.append(link.bytes - before)
        tee.ops.close_session()
    print(
        f"window {args.window}, {args.layers} layers, decode at context {prompt}..{prompt + args.decode - 1}: "
        f"{statistics.mean(per_token) / 1024:.1f} KiB per decode token "
        f"(first {per_token[0]}, last {per_token[-1]} bytes), median {statistics.median(seconds) * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
