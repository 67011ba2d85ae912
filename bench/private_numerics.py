"""Private mode's numerics: how far masking moves the logits, by pad scale and by the products' dtype.

    python bench/private_numerics.py MODEL_DIR [--bits 16,20,24] [--float32-bits 4,8,12] [--new-tokens 16]

Each row runs the real private path (TEE, in-process server, Freivalds checks) with pads 2^k times
each linear's calibrated largest input, float64 products; the float32 rows simulate a server that
computes the masked products in float32 (the products run in the TEE, pads made in float32 too).
Against transformers' float32 logits on the same prompt: max abs difference, top-1 agreement over the
prompt's positions, and whether greedy text stays the same (the position it first differs at).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from transformers import AutoModelForCausalLM

from tsqp.model.checkpoint import Checkpoint
from tsqp.server.engine import Engine
from tsqp.tee.compose import attach, tee_model
from tsqp.tee.generate import generate
from tsqp.tee.linear import Local
from tsqp.tee.op_weights import load_weight
from tsqp.tee.pads import Pad
from tsqp.tee.private import PrivateOptions
from tsqp.tee.remote import InProcess
from tsqp.tee.tokenizer import TOKENIZER_FILE, TextTokenizer
from tsqp.wire.pad_seeds import expand, new_seed

PROMPT = "What is the capital of France?"


class LocalPads:
    """z W^T computed in the TEE in `dtype`: what a float32 server and a float32 pad source would give."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype):
        self.checkpoint, self.dtype = checkpoint, dtype

    def start(self, op, rows: int) -> Pad:
        weight, _ = load_weight(self.checkpoint, op, torch.float32, self.dtype)
        z = expand(new_seed(), rows, weight.shape[1]).to(self.dtype).to(torch.float64)
        return Pad(op, z, lambda: (z.to(self.dtype) @ weight.T).to(torch.float64))


def prompt_ids(model_dir: Path, vocab: int) -> list[int]:
    if (model_dir / TOKENIZER_FILE).is_file():
        return TextTokenizer(model_dir).chat_prompt_ids(PROMPT)
    return torch.randint(3, vocab, (32,), generator=torch.Generator().manual_seed(7)).tolist()


def run(model_dir: Path, bits: int, dtype: torch.dtype, ids: list[int], new_tokens: int, pads_dir: Path):
    engine = Engine(str(model_dir))
    tee = tee_model(model_dir, InProcess(engine), private=PrivateOptions(pads_dir=pads_dir, pad_bits=bits))
    attach(tee)
    if dtype == torch.float32:
        checkpoint = Checkpoint(model_dir)
        tee.ops.masked.inner = Local(checkpoint, dtype=torch.float32)
        tee.ops.masked.pads = LocalPads(checkpoint, torch.float32)
    prompt = torch.tensor(ids)
    tee.ops.open_session(len(ids))
    logits = tee.forward(prompt)
    tee.ops.close_session()
    text = generate(tee, ids, new_tokens).generated_ids
    tee.ops.close()
    return logits, text, tee.ops.leak_bound_bits()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--bits", default="16,20,24")
    parser.add_argument("--float32-bits", default="4,8,12")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json")
    a = parser.parse_args()
    reference = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="eager")
    ids = prompt_ids(a.model_dir, reference.config.vocab_size)
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0]
        greedy = reference.generate(torch.tensor([ids]), max_new_tokens=a.new_tokens, do_sample=False)[0, len(ids) :]
    greedy = greedy.tolist()
    rows = []
    print(f"{a.model_dir.name}: {len(ids)}-token prompt, logits reach {float(expected.abs().max()):.1f}")
    print("| products in | k | logits max abs diff | top-1 agreement | greedy text | leak bound, bits a coordinate |")
    print("|---|---|---|---|---|---|")
    plan = [(torch.float32, int(k)) for k in a.float32_bits.split(",") if k] + [
        (torch.float64, int(k)) for k in a.bits.split(",") if k
    ]
    with TemporaryDirectory() as pads_dir:
        for dtype, bits in plan:
            logits, text, leak = run(a.model_dir, bits, dtype, ids, a.new_tokens, Path(pads_dir))
            diff = float((logits - expected).abs().max())
            agree = float((logits.argmax(-1) == expected.argmax(-1)).float().mean())
            first = next((i for i, (x, y) in enumerate(zip(text, greedy, strict=False)) if x != y), None)
            same = "same" if first is None else f"differs at token {first}"
            name = str(dtype).removeprefix("torch.")
            tokens = min(len(text), len(greedy))
            print(f"| {name} | {bits} | {diff:.2e} | {agree:.3f} | {same} ({tokens} tokens) | {leak:.1e} |")
            rows.append(dict(dtype=name, bits=bits, max_abs_diff=diff, top1=agree, greedy=same, leak=leak))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    assert all(math.isfinite(r["max_abs_diff"]) for r in rows)


if __name__ == "__main__":
    main()
