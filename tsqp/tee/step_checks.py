"""Verified mode a decode step at a time: every layer's checks gathered while the step runs, made at its end.

`verify.Immediate` checks each result as it comes: in a decode step that is seven checks a layer (q, k,
scores, attn_out, gate, up, down), each a dozen tensor operations on a row or two, and each operation
costs microseconds of dispatch whatever its size (more right after the server's product has swept the
caches). For TinyLlama-1.1B that was 55 to 62 ms of a 530 ms token. Here the same checks, with the same
secret vectors and the same tolerances (verify.py derives them), are made once per step over the layers
stacked: one batched product per kind of check and one comparison for all of them, a few dozen
operations a step whatever the depth of the model.

Why waiting is sound in plain mode: nothing computed from an unchecked result leaves the TEE before
the checks pass (the logits come after them: `remote.RemoteOps.lm_head` settles the step first), and what
the TEE sends the server meanwhile the server sees in plain mode anyway. A failure names the first
failing op in forward order, as an immediate check would have, and every later call fails as before.
What a check compares is fixed when the result arrives (the score tile's product with r is taken
before the softmax overwrites it; the probabilities are kept as sent), so a server gains nothing from
the delay. Private mode checks every masked product before its result is used (linear.py): there a
crafted result could steer what the TEE masks and sends next.

A sliding-window layer's tile starts at its window (protocol.query_tiles): its K^T r is summed over the
window from the keys the TEE kept (verify.AttentionState.window_keys), and its probabilities are
placed at their key positions, zeros before the window, so that every layer's fold of c is one product.

The running sums of the attention checks (K^T r, sum ||k_j||^2, the fold c of the values) and the cached
positions move on only when the step's checks pass: an abandoned step (an error half-way) leaves them
as they were before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tsqp.errors import IntegrityError, TsqpError
from tsqp.tee.checks import ChunkCheck, StepCheck
from tsqp.tee.freivalds import U32, UNIT_ROUNDOFF, VECTORS, ModelKeys, linear_gains, ratios, score_gains, value_gain
from tsqp.wire.protocol import Tile

K = VECTORS
LINEAR = ("q", "k", "gate", "up", "down")
ORDER = ("qkv (q)", "qkv (k)", "scores", "attn_out", "gate_up (gate)", "gate_up (up)", "down")  # within a layer
# attention in the TEE
ORDER_HERE = ("qkv (q)", "qkv (k)", "qkv (v)", "o_proj", "gate_up (gate)", "gate_up (up)", "down")
FUSED_INPUTS = {"qkv (q)": "input (qkv)", "gate_up (gate)": "input (gate_up)", "down": "input (down)"}  # before


def with_inputs(order: tuple[str, ...], checks: dict) -> list[str]:
    """order with a 16-bit server's fused inputs (those in checks) each before its product."""
    return [op for product in order for op in (FUSED_INPUTS.get(product), product) if op == product or op in checks]


@dataclass
class StackedKeys:
    """ModelKeys' layer keys stacked over the layers; each layer's key tensors become views of these."""

    s: dict[str, torch.Tensor]  # kind (q, k, v, o, gate, up, down) -> (L, out, K)
    w: dict[str, torch.Tensor]  # v, o -> (L, in, K): attention in the TEE checks them as linears
    bias_s: dict[str, torch.Tensor]  # kind -> (L, 1, K)
    omega: dict[str, torch.Tensor]  # kind -> (L, 1, 1)
    frobenius: dict[str, torch.Tensor]
    bias_norm: dict[str, torch.Tensor]
    qkv_proj: torch.Tensor  # (L, hidden, 2K + heads K)
    mlp_proj: torch.Tensor  # (L, hidden, 2K)
    down_w: torch.Tensor  # (L, intermediate, K)
    beta: torch.Tensor  # (L, heads, K)
    v_gain: torch.Tensor  # (L, heads, 1)
    v_bias_norm: torch.Tensor  # (L, heads, 1)


