"""Rotary position embedding, computed in the TEE from the TEE's own config (default, linear, llama3).

One `Rotary` per distinct `family.Rope` of the model (Gemma 3's sliding layers have their own base).
"""

from __future__ import annotations

import math

import torch

from tsqp.model.family import Rope


def inverse_frequencies(rope: Rope, head_dim: int) -> torch.Tensor:
    """(head_dim // 2,) float32, with the rope's scaling applied."""
    dim = head_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.type == "linear":
        return inv_freq / rope.param("factor")
    if rope.type == "llama3":
        factor = rope.param("factor")
        low, high = rope.param("low_freq_factor"), rope.param("high_freq_factor")
        old_context = rope.param("original_max_position_embeddings")
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class Rotary:
    """Applies RoPE to (T, heads, head_dim) tensors at absolute positions.

    cos and sin are tables over positions [0, n), grown (doubled) when a step reaches past them: a decode
    step reads a row of each instead of computing them. The table's sin carries rotate_half's sign
    (-sin on the first half), so the rotation is x cos + swap(x) sin: a concatenation and two products.
    """

    GROW_FROM = 256  # positions in the first table

    def __init__(self, rope: Rope, head_dim: int):
        self.inv_freq = inverse_frequencies(rope, head_dim)
        self.cos = self.sin = torch.empty(0, 1, head_dim)  # (n, 1, head_dim)

    def cos_sin(self, pos: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (T, 1, head_dim) at positions [pos, pos+T), views of the tables."""
        if pos + T > self.cos.shape[0]:
            self._grow(max(pos + T, 2 * self.cos.shape[0], self.GROW_FROM))
        return self.cos[pos : pos + T], self.sin[pos : pos + T]

    def cos_sin_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (T, 1, head_dim) at positions (T,) int64, each row its own (a batch of sequences)."""
        end = int(positions.max()) + 1
        if end > self.cos.shape[0]:
            self._grow(max(end, 2 * self.cos.shape[0], self.GROW_FROM))
        return self.cos[positions], self.sin[positions]

    def _grow(self, n: int) -> None:
        freqs = torch.arange(n).float()[:, None] * self.inv_freq[None, :]  # (n, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (n, 1, head_dim)
        sin = emb.sin()
        sin[..., : freqs.shape[1]].neg_()
        self.cos, self.sin = emb.cos(), sin

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (T, heads, head_dim) rotated into a new tensor (x is a server result a check may still read)."""
        half = x.shape[-1] // 2
        swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
        return torch.mul(x, cos).addcmul_(swapped, sin)
