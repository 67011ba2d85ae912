"""Attention for a step whose rows belong to different sequences (`TeeModel.forward_rows`): each sequence's
rows (a decode step's one, or a chunk of its prompt) attended over that sequence's own KV cache.

The API batches its concurrent generations into one forward pass a step (api/batcher.py): every call of
it but attention is a linear, which the server computes for all rows at once whatever sequence each
belongs to; only attention needs to know. Each generation's cache lives in the TEE (attention.KVCache),
so no server session holds any of it: this seam appends each segment's values and keys to its own cache
and attends it there (causal within a prompt's chunk); o_proj is then one server call for every row
(remote.OProj), checked like any linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tsqp.errors import TsqpError
from tsqp.model.config import ModelConfig
from tsqp.stats import Stats
from tsqp.tee.attention import KVCache


@dataclass(frozen=True)
class Segment:
    """A sequence's rows of a step: `rows` tokens at positions [pos, pos + rows) of its `cache`."""

    cache: KVCache
    pos: int
    rows: int


class RowsAttention:
    """`ops.Attention` over one KV cache per segment of the step's rows: set `segments` before each step."""

    pipelined = False
    keeps_values = True  # qkv returns v: each segment's goes to its own cache

    def __init__(self, config: ModelConfig, o_proj, stats: Stats):
        """o_proj: (layer, out (N, q_dim), residual or None) -> (N, hidden), the server call (remote.OProj)."""
        self.config, self.o_proj, self.stats = config, o_proj, stats
        self.segments: list[Segment] = []  # in row order, covering every row

    def init(self, info: dict) -> None:
        """The server's description: nothing here depends on it."""

    def attends_here(self, pos: int, T: int) -> bool:
        return True

    def open_session(self, capacity: int) -> None:
        """The segments' caches are their generations' own: nothing to open."""

    def close_session(self) -> None:
        self.segments = []

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.shape[0] != sum(s.rows for s in self.segments):
            raise TsqpError(f"{x.shape[0]} rows for segments of {sum(s.rows for s in self.segments)}")
        return x.split([s.rows for s in self.segments])

    def put_values(self, layer: int, pos: int, v: torch.Tensor) -> None:
        """v (N, kv_dim): each segment's at its positions in its own cache."""
        c = self.config
        for segment, values in zip(self.segments, self._split(v), strict=True):
            segment.cache.put_values(layer, segment.pos, values.view(-1, c.num_kv_heads, c.head_dim))

    def __call__(self, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor, softmax_=None, residual=None):
        """q (N, heads, hd), k (N, kv_heads, hd) post-RoPE, each segment at its own positions -> (N, hidden)."""
        window = self.config.family.windows[layer]
        with self.stats.tee("attention"):
            parts = zip(self.segments, self._split(q), self._split(k), strict=True)
            out = torch.cat([s.cache.attend(layer, s.pos, q_s, k_s, window) for s, q_s, k_s in parts])  # (N, q_dim)
        return self.o_proj(layer, out, residual)