def stack_keys(keys: ModelKeys) -> StackedKeys:
    """Stacks the layer keys (column by column per layer, as `freivalds.times` wants them) and points the
    per-layer keys at the stacked copies: no key is held twice."""
    layers = keys.layers

    def stacked(owner, name: str) -> torch.Tensor:
        """(L, n, K) of owner(layer).name, by columns per layer; the layers' attributes become its views."""
        whole = torch.stack([getattr(owner(layer), name).T for layer in layers]).transpose(1, 2)
        for layer, view in zip(layers, whole, strict=True):
            setattr(owner(layer), name, view)
        return whole

    def key(kind: str):
        return lambda layer: getattr(layer, kind)

    def scalars(kind: str, name: str) -> torch.Tensor:
        return torch.tensor([getattr(getattr(layer, kind), name) for layer in layers]).view(-1, 1, 1)

    kinds = ("q", "k", "v", "o", "gate", "up", "down")
    return StackedKeys(
        s={kind: stacked(key(kind), "s") for kind in kinds},
        w={kind: stacked(key(kind), "w") for kind in ("v", "o")},
        bias_s={kind: torch.stack([getattr(layer, kind).bias_s for layer in layers]).view(-1, 1, K) for kind in kinds},
        omega={kind: scalars(kind, "omega") for kind in kinds},
        frobenius={kind: scalars(kind, "frobenius") for kind in kinds},
        bias_norm={kind: scalars(kind, "bias_norm") for kind in kinds},
        qkv_proj=stacked(lambda layer: layer, "qkv_proj"),
        mlp_proj=stacked(lambda layer: layer, "mlp_proj"),
        down_w=stacked(key("down"), "w"),
        beta=torch.stack([layer.beta for layer in layers]),
        v_gain=torch.stack([layer.v_gain for layer in layers]).unsqueeze(-1),
        v_bias_norm=torch.stack([layer.v_bias_norm for layer in layers]).unsqueeze(-1),
    )


