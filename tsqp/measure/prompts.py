"""The random prompts the benchmarks time: the same ids for the split, for transformers' baseline (run in
a subprocess of its own) and for every client of a load run, given the same seed."""

from __future__ import annotations

import torch


def token_ids(count: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(count,) int64 ids drawn from [3, vocab): past the special ids (unk, bos, eos) a LLaMA vocabulary
    starts with, so no prompt ends early or carries a control token."""
    return torch.randint(3, vocab, (count,), generator=torch.Generator().manual_seed(seed))
