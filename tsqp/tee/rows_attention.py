"""Attention for a step whose rows belong to different sequences (`TeeModel.forward_rows`): each row a
decode step of its own generation, attended over that generation's own KV cache.

The API batches the decode steps of its concurrent generations into one forward pass (api/batcher.py):
every call of it but attention is a linear, which the server computes for all rows at once whatever
sequence each belongs to; only attention needs to know. Each generation keeps its cache where its
prefill put it (attention.TeeAttention's `KVCache`: the TEE's, so no server session is involved), and
this seam appends each row's values and keys to its own cache and attends it there; o_proj is then one
server call for every row (remote.OProj), checked like any linear.
"""

from __future__ import annotations

import torch

from tsqp.errors import TsqpError
from tsqp.model.config import ModelConfig
from tsqp.stats import Stats
from tsqp.tee.attention import KVCache


class RowsAttention:
    """`ops.Attention` over one KV cache per row: set `rows` before each step."""

    pipelined = False
    keeps_values = True  # qkv returns v: each row's goes to its own cache

    def __init__(self, config: ModelConfig, o_proj, stats: Stats):
        """o_proj: (layer, out (B, q_dim)) -> (B, hidden), the server call."""
        self.config, self.o_proj, self.stats = config, o_proj, stats
        self.rows: list[tuple[KVCache, int]] = []  # each row's cache and position

    def init(self, info: dict) -> None:
        """The server's description: nothing here depends on it."""

    def attends_here(self, pos: int, T: int) -> bool:
        return True

    def open_session(self, capacity: int) -> None:
        """The rows' caches are their generations' own: nothing to open."""

    def close_session(self) -> None:
        self.rows = []

    def put_values(self, layer: int, pos: int, v: torch.Tensor) -> None:
        """v (B, kv_dim): row i's at its own position in its own cache."""
        c = self.config
        if v.shape[0] != len(self.rows):
            raise TsqpError(f"{v.shape[0]} rows of values for a step of {len(self.rows)} sequences")
        per_head = v.view(-1, 1, c.num_kv_heads, c.head_dim)
        for (cache, position), values in zip(self.rows, per_head, strict=True):
            cache.put_values(layer, position, values)

    def __call__(self, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor, softmax_=None) -> torch.Tensor:
        """q (B, heads, hd), k (B, kv_heads, hd) post-RoPE, row i at its own position -> o_proj (B, hidden)."""
        window = self.config.family.windows[layer]
        with self.stats.tee("attention"):
            out = torch.cat(
                [
                    cache.attend(layer, position, q[i : i + 1], k[i : i + 1], window)
                    for i, (cache, position) in enumerate(self.rows)
                ]
            )  # (B, q_dim)
        return self.o_proj(layer, out)