class StepChecks(StepCheck):
    """One step's results per layer, as the plain split's ops hand them over, and `settle`, which checks them
    all when the layers are done.

    Taken for a step of at most `Verifier.defer_rows` tokens whose attention is one query tile in one
    chunk (a decode step); longer steps are checked call by call, where the products are large enough
    that dispatch does not matter. Results are kept by reference until `settle`: the forward pass must
    not write them in place (it does not: RoPE, SiLU and the residuals make new tensors; the tests
    compare logits and check counts with call-by-call checking)."""

    def __init__(self, verifier, pos: int, T: int, here: bool = False):
        """here: attention runs in the TEE (qkv's v and o_proj are checked as linears; no scores, no attn_out)."""
        L = verifier.config.num_layers
        self.verifier, self.pos, self.T, self.here = verifier, pos, T, here
        self.state = verifier.session_state()  # the session's attention state, moved on by `settle`
        inputs, results = ("qkv", "gate_up", "down", "o_proj"), (*LINEAR, "v", "o")
        if not here:
            inputs, results = inputs[:-1], (*LINEAR, "attn_out")
        self.x = {name: [None] * L for name in inputs}  # the inputs as sent (float32)
        self.y = {name: [None] * L for name in results}  # the results (float32 copies)
        self.q, self.k = [None] * L, [None] * L  # scores' inputs as sent: (T, heads, hd), (T, kv, hd)
        self.scores_s = [None] * L  # each score tile times r: (heads, T, K)
        self.score_norms = [None] * L  # the tiles' row norms (heads, T, 1), where they are measured
        self.probs = [None] * L  # the probabilities as sent (heads, T, keys)
        self.firsts = [0] * L  # each layer's first key position (its window's start, or 0)
        self.window_keys: dict[int, torch.Tensor] = {}  # windowed layer -> the keys within its reach, kept once checked
        self.inputs_of: dict[str, dict[int, tuple]] = {}  # op -> layer -> (own, used): a 16-bit server's fused inputs
        self.absent: dict[str, int] = {}  # check -> layers that had none (layer 0's qkv input): not counted

    def _expect(self, pos: int | None, x: torch.Tensor) -> torch.Tensor:
        """x (T, n) as sent, as float32, once its call is found part of the step (pos None: a call without one)."""
        if x.shape[0] != self.T or (pos is not None and pos != self.pos):
            raise TsqpError(f"verified mode: a call of {x.shape[0]} tokens inside the step of {self.T} at {self.pos}")
        return x.float()

    # -- what the calls hand over --------------------------------------------------------------

    def embedding(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        self.verifier.immediate.embedding(ids, rows)  # the step's first result: nothing to gather it with

    def qkv(self, layer: int, pos: int, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        self.state.expect_qkv_at(layer, pos)
        self.x["qkv"][layer], self.y["q"][layer], self.y["k"][layer] = self._expect(pos, x), q, k

    def values(self, layer: int, pos: int, x: torch.Tensor, v: torch.Tensor) -> None:
        if not self.here:  # a step that attends on the server, the TEE keeping v for later ones (DecodeAttention)
            self.verifier.immediate.values(layer, pos, x, v)
            return
        self.y["v"][layer] = v  # x is qkv's, kept by `qkv`

    def o_proj(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x["o_proj"][layer], self.y["o"][layer] = self._expect(None, x), y

    def gate_up(self, layer: int, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> None:
        self.x["gate_up"][layer], self.y["gate"][layer], self.y["up"][layer] = self._expect(None, x), gate, up

    def down(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x["down"][layer], self.y["down"][layer] = self._expect(None, x), y

    def inputs(self, op: str, layer: int, own: torch.Tensor, used: torch.Tensor) -> None:
        self.inputs_of.setdefault(op, {})[layer] = (self._expect(None, own), used)

    def attention(self, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor, tile: int) -> ChunkCheck:
        state, T = self.state, q.shape[0]
        with self.verifier.stats.tee("verify"):
            if (pos, T) != (self.pos, self.T):
                raise TsqpError(f"verified mode: attention at position {pos} is not part of the step at {self.pos}")
            if pos != 0 and pos != state.k_filled[layer]:
                raise TsqpError(
                    f"verified mode: scores of layer {layer} at position {pos} must append to the "
                    f"{state.k_filled[layer]} cached keys (or restart at 0)"
                )
            if self.x["qkv"][layer] is None:
                raise TsqpError(
                    f"verified mode: attn_out of layer {layer} needs qkv of positions up to {pos + T} first"
                )
            self.q[layer], self.k[layer] = q.float(), k.float()
            return _Deferred(self, layer)

    def layers_done(self) -> None:
        with self.verifier.stats.tee("verify"):
            self.settle()

    def lm_head(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.verifier.immediate.lm_head(x, y)

    # -- the checks ----------------------------------------------------------------------------

    def settle(self) -> None:
        """Makes every check of the step; raises IntegrityError naming the first failing op in forward order.
        The attention state moves on to the step's positions only when all pass."""
        v, c = self.verifier, self.verifier.config
        # `is None`, not `None in`: that compares None with every tensor by Tensor.__eq__ (0.74 ms a list of 22)
        gathered = {**self.x, **self.y} if self.here else {**self.x, **self.y, "probs": self.probs}
        missing = [name for name, per_layer in gathered.items() if any(t is None for t in per_layer)]
        if missing:
            raise TsqpError(f"verified mode: the step at position {self.pos} ended without {', '.join(missing)}")
        keys = v.stacked
        checks = self._inputs()  # op -> lhs, rhs, bound

        x = torch.stack(self.x["qkv"])  # (L, T, hidden)
        x_norm = torch.linalg.vector_norm(x, dim=2, keepdim=True)  # (L, T, 1)
        proj = x @ keys.qkv_proj  # (L, T, 2K + heads K)
        checks["qkv (q)"] = self._linear("q", proj[..., :K], x_norm, c.hidden_size)
        checks["qkv (k)"] = self._linear("k", proj[..., K : 2 * K], x_norm, c.hidden_size)
        if self.here:
            checks["qkv (v)"] = self._linear("v", x @ keys.w["v"], x_norm, c.hidden_size)
            o_x = torch.stack(self.x["o_proj"])  # (L, T, q_dim): the TEE's attention output as sent
            o_norm = torch.linalg.vector_norm(o_x, dim=2, keepdim=True)
            checks["o_proj"] = self._linear("o", o_x @ keys.w["o"], o_norm, c.q_dim)
        mlp_x = torch.stack(self.x["gate_up"])
        mlp_norm, mlp_proj = torch.linalg.vector_norm(mlp_x, dim=2, keepdim=True), mlp_x @ keys.mlp_proj
        checks["gate_up (gate)"] = self._linear("gate", mlp_proj[..., :K], mlp_norm, c.hidden_size)
        checks["gate_up (up)"] = self._linear("up", mlp_proj[..., K:], mlp_norm, c.hidden_size)
        down_x = torch.stack(self.x["down"])
        down_norm = torch.linalg.vector_norm(down_x, dim=2, keepdim=True)
        checks["down"] = self._linear("down", down_x @ keys.down_w, down_norm, c.intermediate_size)
        if self.here:  # nothing of attention crossed: the state's sums of keys and values stay unused
            self._compare({op: checks[op] for op in with_inputs(ORDER_HERE, checks)})
            self.state.c_filled[:] = [self.pos + self.T] * c.num_layers
            return
        self._attention(checks, proj, x_norm)

    def _attention(self, checks: dict, proj: torch.Tensor, x_norm: torch.Tensor) -> None:
        """The scores' and attn_out's checks added to the linears' (checks), all compared; the attention state
        moved on when they pass. proj: qkv's inputs times [w_q | w_k | z] (L, T, 2K + heads K)."""
        v, state, T, pos = self.verifier, self.state, self.T, self.pos
        c, keys = v.config, v.stacked
        L, heads, kv, group, hd = c.num_layers, c.num_heads, c.num_kv_heads, c.group_size, c.head_dim

        # scores: S r == q (K^T r) / sqrt(hd), K^T r the running sum with this step's keys added
        keys_seen, scale = pos + T, 1.0 / math.sqrt(hd)
        q, k = torch.stack(self.q), torch.stack(self.k)  # (L, T, heads, hd), (L, T, kv, hd)
        kr = torch.einsum("tk,ltgd->lkgd", state.r[pos : pos + T], k)  # (L, K, kv, hd)
        k_sq = k.square().sum((1, 3))  # (L, kv)
        if pos:  # appended to the cached keys (position 0: a restart)
            kr, k_sq = kr + state.kr, k_sq + state.k_sq
        probs, seen = self._windows(kr, k_sq)  # (L, heads, T, pos + T); keys each layer's rows see
        rhs = torch.einsum("ltgid,lkgd->lgitk", q.view(L, T, kv, group, hd), kr).reshape(L, heads, T, K)
        q_norm = torch.linalg.vector_norm(q, dim=-1).view(L, T, kv, group)
        qk_norm = (q_norm * k_sq.sqrt().mul_(scale).view(L, 1, kv, 1)).permute(0, 2, 3, 1).reshape(L, heads, T, 1)
        row_gain, floor = (
            torch.tensor([score_gains(UNIT_ROUNDOFF[v.wire], n, hd) for n in seen]).view(L, 2, 1, 1, 1).unbind(1)
        )
        if v.bounded_norms:
            bound = qk_norm * (row_gain + floor)
        else:
            bound = torch.stack(self.score_norms) * row_gain + qk_norm * floor
        checks["scores"] = (torch.stack(self.scores_s), rhs.mul_(scale), bound)

        # attn_out: y s_o == sum_h P_h c_h + b_o s_o, with this step's positions folded into c
        fold = torch.empty(L, heads, K + 1, T)  # this step's positions; written to the state once all pass
        fold[:, :, :K] = (proj[..., 2 * K :].view(L, T, heads, K) + keys.beta[:, None]).permute(0, 2, 3, 1)
        fold[:, :, K] = x_norm.view(L, 1, T) * keys.v_gain + keys.v_bias_norm
        weighted = probs[..., pos:] @ fold.transpose(-1, -2)  # (L, heads, T, K + 1)
        if pos:
            weighted += probs[..., :pos] @ state.c[..., :pos].transpose(-1, -2)
        o_norm = torch.linalg.vector_norm(weighted[..., K], dim=1).unsqueeze(-1)  # (L, T, 1) >= ||O_row||
        magnitude = keys.omega["o"] * torch.tensor([value_gain(c, n) for n in seen]).view(L, 1, 1) * o_norm
        y = torch.stack(self.y["attn_out"])  # (L, T, hidden)
        if v.bounded_norms:
            y_norm = o_norm * keys.frobenius["o"] + keys.bias_norm["o"]
        else:
            y_norm = torch.linalg.vector_norm(y, dim=2, keepdim=True)
        rounding, _ = linear_gains(UNIT_ROUNDOFF[v.wire], U32, c.hidden_size, c.hidden_size)
        bound = rounding * y_norm + magnitude
        checks["attn_out"] = (y @ keys.s["o"], weighted[..., :K].sum(1) + keys.bias_s["o"], bound)

        self._compare({op: checks[op] for op in with_inputs(ORDER, checks)})
        state.c[..., pos : pos + T] = fold
        state.kr.copy_(kr)
        state.k_sq.copy_(k_sq)
        state.c_filled[:] = state.k_filled[:] = [keys_seen] * L
        for layer, window_keys in self.window_keys.items():
            state.keep_recent(layer, window_keys)

    def _windows(self, kr: torch.Tensor, k_sq: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The sliding-window layers' K^T r (L, K, kv, hd) and sum ||k||^2 (L, kv) replaced, in place, by
        their sums over the window; the probabilities (L, heads, T, pos + T) at their key positions; and
        the number of keys each layer's tile has."""
        state, end = self.state, self.pos + self.T
        if not state.recent:
            return torch.stack(self.probs), [end] * len(self.probs)
        for layer in state.recent:
            start, self.window_keys[layer] = state.window_keys(layer, self.pos, self.k[layer])
            kr[layer], k_sq[layer] = state.window_sums(start, self.window_keys[layer], self.firsts[layer], end)
        probs = torch.zeros(len(self.probs), *self.probs[0].shape[:2], end)
        for layer, (first, block) in enumerate(zip(self.firsts, self.probs, strict=True)):
            probs[layer, :, :, first:] = block
        return probs, [end - first for first in self.firsts]

    def _inputs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """verify.Verifier.check_input over the stacked layers, for each op a 16-bit server fused: (deviation
        (L, T, 1), 0, bound); a layer without one (layer 0's qkv) deviates by 0."""
        checks = {}
        for op, per_layer in self.inputs_of.items():
            zero = torch.zeros_like(next(iter(per_layer.values()))[0])
            pairs = [per_layer.get(layer, (zero, zero)) for layer in range(len(self.firsts))]
            own, used = torch.stack([own for own, _ in pairs]), torch.stack([used.float() for _, used in pairs])
            deviation, bound = self.verifier.input_deviation(own, used)
            checks[f"input ({op})"] = (deviation, torch.zeros_like(deviation), bound)
            self.absent[f"input ({op})"] = len(pairs) - len(per_layer)
        return checks

    def _linear(self, kind: str, xw: torch.Tensor, x_norm: torch.Tensor, in_dim: int):
        """verify.Verifier.check_linear over the stacked layers: (lhs, rhs, bound)."""
        v, keys = self.verifier, self.verifier.stacked
        y = torch.stack(self.y[kind])  # (L, T, out)
        out_dim = y.shape[2]
        rounding, accumulation = linear_gains(UNIT_ROUNDOFF[v.wire], U32, in_dim, out_dim)
        accumulation = keys.omega[kind] * accumulation  # (L, 1, 1)
        if v.bounded_norms:
            bound = x_norm * (keys.frobenius[kind] * rounding + accumulation) + keys.bias_norm[kind] * rounding
        else:
            bound = torch.linalg.vector_norm(y, dim=2, keepdim=True).mul_(rounding) + x_norm * accumulation
        return y @ keys.s[kind], xw + keys.bias_s[kind], bound

    def _compare(self, checks: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """verify.Verifier.check for all of them: one ratio per op and layer, read in one go."""
        v = self.verifier
        worst = []
        for op in checks:
            lhs, rhs, bound = checks[op]
            worst.append(ratios(lhs, rhs, bound).flatten(1).amax(1))  # (L,): NaN stays NaN
        worst = torch.stack(worst).T.tolist()  # (L, ops)
        for layer, layer_worst in enumerate(worst):
            for op, ratio in zip(checks, layer_worst, strict=True):
                if not ratio <= 1.0:
                    lhs, rhs, bound = checks[op]
                    v.check(op, layer, lhs[layer], rhs[layer], bound[layer])  # raises, naming what failed
                    v.failure = f"integrity check failed: the server's {op} of layer {layer} result is wrong"
                    raise IntegrityError(v.failure)
        for i, op in enumerate(checks):
            v.margin[op] = max(v.margin.get(op, 0.0), max(layer_worst[i] for layer_worst in worst))
            counted = len(worst) - self.absent.get(op, 0)
            v.checks[op.split(" ")[0]] += counted
            v.comparisons += checks[op][0].numel() // len(worst) * counted


class _Deferred(ChunkCheck):
    """A decode step's attention checks for one layer: what they need, kept for `StepChecks.settle`."""

    def __init__(self, step: StepChecks, layer: int):
        self.step, self.layer = step, layer

    def scores(self, tile: Tile, block: torch.Tensor) -> None:
        step, v = self.step, self.step.verifier
        with v.stats.tee("verify"):
            r, heads = step.state.r, block.shape[0]
            lhs = (
                block.view(heads * tile.rows, tile.keys) @ r[tile.first : tile.end]
            )  # before the softmax overwrites it
            step.firsts[self.layer] = tile.first
            step.scores_s[self.layer] = lhs.view(heads, tile.rows, K)
            if not v.bounded_norms:
                step.score_norms[self.layer] = torch.linalg.vector_norm(block, dim=2, keepdim=True)

    def probs(self, tile: Tile, block: torch.Tensor) -> None:
        self.step.probs[self.layer] = block  # the TEE's own copy, exactly as sent; nothing writes it again

    def attn_out(self, y: torch.Tensor) -> None:
        self.step.y["attn_out"][self.layer] = y
