"""Verified mode: the TEE checks every result the untrusted server returns before anything derived from it
leaves the TEE, but for the server's next inputs, which the server could compute itself: call by call in a
prefill (`Immediate`; with a server on a GPU each while the server computes the next call:
checks.Overlapped), at the end of a decode step for all layers at once (step_checks.py; the logits come
after the checks). `Verifier` is the checker the plain split's ops are handed (checks.py); freivalds.py has
the keys, the tolerance factors and the comparison; a prefill's attention chunks are checked by
attention_check.py, each chunk's tiles compared at once.

Freivalds' test. For a result Y that should equal X W^T + b, the TEE keeps a secret random matrix s
(out, K) and w = W^T s (in, K), computed once at start from its own copy of the checkpoint
(`freivalds.build_keys`: streamed one weight at a time, only the vectors kept). It then checks
Y s == X w + b s: two matrix-vector products over data it already holds, instead of the matrix
product itself. The server never sees s.

    embedding   rows (T, hidden)              rows s == e[ids]               e = E s (vocab, K)
    qkv         q (T, q_dim), k (T, kv_dim)   q s_q == x w_q + b_q s_q, same for k
    scores      tile (heads, rows, keys)      S r[first:end] == q (K^T r) / sqrt(hd)
    attn_out    y = o_proj(P V) (T, hidden)   y s_o == sum_h P_h c_h + b_o s_o
    gate_up, down, lm_head                    like qkv (and, attention in the TEE, v_proj and o_proj)

scores: r is a secret value per key position, drawn per session; K^T r is a running sum over the
post-RoPE keys the TEE itself sent, so a server that caches other keys fails the check (a sliding-window
layer's tiles start at their window: K^T r is then summed over the window, from the TEE's own copy of
the keys it sent for that layer; a running sum would lose the window's digits to cancellation). attn_out: V
never leaves the server, but V = x W_v^T + b_v for the x the TEE sent in qkv, so with
z_h = W_v[g(h)]^T (W_o[:, h]^T s_o) and beta_h = b_v[g(h)] . (W_o[:, h]^T s_o) the TEE keeps
c[j, h] = x_j . z_h + beta_h per position; one check covers v_proj, the cached V, P @ V and o_proj.

Each entry of s and r is a random sign times a magnitude uniform in [1, 2), from a generator seeded
with 63 secret bits per TEE process. A tampered result Y + D passes one vector only if |D s| stays
within the tolerance: a change in a single element by more than the tolerance is always caught
(|D_i s_i| >= |D_i|), and a change whose largest element exceeds the tolerance by a factor F passes a
vector with probability at most 1/F, whatever the server knows about the other elements. K = 2
independent vectors are checked at once (one pass over the data): at most 1/F^2.

Tolerance. The honest server rounds: each element it returns carries a relative error up to the unit
roundoff u of its dtype (2^-24 float32, 2^-11 float16, 2^-8 bfloat16), and each sum it forms in float32
an error of about 2^-24 sqrt(n) times the norm of its terms (n the reduction length); the TEE's own
float32 sums add the same. The errors are independent across elements, so their s-weighted sum grows
like a 2-norm (s itself is independent of them). For a row of a linear result, per vector,

    |Y s - X w - b s| <= LAMBDA * [ (u + 2^-24 sqrt(out)) S_MAX ||Y_row||
                                    + 2^-24 (sqrt(in) + sqrt(out)) omega ||X_row|| ]

where omega = S_MAX max_j ||W[:, j]|| bounds how a column's accumulation error reaches Y s. scores use
2u and the row norm of S, and ||q|| times the Frobenius norm of the key prefix; attn_out bounds the
rounding of the server's V and P @ V, which the TEE never sees, by omega_o sum_j P_hj ||v_j|| with
||v_j|| <= ||x_j|| sigma(W_v[g(h)]) + ||b_v[g(h)]|| (sigma: spectral norm), summed over heads as a
2-norm. In float32 the output-rounding term is no larger than the accumulation terms, so the row norms
are bounded from the TEE's side (||Y|| <= ||X|| ||W||_F + ||b||, Cauchy-Schwarz for scores) instead of
measured: one pass less over every result. LAMBDA = 4 over these bounds: honest discrepancies stay
below 0.4 of the tolerance (`Verifier.margin`) in the tests and on cuBLAS at the 1.1B shape.

What the tolerance lets through: per row, changes D with |D s| below it, i.e. of the size of the
rounding noise: at the 1.1B shape about 1e-4 of |Y s| in float32 (1e-3 with bounded norms), 0.004 in
float16 and 0.03 in bfloat16; attn_out is looser (0.2 float16, 1.1 bfloat16: the bound on the unseen
V and P @ V dominates). docs/threat-model.md has the measured table.

A failed check raises IntegrityError naming the op and layer, and every later call raises too: a
server must not learn from retries which perturbations pass.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import Counter

import torch

from tsqp.errors import IntegrityError, TsqpError
from tsqp.model.checkpoint import Checkpoint
from tsqp.model.config import ModelConfig
from tsqp.stats import Stats
from tsqp.tee.attention_check import AttentionCheck
from tsqp.tee.checks import ChunkCheck, Overlapped, StepCheck
from tsqp.tee.freivalds import (
    LAMBDA,
    S_MAX,
    U32,
    UNIT_ROUNDOFF,
    VECTORS,
    LinearKey,
    ModelKeys,
    build_keys,
    compare,
    linear_gains,
    secret_matrix,
    times,
)
from tsqp.tee.step_checks import StackedKeys, StepChecks, stack_keys
from tsqp.tuning import SHORT_STEP_ROWS
from tsqp.wire.protocol import query_tiles


class AttentionState:
    """Per session: the secret r per key position and, per layer, what the TEE sent (as c and K^T r)."""

    def __init__(self, config: ModelConfig, capacity: int, generator: torch.Generator):
        c, L = config, config.num_layers
        self.r = secret_matrix(generator, capacity)  # (capacity, K)
        # Stacked over the layers (state.c[layer] is a layer's), so that a decode step's checks can take
        # all layers at once (step_checks.py).
        # per head: K rows of c[j, h] and one of the bound on ||v_j||, over positions j (a row per column)
        self.c = torch.zeros(L, c.num_heads, VECTORS + 1, capacity)
        self.c_filled = [0] * L
        self.kr = torch.zeros(L, VECTORS, c.num_kv_heads, c.head_dim)  # sum_j r_j k_j
        self.k_sq = torch.zeros(L, c.num_kv_heads)  # sum_j ||k_j||^2
        self.k_filled = [0] * L
        # per sliding-window layer, its last window - 1 keys as sent before k_filled (n, kv, hd): all that a
        # later call's tiles reach back to, so this stays window-sized however long the session
        self.windows = c.family.windows
        empty = torch.zeros(0, c.num_kv_heads, c.head_dim)
        self.recent = {layer: empty for layer, window in enumerate(self.windows) if window}

    def window_keys(self, layer: int, pos: int, k: torch.Tensor) -> tuple[int, torch.Tensor]:
        """A windowed layer's call at pos (appending, or restarting at 0) with k (T, kv, hd) as sent: the keys
        its tiles can reach (the recent ones, then k) and the position of the first."""
        before = self.recent[layer] if pos else self.recent[layer][:0]
        return pos - before.shape[0], torch.cat([before, k])

    def window_sums(self, start: int, keys: torch.Tensor, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K^T r (K, kv, hd) and sum ||k_j||^2 (kv,) over positions [first, end) of keys starting at start."""
        part = keys[first - start : end - start]  # (n, kv, hd)
        return torch.einsum("nk,ngd->kgd", self.r[first:end], part), part.square().sum((0, 2))

    def keep_recent(self, layer: int, keys: torch.Tensor) -> None:
        """A windowed layer's checks passed: keys (ending at the new k_filled) as the recent ones."""
        self.recent[layer] = keys[max(0, keys.shape[0] - self.windows[layer] + 1) :].clone()

    def expect_qkv_at(self, layer: int, pos: int) -> None:
        """qkv at pos must append to (or overwrite) the positions folded into c."""
        if pos > self.c_filled[layer]:
            raise TsqpError(f"verified mode: qkv of layer {layer} at position {pos} skips cached positions")


