"""What each rank of a tensor-parallel server holds, and the linears over those shares.

A rank's share (`Shard`, the Megatron-LM split):

    q, k, v, gate, up   by output columns: its query heads with their kv heads (GQA groups whole; with
                        fewer kv heads than ranks, a kv head is replicated on the ranks of its group), its
                        slice of the MLP; each rank's columns are gathered to rank 0
    o_proj, down        by input rows: partial sums over its heads or MLP slice, reduced to rank 0, which
                        adds the bias once
    lm_head, embedding  by vocabulary rows (equal shares, the last one padded): logits gathered, embedding
                        rows summed (a rank contributes zeros for the ids it does not hold)
    KV cache            by kv heads, like the weights

A column-split product's pieces are gathered to rank 0 and a row-split one's partial sums reduced there
(parallel.Ranks); rank 0 assembles the (T, out) result, the others get None. On a single rank both are
one product written where the result goes: the request's arena slot (`alloc`, a CPU server answering one
request) or fresh device memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tsqp.errors import TsqpError
from tsqp.model.config import ModelConfig
from tsqp.server.kernels import linear_into
from tsqp.server.parallel import Ranks

# -- what each rank holds ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One rank's share of the model. Column runs are (start, width) in the assembled result."""

    rank: int
    heads: range  # query heads
    kv_heads: range  # the kv heads those query heads attend with
    mlp: range  # intermediate (gate, up, down) columns
    vocab: range  # vocabulary rows; the last rank's may be fewer than vocab_rows
    vocab_rows: int  # rows every rank holds (equal shares, zero-padded)
    head_dim: int
    q_dim: int  # the model's, for the assembled layouts
    kv_dim: int
    intermediate: int
    vocab_size: int

    @property
    def q(self) -> tuple[int, int]:
        return self.heads.start * self.head_dim, len(self.heads) * self.head_dim

    @property
    def kv(self) -> tuple[int, int]:
        return self.kv_heads.start * self.head_dim, len(self.kv_heads) * self.head_dim

    def columns(self, kind: str) -> tuple[int, list[tuple[int, int]]]:
        """A result split by output columns: (its full width, this rank's runs of columns in local order)."""
        q, kv, mlp = self.q, self.kv, (self.mlp.start, len(self.mlp))
        layouts = {
            "q": (self.q_dim, [q]),
            "kv": (self.kv_dim, [kv]),
            "qk": (self.q_dim + self.kv_dim, [q, _after(kv, self.q_dim)]),
            "qkv": (self.q_dim + 2 * self.kv_dim, [q, _after(kv, self.q_dim), _after(kv, self.q_dim + self.kv_dim)]),
            "mlp": (self.intermediate, [mlp]),
            "gate_up": (2 * self.intermediate, [mlp, _after(mlp, self.intermediate)]),
            "vocab": (self.vocab_size, [(self.vocab.start, len(self.vocab))]),
        }
        return layouts[kind]

    def inputs(self, kind: str) -> tuple[int, int]:
        """A linear split by input rows (o_proj: "o", "down"): (start, width) of this rank's input columns."""
        return {"o": self.q, "down": (self.mlp.start, len(self.mlp))}[kind]


def _after(run: tuple[int, int], offset: int) -> tuple[int, int]:
    return run[0] + offset, run[1]


def shards(config: ModelConfig, world: int) -> list[Shard]:
    """Every rank's share, or a one-line error naming what --tensor-parallel must divide."""
    c = config
    flag = f"--tensor-parallel {world}"
    if c.num_heads % world:
        raise TsqpError(f"{flag} must divide the model's {c.num_heads} query heads")
    if c.num_kv_heads % world and world % c.num_kv_heads:
        raise TsqpError(
            f"{flag} must divide the model's {c.num_kv_heads} kv heads or be a multiple of them "
            "(a GQA group stays on one rank)"
        )
    if c.intermediate_size % world:
        raise TsqpError(f"{flag} must divide the model's MLP width {c.intermediate_size}")
    if c.vocab_size < world:
        raise TsqpError(f"{flag} exceeds the model's vocabulary of {c.vocab_size}")
    heads, vocab_rows, mlp = c.num_heads // world, -(-c.vocab_size // world), c.intermediate_size // world
    result = []
    for rank in range(world):
        if c.num_kv_heads >= world:
            per = c.num_kv_heads // world
            kv_heads = range(rank * per, (rank + 1) * per)
        else:  # fewer kv heads than ranks: each rank holds the one its query heads share
            first = rank * heads // c.group_size
            kv_heads = range(first, first + 1)
        result.append(
            Shard(
                rank=rank,
                heads=range(rank * heads, (rank + 1) * heads),
                kv_heads=kv_heads,
                mlp=range(rank * mlp, (rank + 1) * mlp),
                vocab=range(rank * vocab_rows, min((rank + 1) * vocab_rows, c.vocab_size)),
                vocab_rows=vocab_rows,
                head_dim=c.head_dim,
                q_dim=c.q_dim,
                kv_dim=c.kv_dim,
                intermediate=c.intermediate_size,
                vocab_size=c.vocab_size,
            )
        )
    return result


def assemble_columns(out: torch.Tensor, parts: Sequence[torch.Tensor], layouts: Sequence[list]) -> torch.Tensor:
    """out (T, width) from each rank's (T, local) columns and its runs (Shard.columns); replicated kv heads
    are written once per replica, with equal values."""
    for part, runs in zip(parts, layouts, strict=True):
        local = 0
        for start, width in runs:
            out[:, start : start + width].copy_(part[:, local : local + width])
            local += width
    return out


def assemble_tiles(out: torch.Tensor, parts: Sequence[torch.Tensor], tiles, heads: Sequence[range]) -> torch.Tensor:
    """Packed scores (protocol.query_tiles over all heads) from each rank's, packed over its own heads:
    within a tile's (heads, rows, keys) block a rank's heads are one contiguous run."""
    for part, own in zip(parts, heads, strict=True):
        local = 0
        for t in tiles:
            block = t.rows * t.keys
            out[t.offset + own.start * block : t.offset + own.stop * block].copy_(
                part[local : local + len(own) * block]
            )
            local += len(own) * block
    return out


# -- the linears over the shares ---------------------------------------------------------------------

ROW_SPLITS = ("o", "down")  # split by input rows (Shard.inputs); any other split is a kind of Shard.columns

Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


class Linears:
    """The products over this rank's shares, and where their results go (`out`)."""

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
        return self.assemble(local, kind)

    def assemble(self, local: torch.Tensor, kind: str) -> torch.Tensor | None:
        """This rank's columns (T, its share of `kind`, Shard.columns) of a result gathered to rank 0 and
        placed into the (T, out) result there (on one rank: copied to where results go); None on the others."""
        width, _ = self.shard.columns(kind)
        if self.ranks.world == 1:
            return self.out((local.shape[0], width), local.dtype).copy_(local)
        parts = self.ranks.gather(local)
        if parts is None:
            return None
        out = self.out((local.shape[0], width), local.dtype)
        return assemble_columns(out, parts, [r.columns(kind)[1] for r in self.shards])

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
