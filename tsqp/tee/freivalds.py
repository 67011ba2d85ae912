"""Freivalds' test, once for every check: the secret keys, the tolerance, the comparison.

Keys. Computed once per TEE process from its own checkpoint, streaming one weight at a time and keeping
only vectors: for each linear weight W (out, in) a secret s (out, K) and w = W^T s (in, K) (`linear_key`);
for the embedding E s (vocab, K); per layer the fold z_h = W_v[g(h)]^T (W_o[:, h]^T s_o) that lets the
plain checks (verify.py) cover v_proj, the cached V, P @ V and o_proj at once. Weights are rounded to the
server's dtype first, as the server holds them. Plain mode's keys are float32 per projection
(`build_keys`), private mode's float64 per fused op (`masked_keys`).

Tolerance. An honest result carries the rounding of its dtype (unit roundoff u) and of the float sums
that formed it and the check (accumulation unit: U32 in float32, U64 in float64); `linear_gains` turns
them into the two factors of a linear's bound, `score_gains` and `value_gain` those of attention's.
verify.py's docstring derives them. Comparison: `ratios` and `compare`, |lhs - rhs| against LAMBDA
times the bound, with one rule for zero, NaN and infinite tolerances.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from tsqp.errors import IntegrityError
from tsqp.model.checkpoint import Checkpoint, layer_prefix
from tsqp.model.config import ModelConfig
from tsqp.model.family import ATTENTION_PROJECTIONS, MLP_PROJECTIONS
from tsqp.tee.op_weights import Op, chunk_buffer, model_ops, op_dims, stream_rows, weight_rows
from tsqp.wire.protocol import MASKED_DTYPE

VECTORS = 2  # independent secret vectors per check (K): one pass over the data checks all of them
S_MAX = 2.0  # secret entries are +-[1, 2)
LAMBDA = 4.0  # tolerance multiplier over the rounding-error bounds
U32 = 2.0**-24  # float32 unit roundoff: the accumulation unit of plain mode's sums
U64 = 2.0**-53  # float64 unit roundoff: private mode's masked products and their checks
TINY = 1e-38  # a zero tolerance, raised to this in the ratio: an exact zero deviation passes
UNIT_ROUNDOFF = {torch.float64: U64, torch.float32: U32, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
EMBED = "model.embed_tokens.weight"


# -- tolerance and comparison ------------------------------------------------------------------


@functools.cache  # a decode step asks it for the same few shapes some 120 times
def linear_gains(u: float, unit: float, in_dim: int, out_dim: int) -> tuple[float, float]:
    """The bound of a row of y = x W^T + b checked against one secret vector is
    rounding ||y|| + accumulation omega ||x||: (rounding, accumulation) for a result in a dtype of unit
    roundoff u, summed in a dtype of unit `unit` (the server's products and the TEE's checks)."""
    rounding = (u + unit * math.sqrt(out_dim)) * S_MAX  # times ||y||
    accumulation = unit * (math.sqrt(in_dim) + math.sqrt(out_dim))  # times omega ||x||
    return rounding, accumulation


def score_gains(u: float, keys: int, head_dim: int) -> tuple[float, float]:
    """A row of scores over `keys` keys: (times the row norm of S, times ||q|| ||K|| / sqrt(hd))."""
    row_gain = (2 * u + U32 * math.sqrt(keys)) * S_MAX
    floor = U32 * (math.sqrt(head_dim) + 2 * math.sqrt(keys)) * S_MAX
    return row_gain, floor


def value_gain(config: ModelConfig, keys: int) -> float:
    """attn_out's bound on what the TEE never sees, times omega_o sum_h P_h ||v||: V and P @ V rounded (the
    server keeps its value path in float32, engine.VALUE_DTYPE, so U32 each) and the float32 sums of v_proj,
    P @ V, c and o_proj."""
    c = config
    sums = 2 * math.sqrt(keys) + 2 * math.sqrt(c.hidden_size * c.head_dim) + math.sqrt(c.q_dim)
    return 2 * U32 + U32 * sums


def ratios(lhs: torch.Tensor, rhs: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """|lhs - rhs| / (LAMBDA bound), elementwise: a check passes where it is at most 1.

    One ratio carries all three rules: a zero tolerance is raised to TINY (an exact zero still passes), NaN
    stays NaN (it fails every comparison), and adding 0 * tolerance turns an infinite tolerance into NaN
    (IEEE: 0 * inf is NaN), which no finite deviation could otherwise exceed."""
    return ratio_of((lhs - rhs).abs_(), bound * LAMBDA)


def ratio_of(deviation: torch.Tensor, tolerance: torch.Tensor) -> torch.Tensor:
    """`ratios` from |lhs - rhs| (overwritten) and LAMBDA times the bound."""
    return deviation.div_(tolerance.clamp_min(TINY)).add_(tolerance, alpha=0.0)


def compare(lhs: torch.Tensor, rhs: torch.Tensor, bound: torch.Tensor, what: str, who: str = "server") -> float:
    """The largest ratio (`ratios`) when it is at most 1; raises IntegrityError naming `what` and the first
    element that failed otherwise."""
    return compare_difference(lhs - rhs, bound * LAMBDA, what, who)


def compare_difference(difference: torch.Tensor, tolerance: torch.Tensor, what: str, who: str = "server") -> float:
    """`compare` of lhs - rhs against a tolerance already LAMBDA times the bound (the rules of `ratios`)."""
    worst = float(ratio_of(difference.abs(), tolerance).max())
    if worst <= 1.0:
        return worst
    deviation = difference.abs()
    bad = ~(deviation <= tolerance) | ~torch.isfinite(tolerance)
    index = tuple(int(i) for i in bad.nonzero()[0])
    raise IntegrityError(
        f"integrity check failed: the {who}'s {what} result is wrong (Freivalds check at index {list(index)}: "
        f"off by {float(deviation[index]):.3g}, tolerance {float(tolerance.expand_as(deviation)[index]):.3g}); "
        f"stop using this {who}"
    )


# -- keys --------------------------------------------------------------------------------------


def secret_matrix(generator: torch.Generator, n: int) -> torch.Tensor:
    """(n, VECTORS): random signs times magnitudes uniform in [1, 2), stored column by column."""
    signs = torch.randint(0, 2, (VECTORS, n), generator=generator).float().mul_(2).sub_(1)
    return signs.mul_(torch.rand(VECTORS, n, generator=generator).add_(1)).T


def by_columns(t: torch.Tensor) -> torch.Tensor:
    """The same (n, K) matrix stored column by column, for `times`."""
    return t.T.contiguous().T


FEW_ROWS = 8  # up to this many rows, a @ s directly: one dispatch instead of four, and no faster way


def times(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """a (T, n) @ s (n, K) computed as (s^T a^T)^T: with the small matrix on the left, CPU BLAS streams a once,
    about twice as fast as a @ s (measured on the 1.1B shape, 2 threads). s is stored column by column.
    A decode step's few rows go straight to a @ s (17 against 11 us for one row of 5632 here)."""
    if a.shape[0] <= FEW_ROWS:
        return a @ s
    return (s.T @ a.T).T


