"""The linears over the ranks' shares of a weight, and where their results are written.

On a tensor-parallel server (parallel.py) each rank holds some rows of a weight (its output columns,
Shard.columns) or some of its columns (its inputs: o_proj, down). A column-split product's pieces are
gathered to rank 0, a row-split one's partial sums reduced there; rank 0 assembles the (T, out) result,
the others get None. On a single rank both are one product written where the result goes: the request's
arena slot (`alloc`, a CPU server answering one request) or fresh device memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tsqp.server.kernels import linear_into
from tsqp.server.parallel import Ranks, Shard, assemble_columns

ROW_SPLITS = ("o", "down")  # split by input rows (Shard.inputs); any other split is a kind of Shard.columns

Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


class Linears:
    def __init__(self, ranks: Ranks, shards: list[Shard], device: torch.device, dtype: torch.dtype):
        self.ranks, self.shards, self.shard = ranks, shards, shards[ranks.rank]
        self.device, self.dtype = device, dtype
        self.alloc: Alloc | None = None  # the arena slots of the request being answered alone (CPU server)

    def out(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Where a result goes: the request's arena slot on a CPU server, else fresh device memory."""
        if self.alloc is not None:
            return self.alloc(shape, dtype or self.dtype)
        return torch.empty(shape, dtype=dtype or self.dtype, device=self.device)

    def linear(self, x, weight, bias, split: str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """x (T, in) W^T + b split as `split` says (ROW_SPLITS or a kind of Shard.columns)."""
        if split in ROW_SPLITS:
            start, share = self.shard.inputs(split)
            return self.rows(x.narrow(1, start, share), weight, bias, weight.shape[0], dtype)
        return self.columns(x, weight, bias, split, dtype)

    def columns(self, x, weight, bias, kind: str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """x W^T + b where this rank holds some of W's rows (its output columns, Shard.columns(kind)): each
        rank's columns are gathered to rank 0, which assembles the (T, out) result; None on the others."""
        dtype, T = dtype or self.dtype, x.shape[0]
        width, _ = self.shard.columns(kind)
        if self.ranks.world == 1:
            return linear_into(self.out((T, width), dtype), x, weight, bias)
        local = linear_into(torch.empty((T, weight.shape[0]), dtype=dtype, device=self.device), x, weight, bias)
        parts = self.ranks.gather(local)
        if parts is None:
            return None
        return assemble_columns(self.out((T, width), dtype), parts, [r.columns(kind)[1] for r in self.shards])

    def rows(self, x, weight, bias, width: int, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """sum over ranks of x_r W_r^T, + b: x (T, this rank's inputs), W_r the matching columns of W (o_proj,
        down); the partial sums are reduced to rank 0, which adds the bias once; None on the others.
        Computed in x's dtype (float32 on the value path), rounded to `dtype` once, at the end."""
        dtype, T, leader = dtype or self.dtype, x.shape[0], self.ranks.leader
        direct = x.dtype == dtype
        partial = (
            self.out((T, width), dtype)
            if direct and leader
            else torch.empty((T, width), dtype=x.dtype, device=self.device)
        )
        linear_into(partial, x, weight, bias if leader else None)
        self.ranks.reduce(partial)
        if not leader:
            return None
        return partial if direct else self.out((T, width), dtype).copy_(partial)
