"""Rotary's cached cos/sin tables rotate as transformers does, at positions before and after a table grows."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tsqp.model.family import Rope
from tsqp.tee.rope import Rotary


def transformers_rotation(x: torch.Tensor, pos: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """x (T, heads, hd) at positions [pos, pos+T), rotated by transformers' apply_rotary_pos_emb."""
    T = x.shape[0]
    freqs = torch.arange(pos, pos + T).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[None]  # (1, T, hd)
    q = x.transpose(0, 1)[None]  # (1, heads, T, hd)
    rotated, _ = apply_rotary_pos_emb(q, q, emb.cos(), emb.sin())
    return rotated[0].transpose(0, 1)


def test_rotation_matches_transformers_across_table_growth():
    rotary = Rotary(Rope(10000.0), 16)
    generator = torch.Generator().manual_seed(0)
    sizes = []
    # a prefill, a step across the first table's end, and a decode step far past it
    for pos, T in ((0, 7), (Rotary.GROW_FROM - 2, 5), (3 * Rotary.GROW_FROM + 1, 1)):
        x = torch.randn(T, 3, 16, generator=generator)
        before = x.clone()
        rotated = Rotary.apply(x, *rotary.cos_sin(pos, T))
        torch.testing.assert_close(rotated, transformers_rotation(x, pos, rotary.inv_freq), rtol=1e-6, atol=1e-6)
        assert torch.equal(x, before)  # a new tensor: the server's q and k stay as a check may read them
        sizes.append(rotary.cos.shape[0])
    assert sizes[0] == Rotary.GROW_FROM < sizes[1] < sizes[2]  # the later steps did grow the tables