@dataclass
class LinearKey:
    s: torch.Tensor  # (out, K) secret
    w: torch.Tensor  # (in, K) = W^T s, for W as the server holds it (rounded to its dtype)
    omega: float  # S_MAX max_j ||W[:, j]|| >= ||W[:, j] * s||: how a column's accumulation errors reach Y s
    frobenius: float  # ||W||_F: ||Y_row|| <= ||X_row|| ||W||_F + ||b||
    bias_s: torch.Tensor = field(default_factory=lambda: torch.zeros(VECTORS))  # (K,) = b s
    bias_norm: float = 0.0


@dataclass
class LayerKeys:
    q: LinearKey
    k: LinearKey
    v: LinearKey  # v_proj alone: attention in the TEE receives v (plain mode folds it into attn_out's check)
    o: LinearKey  # w = W_o^T s_o (q_dim, K); head h's rows are u_h
    gate: LinearKey
    up: LinearKey
    down: LinearKey
    qkv_proj: torch.Tensor  # (hidden, 2K + heads K) = [w_q | w_k | z_h for each head]: one matmul per qkv call
    mlp_proj: torch.Tensor  # (hidden, 2K) = [w_gate | w_up]
    beta: torch.Tensor  # (heads, K) = b_v[g(h)] . u_h
    v_gain: torch.Tensor  # (heads,) spectral norm of W_v[g(h)]: ||v_j|| <= ||x_j|| v_gain + v_bias_norm
    v_bias_norm: torch.Tensor  # (heads,)


