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
    """Applies RoPE to (T, heads, head_dim) tensors at absolute positions."""

    def __init__(self, rope: Rope, head_dim: int):
        self.inv_freq = inverse_frequencies(rope, head_dim)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, head_dim)
        return emb.cos(), emb.sin()

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