class Verifier:
    """The plain split's checker (checks.py): every result passes a Freivalds check, call by call
    (`immediate`), or at the end of a decode step for all its layers at once (`begin_step`), before the
    step's logits are returned."""

    def __init__(
        self, checkpoint: Checkpoint, stats: Stats | None = None, seed: int | None = None, overlap: str = "auto"
    ):
        """seed: for tests only; by default 63 secret bits the server cannot know. overlap: on, off or auto (on
        when the server computes apart from the TEE's cores: checks.Overlapped; `--pipeline`)."""
        self.checkpoint, self.config = checkpoint, checkpoint.config
        self.stats = stats or Stats()
        self.generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
        self.wire = torch.float32
        # Bound result row norms from the TEE's side instead of measuring them (a pass over each result)?
        # The row norm scales the output-rounding term of a tolerance. In float32 that term is of the order
        # of the accumulation term, so a looser bound costs little precision: ||Y|| <= ||X|| ||W||_F + ||b||,
        # ||S_row|| <= ||q|| ||K|| / sqrt(hd) (Cauchy-Schwarz). In bfloat16 and float16 it dominates: measured.
        self.bounded_norms = True  # the wire dtype is float32
        self.keys: ModelKeys | None = None
        self.stacked: StackedKeys | None = None  # the layer keys stacked, for a step's checks at once
        self.defer_rows = SHORT_STEP_ROWS  # steps of up to this many tokens are checked at their end
        self.overlap_mode = overlap
        self.overlap = overlap == "on"  # a longer step's checks run while the server computes the next call
        self.immediate = Immediate(self)
        self.state: AttentionState | None = None
        self.setup_s = 0.0  # computing the keys from the checkpoint
        self.checks: Counter[str] = Counter()  # op -> results verified
        self.comparisons = 0  # row-vector comparisons made
        self.margin: dict[str, float] = {}  # op -> largest |lhs - rhs| / tolerance seen
        self.failure: str | None = None

    # -- control -------------------------------------------------------------------------------

    def init(self, wire: torch.dtype, apart: bool = False) -> None:
        """The server's dtype is known now: the keys are computed here, at start, not on the first call.
        A server that computes apart from the TEE's cores (a GPU, another host, other CPUs: wire/cores.py) has
        the checks overlap its calls (`overlap` auto); one on the TEE's own cores would share the cores they
        run on (measured: docs/benchmarks.md, "Checks while the server computes")."""
        if self.overlap_mode == "auto":
            self.overlap = apart
        self.usable()
        if wire != self.wire:
            self.wire, self.keys, self.bounded_norms = wire, None, wire == torch.float32
            self.usable()

    def usable(self) -> None:
        """Raises if an earlier check failed; makes the keys of the wire dtype if they are not made yet."""
        if self.failure is not None:
            raise IntegrityError(f"an earlier {self.failure}")
        if self.keys is None:
            start = time.perf_counter()
            self.keys = build_keys(self.checkpoint, self.wire, self.generator)
            self.stacked = stack_keys(self.keys)
            self.setup_s = time.perf_counter() - start

    def open_session(self, capacity: int) -> None:
        self.state = AttentionState(self.config, capacity, self.generator)

    def close_session(self) -> None:
        self.state = None

    def begin_step(self, pos: int, T: int, attention) -> StepCheck:
        """A forward pass of T tokens at pos begins: a decode-sized one (at most `defer_rows` tokens, one
        query tile, one attention chunk) has its layers' checks made at its end, all at once
        (step_checks.py); a longer one call by call, each result checked while the server computes the next
        call (checks.Overlapped; `overlap` off: before it). A step left unfinished is dropped unchecked: its
        results were never released, and the attention state had not moved on."""
        self.usable()
        if self.state is None:
            return self.immediate
        call_by_call = Overlapped(self.immediate) if self.overlap else self.immediate
        if T > self.defer_rows:
            return call_by_call
        if attention.attends_here(pos, T):  # attention in the TEE (its linears only), or one tile in one chunk
            return StepChecks(self, pos, T, here=True)  # (a window changes neither count)
        if len(query_tiles(T, pos, self.config.num_heads, attention.tile)[0]) == len(attention.chunks(T, pos)) == 1:
            return StepChecks(self, pos, T)
        return call_by_call

    def session_state(self) -> AttentionState:
        if self.state is None:
            raise TsqpError("verified mode: open a session before the per-layer calls")
        return self.state

    # -- the checks ----------------------------------------------------------------------------

    def check_linear(
        self, op: str, layer: int | None, y: torch.Tensor, xw: torch.Tensor, x_norm: torch.Tensor, key: LinearKey
    ) -> None:
        """y (T, out) against xw = x w (T, K); x_norm (T, 1). The tolerance's factors are Python numbers: a
        decode step's check is a handful of tensor operations (each costs microseconds)."""
        rounding, accumulation = linear_gains(UNIT_ROUNDOFF[self.wire], U32, key.w.shape[0], y.shape[1])
        accumulation *= key.omega
        if self.bounded_norms:  # ||y|| <= ||x|| ||W||_F + ||b||: the tolerance is affine in ||x||
            bound = x_norm * (rounding * key.frobenius + accumulation) + rounding * key.bias_norm
        else:
            bound = _row_norm(y).mul_(rounding).add_(x_norm, alpha=accumulation)
        self.check(op, layer, times(y, key.s), xw + key.bias_s if key.bias_norm else xw, bound)

    def check_input(self, op: str, layer: int, own: torch.Tensor, used: torch.Tensor) -> None:
        """The input a 16-bit server computed a fused product op from (used) against the TEE's own (float32):
        each row within ||used - own|| <= 2 u ||own||, u the wire dtype's unit roundoff (rounding own makes at
        most u ||own||; the rest is room for the two sides' float32 values to differ in their last bits). The
        product is then checked against what the server used."""
        deviation, bound = self.input_deviation(own, used)
        self.check(f"input ({op})", layer, deviation, torch.zeros_like(deviation), bound)

    def input_deviation(self, own: torch.Tensor, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(||used - own||, its bound over LAMBDA) per row (..., 1), for `check`."""
        norm = torch.linalg.vector_norm
        bound = norm(own, dim=-1, keepdim=True).mul_(2 * UNIT_ROUNDOFF[self.wire] / LAMBDA)
        return norm(torch.sub(used, own), dim=-1, keepdim=True), bound  # a new float32 tensor: neither is written

    def check(
        self, op: str, layer: int | None, lhs: torch.Tensor, rhs: torch.Tensor, bound: torch.Tensor, count: bool = True
    ) -> None:
        """Fails unless |lhs - rhs| <= LAMBDA * bound everywhere (`freivalds.compare`: NaN and infinity fail too).
        count: this is a whole result (not one tile of it) for `checks`."""
        self.checks[op.split(" ")[0]] += count
        self.comparisons += lhs.numel()
        try:
            worst = compare(lhs, rhs, bound, f"{op} of layer {layer}" if layer is not None else op)
        except IntegrityError as exc:
            self.failure = str(exc)
            raise
        self.margin[op] = max(self.margin.get(op, 0.0), worst)


class Immediate(StepCheck):
    """Every result checked as it comes (a prefill, or a call outside a step)."""

    def __init__(self, verifier: Verifier):
        self.verifier = verifier

    def embedding(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        v = self.verifier
        with v.stats.tee("verify"):
            keys = v.keys
            lhs = times(rows, keys.embed_s)
            scale = 2 * U32 * math.sqrt(v.config.hidden_size) * S_MAX  # the TEE's own float32 sums
            v.check("embedding", None, lhs, keys.embed_e[ids], scale * _row_norm(rows))

    def qkv(self, layer: int, pos: int, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        v = self.verifier
        with v.stats.tee("verify"):
            c, keys, state = v.config, v.keys.layers[layer], v.session_state()
            state.expect_qkv_at(layer, pos)
            x = x.float()
            x_norm = _row_norm(x)
            proj = times(x, keys.qkv_proj)  # (T, 2K + heads K)
            v.check_linear("qkv (q)", layer, q, proj[:, :VECTORS], x_norm, keys.q)
            v.check_linear("qkv (k)", layer, k, proj[:, VECTORS : 2 * VECTORS], x_norm, keys.k)
            T = x.shape[0]
            cache = state.c[layer][:, :, pos : pos + T]  # (heads, K + 1, T)
            cache[:, :VECTORS] = (proj[:, 2 * VECTORS :].view(T, c.num_heads, VECTORS) + keys.beta).permute(1, 2, 0)
            cache[:, VECTORS] = x_norm.view(1, T) * keys.v_gain[:, None] + keys.v_bias_norm[:, None]
            state.c_filled[layer] = pos + T

    def attention(self, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor, tile: int) -> ChunkCheck:
        return AttentionCheck(self.verifier, layer, pos, q, k, tile)

    def gate_up(self, layer: int, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> None:
        v = self.verifier
        with v.stats.tee("verify"):
            keys, x = v.keys.layers[layer], x.float()
            proj, x_norm = times(x, keys.mlp_proj), _row_norm(x)
            v.check_linear("gate_up (gate)", layer, gate, proj[:, :VECTORS], x_norm, keys.gate)
            v.check_linear("gate_up (up)", layer, up, proj[:, VECTORS:], x_norm, keys.up)

    def values(self, layer: int, pos: int, x: torch.Tensor, values: torch.Tensor) -> None:
        self._linear("qkv (v)", layer, self.verifier.keys.layers[layer].v, x, values)

    def o_proj(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self._linear("o_proj", layer, self.verifier.keys.layers[layer].o, x, y)

    def down(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self._linear("down", layer, self.verifier.keys.layers[layer].down, x, y)

    def lm_head(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._linear("lm_head", None, self.verifier.keys.head, x, y)

    def inputs(self, op: str, layer: int, own: torch.Tensor, used: torch.Tensor) -> None:
        v = self.verifier
        with v.stats.tee("verify"):
            v.check_input(op, layer, own, used)

    def _linear(self, op: str, layer: int | None, key: LinearKey, x: torch.Tensor, y: torch.Tensor) -> None:
        v, x = self.verifier, x.float()
        with v.stats.tee("verify"):
            v.check_linear(op, layer, y, times(x, key.w), _row_norm(x), key)


def _row_norm(x: torch.Tensor) -> torch.Tensor:
    """(T, n) -> (T, 1) Euclidean norms."""
    return torch.linalg.vector_norm(x, dim=1, keepdim=True)