@dataclass
class ModelKeys:
    embed_s: torch.Tensor  # (hidden, K)
    embed_e: torch.Tensor  # (vocab, K) = E s
    head: LinearKey
    layers: list[LayerKeys]


def linear_key(
    chunks: Iterable[tuple[int, torch.Tensor, torch.Tensor | None]], s: torch.Tensor, in_dim: int, dtype: torch.dtype
) -> LinearKey:
    """W's key from its rows streamed as (first row, rows (n, in) in dtype, their bias or None), for the secret
    s (out, K); each chunk of rows is overwritten here (squared in place).

    Three passes over a chunk, each a BLAS-shaped one: w += s_part^T rows (the small matrix on the left, as in
    `times`: rows streamed once for all K vectors), the rows squared in place, and their column sums as a
    matrix-vector product with ones (a third the time of .sum(0) over rows here)."""
    w, col_sq = torch.zeros(VECTORS, in_dim, dtype=dtype), torch.zeros(in_dim, dtype=dtype)
    bias_s, bias_sq = torch.zeros(VECTORS, dtype=dtype), 0.0
    for start, rows, bias in chunks:
        part = s[start : start + rows.shape[0]]
        w.addmm_(part.T, rows)
        col_sq.addmv_(rows.square_().T, torch.ones(rows.shape[0], dtype=dtype))
        if bias is not None:
            bias_s, bias_sq = bias_s + bias @ part, bias_sq + float(bias.square().sum())
    omega, frobenius = S_MAX * col_sq.max().sqrt().item(), col_sq.sum().sqrt().item()
    return LinearKey(by_columns(s), by_columns(w.T), omega, frobenius, bias_s, math.sqrt(bias_sq))


def project(weight: torch.Tensor, s: torch.Tensor, wire: torch.dtype, buffer: torch.Tensor) -> LinearKey:
    """W (out, in) and its secret s (out, K) -> the float32 key (its bias added later), a few rows at a time,
    converted into buffer (`op_weights.chunk_buffer`, shared by every weight)."""
    chunks = ((start, rows, None) for start, rows in stream_rows(weight, wire, torch.float32, buffer))
    return linear_key(chunks, s, weight.shape[1], torch.float32)


def embedding_rows(embed: torch.Tensor, s: torch.Tensor, wire: torch.dtype, buffer: torch.Tensor) -> torch.Tensor:
    """E (vocab, hidden) -> E s (vocab, K)."""
    e = torch.empty(VECTORS, embed.shape[0])
    for start, rows in stream_rows(embed, wire, torch.float32, buffer):
        for k in range(VECTORS):
            torch.mv(rows, s[:, k], out=e[k, start : start + rows.shape[0]])
    return e.T


def masked_keys(checkpoint: Checkpoint, wire: torch.dtype, generator: torch.Generator) -> dict[Op, LinearKey]:
    """Private mode's float64 key of every op, each fused weight streamed once."""
    keys, buffer = {}, chunk_buffer(MASKED_DTYPE)
    for op in model_ops(checkpoint.config):
        in_dim, out_dim = op_dims(checkpoint.config, op)
        s = secret_matrix(generator, out_dim).to(MASKED_DTYPE)  # (out, K)
        chunks = weight_rows(checkpoint, op, wire, MASKED_DTYPE, buffer=buffer)
        keys[op] = linear_key(chunks, s, in_dim, MASKED_DTYPE)
    return keys


