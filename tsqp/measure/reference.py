"""transformers' monolithic model on the same checkpoint: the baseline the split is measured against.

Each timing runs in a fresh subprocess (`python -m tsqp.measure.reference ...`) with the thread count of the
split run and OpenMP's default wait policy (TSQP sets a passive one for itself; a monolithic run is
better off spinning), so the baseline is what a user gets by running the model in one process.
transformers is an optional extra (`pip install tsqp[bench]`); the TEE runtime never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tsqp import env
from tsqp.errors import TsqpError
from tsqp.measure.prompts import token_ids


def time_reference(
    model_dir: Path,
    dtype: str,
    attn: str,
    tokens: int,
    warmup: int,
    seed: int,
    threads: int,
    decode: int = 0,
    device: str = "cpu",
) -> dict:
    """{"prefill_s": ...} (and decode figures when decode > 0) from a subprocess, the model on `device`."""
    child_env = dict(os.environ)
    if env.read("TSQP_USER_OMP_WAIT_POLICY") is None:
        child_env.pop("OMP_WAIT_POLICY", None)
    command = [
        sys.executable,
        "-m",
        "tsqp.measure.reference",
        str(model_dir),
        dtype,
        attn,
        str(tokens),
        str(warmup),
        str(seed),
        str(threads),
        str(decode),
        device,
    ]
    done = subprocess.run(command, env=child_env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise TsqpError(f"the transformers reference run failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(
    model_dir: str, dtype: str, attn: str, tokens: int, warmup: int, seed: int, threads: int, decode: int, device: str
) -> dict:
    import torch

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise TsqpError("the comparison needs transformers: pip install 'tsqp[bench]'") from None
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation=attn)
    model = model.eval().to(device)
    ids = token_ids(tokens, model.config.vocab_size, seed).to(device)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    result = {}
    with torch.inference_mode():
        model(ids[None, :warmup])
        sync()
        start = time.perf_counter()
        model(ids[None])
        sync()
        result["prefill_s"] = time.perf_counter() - start
        if decode:  # greedy, exactly `decode` tokens (min_new_tokens holds eos off), with transformers' KV cache
            clock = _TokenClock()
            start = time.perf_counter()
            out = model.generate(
                ids[None],
                attention_mask=torch.ones_like(ids)[None],
                do_sample=False,
                max_new_tokens=decode,
                min_new_tokens=decode,
                pad_token_id=0,
                streamer=clock,
            )
            sync()
            result["generate_s"] = time.perf_counter() - start
            result["generated"] = out.shape[1] - tokens
            result["generated_ids"] = out[0, tokens:].tolist()
            result["ttft_s"] = (clock.first or time.perf_counter()) - start
    return result


class _TokenClock:
    """A transformers streamer that notes when the first new token arrives (its first put is the prompt)."""

    def __init__(self):
        self.puts = 0
        self.first: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tsqp.measure.reference")
    for name in ("model_dir", "dtype", "attn"):
        parser.add_argument(name)
    for name in ("tokens", "warmup", "seed", "threads", "decode"):
        parser.add_argument(name, type=int)
    parser.add_argument("device")
    a = parser.parse_args()
    try:
        print(
            json.dumps(
                _measure(a.model_dir, a.dtype, a.attn, a.tokens, a.warmup, a.seed, a.threads, a.decode, a.device)
            )
        )
    except TsqpError as exc:
        print(f"tsqp: error: {exc}", file=sys.stderr)
        sys.exit(1)
