"""The TEE side of the model: the decoder forward pass, every weight product through the ops it is handed.

It reads top to bottom like DESIGN.md section 1. What the model's family changes (which norms sit where,
the activation, q/k norms, each layer's attention window and rope, the embedding and query scales, the
logit soft-cap) is the config's declared `family.Family`, read here and nowhere else. The TEE holds only
the RMSNorm gains and the rope parameters, read from its own copy of the model folder; `self.ops`
(`ops.Ops`, composed by compose.py: the plain split with its checks, or private mode) does the rest, the
way tinygrad's Transformer is handed its linear layer.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from tsqp.errors import TsqpError
from tsqp.model.checkpoint import Checkpoint, layer_prefix
from tsqp.model.elementwise import ACTIVATIONS, Norms, gated
from tsqp.stats import Stats
from tsqp.tee.calls import server_dtype
from tsqp.tee.ops import Ops
from tsqp.tee.rope import Rotary
from tsqp.tuning import SHORT_STEP_ROWS, one_thread
from tsqp.wire import cores


class TeeModel:
    def __init__(self, model: str | Path | Checkpoint, ops: Ops, stats: Stats | None = None):
        """model: the TEE's own copy of the model (a folder or its Checkpoint); ops: where the rest runs."""
        checkpoint = model if isinstance(model, Checkpoint) else Checkpoint(model)
        self.config = c = checkpoint.config
        self.family = f = c.family
        self.fingerprint = checkpoint.fingerprint()
        # gains as the norm multiplies by them, in float32: w, or Gemma's 1 + w
        self.norms = Norms(checkpoint)
        self.rotaries = {rope: Rotary(rope, c.head_dim) for rope in {f.layer_rope(i) for i in range(c.num_layers)}}
        self.activation = ACTIVATIONS[f.activation]
        self.embed_scale = f.embed_scale  # rounded to the server's dtype once attached
        self.shares_cores = False  # the server computes on this host's CPU cores (attach tells): see `threads`
        self.stats = stats or Stats()
        self.ops = ops

    def attach(self) -> dict:
        """Meets the server and checks it runs this very model (same fingerprint) before anything is sent."""
        info = self.ops.init()
        if info.get("fingerprint") != self.fingerprint:
            raise TsqpError(
                "the server runs a different model than the TEE's model folder (fingerprints differ): "
                "start the server with the same checkpoint"
            )
        self.shares_cores = not cores.apart(info)
        if "dtype" in info:  # transformers rounds Gemma's sqrt(hidden) to the embedding's dtype (bfloat16: 25.25)
            self.embed_scale = float(torch.tensor(self.family.embed_scale, dtype=server_dtype(info)))
        return info

    def rms_norm(self, x: torch.Tensor, name: str | None) -> torch.Tensor:
        """RMSNorm over the last dimension with the gain named `name` (None: the family has no norm there)."""
        if name is None:
            return x
        with self.stats.tee("rmsnorm"):  # one fused op: x rsqrt(mean(x^2) + eps) w, in float32
            return self.norms(x, name)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: int = 0, last_only: bool = False) -> torch.Tensor:
        """ids (T,) at positions [pos, pos+T) of the open session -> float32 logits (T or 1, vocab)."""
        self.check_ids(ids)
        with self.threads(ids.shape[0]):
            with self.stats.tee("rope"):
                tables = {rope: rotary.cos_sin(pos, ids.shape[0]) for rope, rotary in self.rotaries.items()}
            return self._forward(ids, pos, last_only, tables)

    @torch.inference_mode()
    def forward_rows(self, ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """ids (N,) of several sequences' steps, laid end to end, at positions (N,) -> float32 logits (S, vocab)
        of the rows `last` (S,) (each sequence's last row).

        Each sequence's rows are attended over its own cache (rows_attention.RowsAttention, told the
        segments); every other call is a linear over the N rows at once, whatever sequence each is of."""
        self.check_ids(ids)
        with self.threads(ids.shape[0]):
            with self.stats.tee("rope"):
                tables = {rope: rotary.cos_sin_at(positions) for rope, rotary in self.rotaries.items()}
            return self._forward(ids, 0, last, tables)

    def threads(self, T: int):
        """One TEE thread for a short step, or for any step while the server computes on CPU cores: between
        its parallel regions a second OpenMP thread spins, waiting, on a core the server needs (a 512-token
        SmolLM2 prefill on two cores shared with the server: 3.3 s on two TEE threads, 2.0 s on one;
        docs/benchmarks.md). A server on a GPU leaves the cores to the TEE: long steps use them all."""
        return one_thread(self.shares_cores or T <= SHORT_STEP_ROWS)

    def _forward(self, ids: torch.Tensor, pos: int, last, rope_tables: dict) -> torch.Tensor:
        """last: True (the last row's logits), False (every row's) or the rows to keep (a tensor of indices);
        rope_tables: each rope's cos and sin at the rows' positions (`Rotary.cos_sin`)."""
        f, ops, stats = self.family, self.ops, self.stats
        ops.begin_step(pos, ids.shape[0])
        x = ops.embedding(ids)  # (T, hidden)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        for layer in range(self.config.num_layers):
            stats.layer = layer
            x = self._layer(layer, pos, x, rope_tables[f.layer_rope(layer)])
        stats.layer = None
        if last is True:
            x = x[-1:]
        elif last is not False:
            x = x[last]
        x = self.rms_norm(x, "model.norm.weight")
        logits = ops.lm_head(x)  # (T or 1, vocab)
        if f.logit_softcap is not None:
            logits = torch.tanh(logits / f.logit_softcap) * f.logit_softcap
        return logits

    def _layer(self, layer: int, pos: int, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One decoder layer on x (T, hidden) at positions [pos, pos+T).

        The residual stream x goes with the products that end each half (attention's o_proj, down): ops that
        fuse calls (the plain split's, fused_calls.py) send it, and the server computes the next product's
        input from it exactly as the TEE does here; the TEE checks that product against its own input."""
        c, f, ops, stats, norms = self.config, self.family, self.ops, self.stats, self.norms
        T = x.shape[0]
        h = self.rms_norm(x, norms.layer(layer, f.attn_in_norm))
        q, k = ops.qkv(layer, pos, h)  # (T, q_dim), (T, kv_dim)
        q, k = q.view(T, c.num_heads, c.head_dim), k.view(T, c.num_kv_heads, c.head_dim)
        if f.qk_norm:  # per head, before rope
            p = layer_prefix(layer)
            q, k = self.rms_norm(q, p + "self_attn.q_norm.weight"), self.rms_norm(k, p + "self_attn.k_norm.weight")
        with stats.tee("rope"):
            q, k = Rotary.apply(q, *cos_sin), Rotary.apply(k, *cos_sin)
            if f.query_scale != 1.0:  # the attention products scale by 1/sqrt(head_dim); the family by its own
                q = q * f.query_scale
        window = f.windows[layer]
        softmax_ = self.softmax_ if window is None else functools.partial(self.softmax_, window=window)
        attn = ops.attention(layer, pos, q, k, softmax_, residual=x)  # o_proj(softmax(q k^T) V) (T, hidden)
        attn = self.rms_norm(attn, norms.layer(layer, f.attn_out_norm))
        with stats.tee("residual"):
            x = x + attn
        h = self.rms_norm(x, norms.layer(layer, f.mlp_in_norm))
        gate, up = ops.gate_up(layer, h)  # (T, intermediate) each
        with stats.tee("act_mul"):  # the gated activation: act(gate) * up
            act = gated(self.activation, gate, up)
        mlp = ops.down(layer, act, residual=x)  # (T, hidden)
        mlp = self.rms_norm(mlp, norms.layer(layer, f.mlp_out_norm))
        with stats.tee("residual"):
            return x + mlp

    def softmax_(self, block: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """Runs in the TEE between the server's two attention products, on one query tile of scores;
        window: the layer's sliding window (keys older than it are masked here)."""
        with self.stats.tee("softmax"):
            return causal_softmax_(block, window)

    def check_ids(self, ids: torch.Tensor) -> None:
        check_token_ids(ids, self.config.vocab_size)


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """ids must be a non-empty 1-d tensor of ids in [0, vocab_size)."""
    if ids.dim() != 1 or ids.numel() == 0:
        raise TsqpError("give at least one token id")
    low, high = (int(end) for end in torch.aminmax(ids))  # one pass: this runs every decode step
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise TsqpError(f"token id {bad} is out of range: the vocabulary has {vocab_size} entries")


@functools.lru_cache(maxsize=8)
def future_mask(rows: int) -> torch.Tensor:
    """(rows, rows) bool, True above the diagonal: a tile's rows size repeats, so it is built once."""
    return torch.ones(rows, rows, dtype=torch.bool).triu_(1)


def causal_softmax_(block: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Softmax over keys with the causal mask, in place on a query tile's scores (heads, rows, keys)
    (the TEE owns this copy).

    A tile's keys are positions [first, first + keys) and its rows the last `rows` of them: only the last
    `rows` key columns can lie in the future of a row, so that diagonal block gets -inf above its diagonal;
    every earlier key is visible to every row of the tile. With a window, the row at position i sees keys
    (i - window, i] only (transformers' sliding_window_overlay): older keys get -inf too. The masks depend
    on positions relative to the tile's last key only, so a tile that starts at its first row's window
    (protocol.query_tiles) is masked alike.
    """
    rows, keys = block.shape[1], block.shape[2]
    if rows > 1:  # a single row (a decode step) has no future key
        block[:, :, keys - rows :].masked_fill_(future_mask(rows), float("-inf"))
    if window is not None and keys > window:
        positions = torch.arange(keys - rows, keys)[:, None]  # (rows, 1)
        block.masked_fill_(torch.arange(keys)[None, :] <= positions - window, float("-inf"))
    return torch.softmax(block, dim=-1, out=block)