def build_keys(checkpoint: Checkpoint, wire: torch.dtype, generator: torch.Generator) -> ModelKeys:
    """Streams every linear weight once from the TEE's own checkpoint, one tensor at a time; keeps vectors."""
    c = checkpoint.config
    head_name = "lm_head.weight" if checkpoint.has("lm_head.weight") else EMBED  # the server's choice too
    embed_s, head_s = secret_matrix(generator, c.hidden_size), secret_matrix(generator, c.vocab_size)
    outs = {
        "q_proj": c.q_dim,
        "k_proj": c.kv_dim,
        "v_proj": c.kv_dim,
        "o_proj": c.hidden_size,
        "gate_proj": c.intermediate_size,
        "up_proj": c.intermediate_size,
        "down_proj": c.hidden_size,
    }
    secret = [{proj: secret_matrix(generator, n) for proj, n in outs.items()} for _ in range(c.num_layers)]
    where: dict[str, tuple[int, str, str]] = {}
    for layer in range(c.num_layers):
        for proj in (*ATTENTION_PROJECTIONS, *MLP_PROJECTIONS):
            part = "self_attn" if proj in ATTENTION_PROJECTIONS else "mlp"
            for kind in ("weight", "bias") if c.has_bias(proj) else ("weight",):
                where[f"{layer_prefix(layer)}{part}.{proj}.{kind}"] = (layer, proj, kind)
    # v_proj weights come last: z needs u = W_o^T s_o of the same layer first.
    v_names = [name for name, (_, proj, kind) in where.items() if (proj, kind) == ("v_proj", "weight")]
    names = [EMBED] + ([head_name] if head_name != EMBED else []) + [n for n in where if n not in set(v_names)]
    keys: list[dict[str, LinearKey]] = [{} for _ in range(c.num_layers)]
    biases: dict[tuple[int, str], torch.Tensor] = {}
    embed_e = head = None
    buffer = chunk_buffer(torch.float32)
    for name, tensor in checkpoint.tensors(names):  # one tensor at a time, in file order
        if name == EMBED:
            embed_e = embedding_rows(tensor, embed_s, wire, buffer)
        if name == head_name:
            head = project(tensor, head_s, wire, buffer)
        if name in where:
            layer, proj, kind = where[name]
            if kind == "bias":
                biases[layer, proj] = tensor.to(wire).float()
            else:
                keys[layer][proj] = project(tensor, secret[layer][proj], wire, buffer)
        del tensor  # the next one is read only after this one is released
    attention = {}
    for name, tensor in checkpoint.tensors(v_names):
        layer = where[name][0]
        keys[layer]["v_proj"] = project(tensor, secret[layer]["v_proj"], wire, buffer)
        attention[layer] = _layer_keys(c, keys[layer], biases, layer, tensor, wire)
    return ModelKeys(embed_s, embed_e, head, [attention[layer] for layer in range(c.num_layers)])


def _layer_keys(
    c: ModelConfig, keys: dict[str, LinearKey], biases: dict, layer: int, v_proj: torch.Tensor, wire: torch.dtype
) -> LayerKeys:
    for proj, key in keys.items():
        if (layer, proj) in biases:
            key.bias_s, key.bias_norm = biases[layer, proj] @ key.s, biases[layer, proj].norm().item()
    kv, group, hd = c.num_kv_heads, c.group_size, c.head_dim
    u = keys["o_proj"].w.reshape(kv, group, hd, VECTORS)  # u_h = W_o[:, h]^T s_o for head h = g * group + i
    w_v = v_proj.to(wire).float().view(kv, hd, c.hidden_size)
    z = torch.einsum("gdm,gidk->mgik", w_v, u).reshape(c.hidden_size, c.num_heads * VECTORS)
    b_v = biases[layer, "v_proj"].view(kv, hd) if (layer, "v_proj") in biases else torch.zeros(kv, hd)
    return LayerKeys(
        q=keys["q_proj"],
        k=keys["k_proj"],
        v=keys["v_proj"],
        o=keys["o_proj"],
        gate=keys["gate_proj"],
        up=keys["up_proj"],
        down=keys["down_proj"],
        qkv_proj=by_columns(torch.cat([keys["q_proj"].w, keys["k_proj"].w, z], dim=1)),
        mlp_proj=by_columns(torch.cat([keys["gate_proj"].w, keys["up_proj"].w], dim=1)),
        beta=torch.einsum("gd,gidk->gik", b_v, u).reshape(c.num_heads, VECTORS),
        v_gain=spectral_norms(w_v).repeat_interleave(group),
        v_bias_norm=torch.linalg.vector_norm(b_v, dim=1).repeat_interleave(group),
    )


def spectral_norms(w: torch.Tensor) -> torch.Tensor:
    """(g, hd, hidden) -> (g,) float32 spectral norms, as the root of the largest eigenvalue of each W W^T
    (hd x hd), formed in float64: a third of the time of matrix_norm(ord=2)'s SVD of the wide matrices, and
    as accurate for the largest singular value (relative error of the order of float64's unit roundoff)."""
    w = w.double()
    return torch.linalg.eigvalsh(w @ w.transpose(1, 2)).amax(-1).clamp_min(0).sqrt().float()
