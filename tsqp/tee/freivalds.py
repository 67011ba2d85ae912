"""The TEE's secret Freivalds keys: random vectors and their products with the checkpoint's weights.

Computed once per TEE process from its own checkpoint, streaming one weight at a time and keeping only
vectors: for each linear weight W (out, in) a secret s (out, K) and w = W^T s (in, K); for the
embedding E s (vocab, K); per layer the fold z_h = W_v[g(h)]^T (W_o[:, h]^T s_o) that lets
`verify.VerifiedOps` check v_proj, the cached V, P @ V and o_proj at once. Weights are rounded to the
server's dtype first, as the server holds them. For TinyLlama-1.1B the keys take 18 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tsqp.model.checkpoint import Checkpoint, layer_prefix
from tsqp.model.config import LlamaConfig

VECTORS = 2  # independent secret vectors per check (K): one pass over the data checks all of them
S_MAX = 2.0  # secret entries are +-[1, 2)
# The tolerances (verify.py derives them):
LAMBDA = 4.0  # tolerance multiplier over the rounding-error bounds
U32 = 2.0**-24
TINY = 1e-38  # a zero tolerance, raised to this in the ratio: an exact zero deviation passes
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
CHUNK_ELEMENTS = 1 << 22  # weight rows converted to float32 at a time while the keys are computed
EMBED = "model.embed_tokens.weight"


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


def project(weight: torch.Tensor, s: torch.Tensor, wire: torch.dtype) -> LinearKey:
    """W (out, in) and its secret s (out, K) -> the key, converting a few rows at a time to float32."""
    out_dim, in_dim = weight.shape
    w, col_sq = torch.zeros(VECTORS, in_dim), torch.zeros(in_dim)
    step = max(1, CHUNK_ELEMENTS // in_dim)
    for start in range(0, out_dim, step):
        rows = weight[start : start + step].to(wire).float()
        for k in range(VECTORS):  # matrix-vector products: far faster here than a product with K columns
            w[k].addmv_(rows.T, s[start : start + step, k])
        col_sq.add_(rows.square().sum(0))
    return LinearKey(s, w.T, S_MAX * col_sq.max().sqrt().item(), col_sq.sum().sqrt().item())


def embedding_rows(embed: torch.Tensor, s: torch.Tensor, wire: torch.dtype) -> torch.Tensor:
    """E (vocab, hidden) -> E s (vocab, K)."""
    step = max(1, CHUNK_ELEMENTS // embed.shape[1])
    e = torch.empty(VECTORS, embed.shape[0])
    for start in range(0, embed.shape[0], step):
        rows = embed[start : start + step].to(wire).float()
        for k in range(VECTORS):
            torch.mv(rows, s[:, k], out=e[k, start : start + step])
    return e.T


def build_keys(checkpoint: Checkpoint, wire: torch.dtype, generator: torch.Generator) -> ModelKeys:
    """Streams every linear weight once from the TEE's own checkpoint, one tensor at a time; keeps vectors."""
    c = checkpoint.config
    head_name = "lm_head.weight" if checkpoint.has("lm_head.weight") else EMBED  # the server's choice too
    embed_s, head_s = secret_matrix(generator, c.hidden_size), secret_matrix(generator, c.vocab_size)
    outs = {
        "q_proj": c.q_dim,
        "k_proj": c.kv_dim,
        "o_proj": c.hidden_size,
        "gate_proj": c.intermediate_size,
        "up_proj": c.intermediate_size,
        "down_proj": c.hidden_size,
    }
    secret = [{proj: secret_matrix(generator, n) for proj, n in outs.items()} for _ in range(c.num_layers)]
    where: dict[str, tuple[int, str, str]] = {}
    for layer in range(c.num_layers):
        for part, projs, bias in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"), c.attention_bias),
            ("mlp", ("gate_proj", "up_proj", "down_proj"), c.mlp_bias),
        ):
            for proj in projs:
                for kind in ("weight", "bias") if bias else ("weight",):
                    where[f"{layer_prefix(layer)}{part}.{proj}.{kind}"] = (layer, proj, kind)
    # v_proj weights come last: z needs u = W_o^T s_o of the same layer first.
    v_names = [name for name, (_, proj, kind) in where.items() if (proj, kind) == ("v_proj", "weight")]
    names = [EMBED] + ([head_name] if head_name != EMBED else []) + [n for n in where if n not in set(v_names)]
    keys: list[dict[str, LinearKey]] = [{} for _ in range(c.num_layers)]
    biases: dict[tuple[int, str], torch.Tensor] = {}
    embed_e = head = None
    for name, tensor in checkpoint.tensors(names):  # one tensor at a time, in file order
        if name == EMBED:
            embed_e = embedding_rows(tensor, embed_s, wire)
        if name == head_name:
            head = project(tensor, head_s, wire)
        if name in where:
            layer, proj, kind = where[name]
            if kind == "bias":
                biases[layer, proj] = tensor.to(wire).float()
            else:
                keys[layer][proj] = project(tensor, secret[layer][proj], wire)
        del tensor  # the next one is read only after this one is released
    attention = {}
    for name, tensor in checkpoint.tensors(v_names):
        layer = where[name][0]
        attention[layer] = _layer_keys(c, keys[layer], biases, layer, tensor, wire)
    return ModelKeys(embed_s, embed_e, head, [attention[layer] for layer in range(c.num_layers)])


def _layer_keys(
    c: LlamaConfig, keys: dict[str, LinearKey], biases: dict, layer: int, v_proj: torch.Tensor, wire: torch.dtype
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
        o=keys["o_proj"],
        gate=keys["gate_proj"],
        up=keys["up_proj"],
        down=keys["down_proj"],
        qkv_proj=by_columns(torch.cat([keys["q_proj"].w, keys["k_proj"].w, z], dim=1)),
        mlp_proj=by_columns(torch.cat([keys["gate_proj"].w, keys["up_proj"].w], dim=1)),
        beta=torch.einsum("gd,gidk->gik", b_v, u).reshape(c.num_heads, VECTORS),
        v_gain=torch.linalg.matrix_norm(w_v, ord=2).repeat_interleave(group),
        v_bias_norm=torch.linalg.vector_norm(b_v, dim=1).repeat_interleave(group),
    )
