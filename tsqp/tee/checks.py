"""What the plain split's ops tell a checker, and the checker that checks nothing.

`remote.RemoteOps` and `server_attention.ServerAttention` are handed a checker and call it at fixed
points; the checker decides what to do with each result:

    Unchecked               nothing (measurements only)
    verify.Verifier         Freivalds' test on every result: per step it hands out a `StepCheck`,
                            verify.Immediate (call by call, a prefill) or step_checks.StepChecks (a decode
                            step's layers gathered and checked at once at its end, before the logits)

A step's hooks get what was sent (x as the server received it, in the wire dtype) and the float32 copies
of what came back. Attention is checked chunk by chunk, tile by tile while each tile is in cache: the hook
`attention` hands out a `ChunkCheck` for one chunk.
"""

from __future__ import annotations

from collections import deque

import torch

from tsqp.wire.protocol import Tile


class ChunkCheck:
    """Checks one attention chunk tile by tile; this one checks nothing."""

    def scores(self, tile: Tile, block: torch.Tensor) -> None:
        """block (heads, rows, keys): a tile of scores as the server sent it, before it is used."""

    def probs(self, tile: Tile, block: torch.Tensor) -> None:
        """block (heads, rows, keys): the tile's probabilities exactly as sent to the server."""

    def scores_done(self) -> None:
        """Every tile of the chunk's scores passed."""

    def attn_out(self, y: torch.Tensor) -> None:
        """y (T, hidden): the server's o_proj(P V) for the chunk."""


class StepCheck:
    """One forward step's hooks, in forward order; this one checks nothing."""

    def embedding(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """ids (T,), rows (T, hidden)."""

    def qkv(self, layer: int, pos: int, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """x (T, hidden) as sent; q (T, q_dim), k (T, kv_dim)."""

    def attention(self, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor, tile: int) -> ChunkCheck:
        """A chunk's scores were asked for q (T, heads, hd), k (T, kv, hd) as sent, in tiles of `tile` rows."""
        return NO_CHUNK_CHECK

    def values(self, layer: int, pos: int, x: torch.Tensor, v: torch.Tensor) -> None:
        """v (T, kv_dim) from qkv (x as sent), for attention in the TEE."""

    def o_proj(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """x (T, q_dim): the TEE's attention output as sent; y (T, hidden)."""

    def gate_up(self, layer: int, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> None: ...

    def down(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> None: ...

    def inputs(self, op: str, layer: int, own: torch.Tensor, used: torch.Tensor) -> None:
        """A fused call's later product op (gate_up, down or qkv) was computed by a 16-bit server from `used`,
        its own rounding of the input the TEE computed as `own` (float32); the product's hook gets `used`."""

    def layers_done(self) -> None:
        """Every layer's result came; lm_head is asked next (nothing derived may leave before it passes)."""

    def lm_head(self, x: torch.Tensor, y: torch.Tensor) -> None: ...

    def waiting(self) -> None:
        """The TEE is about to wait for a server reply: checks held back may run now (`Overlapped`)."""


class Overlapped(StepCheck):
    """A step's linear checks held back until the TEE next waits on the server: a result is checked while the
    server computes the next call (sent from it unchecked), not between the two.

    The order of the checks stays the forward order, and every one runs before the step ends: `attention`
    (whose chunk check reads what qkv's check records) and `layers_done` (the logits come after it) run all
    that is held first, and the calls' collect (`calls.Calls.collect`) runs them before it waits for its
    reply, giving the request up if one fails. In the plain split this tells the server nothing: each input
    sent before its source is checked is computed from results the server itself returned and inputs it
    already saw. A chunk's scores and probabilities are checked tile by tile as before (a tile is read once,
    while it is in cache); its attn_out is held like a linear result. A held check reads its result after the
    forward pass went on from it: no step writes a result in place (as for a decode step's checks at its end;
    tests/tee/test_overlapped_checks.py runs every family both ways)."""

    def __init__(self, checks: StepCheck):
        self.checks = checks
        self.held: deque[tuple] = deque()  # (hook, its arguments), in forward order

    def embedding(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        self.held.append((self.checks.embedding, ids, rows))

    def qkv(self, layer: int, pos: int, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        self.held.append((self.checks.qkv, layer, pos, x, q, k))

    def attention(self, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor, tile: int) -> ChunkCheck:
        self.waiting()
        return HeldAttnOut(self.checks.attention(layer, pos, q, k, tile), self.held)

    def values(self, layer: int, pos: int, x: torch.Tensor, v: torch.Tensor) -> None:
        self.held.append((self.checks.values, layer, pos, x, v))

    def o_proj(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.held.append((self.checks.o_proj, layer, x, y))

    def gate_up(self, layer: int, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> None:
        self.held.append((self.checks.gate_up, layer, x, gate, up))

    def down(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.held.append((self.checks.down, layer, x, y))

    def inputs(self, op: str, layer: int, own: torch.Tensor, used: torch.Tensor) -> None:
        self.held.append((self.checks.inputs, op, layer, own, used))

    def layers_done(self) -> None:
        self.waiting()
        self.checks.layers_done()

    def lm_head(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.checks.lm_head(x, y)

    def waiting(self) -> None:
        held = self.held
        while held:
            hook, *args = held.popleft()
            hook(*args)


class HeldAttnOut(ChunkCheck):
    """A chunk's check whose attn_out joins the step's held checks (`Overlapped`)."""

    def __init__(self, check: ChunkCheck, held: deque[tuple]):
        self.check, self.held = check, held

    def scores(self, tile: Tile, block: torch.Tensor) -> None:
        self.check.scores(tile, block)

    def probs(self, tile: Tile, block: torch.Tensor) -> None:
        self.check.probs(tile, block)

    def scores_done(self) -> None:
        self.check.scores_done()

    def attn_out(self, y: torch.Tensor) -> None:
        self.held.append((self.check.attn_out, y))


NO_CHUNK_CHECK = ChunkCheck()
NO_STEP_CHECK = StepCheck()


class Unchecked:
    """The checker of an unverified split: every hook is a no-op."""

    setup_s = 0.0  # computing keys: none
    overlap = False  # a long step's checks made while the server computes the next call: none made
    defer_rows = 0  # steps of up to this many tokens checked at their end: none
    failure = None  # what failed (a checker raises at every later call once it is set)
    immediate = NO_STEP_CHECK  # the hooks of calls outside a step

    def init(self, wire: torch.dtype, apart: bool = False) -> None:
        """The server's dtype is known, and whether it computes apart from the TEE's cores (wire/cores.py)."""

    def usable(self) -> None:
        """Raises if an earlier check failed (before anything more is sent)."""

    def open_session(self, capacity: int) -> None: ...

    def close_session(self) -> None: ...

    def begin_step(self, pos: int, T: int, attention) -> StepCheck:
        """The hooks of a step's calls up to lm_head. attention: the step's `ops.Attention` (where it runs, its
        chunks)."""
        return NO_STEP_CHECK
