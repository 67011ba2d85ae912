"""Rotary position embedding, computed in the TEE from the TEE's own config (default, linear, llama3)."""

from __future__ import annotations

import math

import torch

from tsqp.model.config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """(head_dim // 2,) float32, with the checkpoint's rope scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_type == "linear":
        return inv_freq / config.rope_param("factor")
    if config.rope_type == "llama3":
        factor = config.rope_param("factor")
        low, high = config.rope_param("low_freq_factor"), config.rope_param("high_freq_factor")
        old_context = config.rope_param("original_max_position_embeddings")
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class Rotary:
    """Applies RoPE to (T, heads, head_dim) tensors at absolute positions."""

    def __init__(self, config: LlamaConfig):
        self.inv_freq = inverse_frequencies(config)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, head_dim)
        return emb.cos(), emb.sin()

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
