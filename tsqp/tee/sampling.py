"""Choosing the next token in the TEE: greedy, or temperature with top-k and top-p (nucleus) filters.

Pure functions on one (vocab,) float32 logits row. Randomness comes only from the `torch.Generator`
the caller passes, seeded once per generation, so a run with the same seed gives the same tokens.
Filters apply in transformers' order: temperature, then top-k, then top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tsqp.errors import TsqpError


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0  # 0: greedy (argmax), no randomness at all
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability sums to >= top_p; 1: off
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise TsqpError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise TsqpError(f"top-k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise TsqpError(f"top-p must lie in (0, 1] (1 turns it off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(vocab,) -> a copy with every logit below the k-th largest set to -inf (ties at the k-th stay)."""
    if k <= 0 or k >= logits.shape[0]:
        return logits.clone()
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """(vocab,) -> a copy keeping the smallest most-likely set whose probability reaches p (the top token always)."""
    if p >= 1:
        return logits.clone()
    probs, order = torch.softmax(logits, dim=-1).sort(descending=True)
    mass_before = probs.cumsum(0) - probs  # probability of the tokens ranked above each one
    drop = order[mass_before >= p]  # already reached p without this token
    return logits.index_fill(0, drop, float("-inf"))


def sample(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator) -> int:
    """One token id from a (vocab,) float32 logits row."""
    if options.greedy:
        return int(torch.argmax(logits))
    logits = top_p_filter(top_k_filter(logits / options.temperature, options.top_k), options.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
