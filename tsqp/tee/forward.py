"""The TEE side of the model: the LLaMA forward pass, every weight product through the ops it is handed.

It reads top to bottom like DESIGN.md section 1. The TEE holds only the RMSNorm gains and the rope
parameters, read from its own copy of the model folder; `self.ops` (`ops.Ops`, composed by compose.py:
the plain split with its checks, or private mode) does the rest, the way tinygrad's Transformer is
handed its linear layer.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tsqp.errors import TsqpError
from tsqp.model.checkpoint import Checkpoint, layer_prefix, norm_weight_names
from tsqp.stats import Stats
from tsqp.tee.ops import Ops
from tsqp.tee.rope import Rotary
from tsqp.tuning import SMALL_STEP_ROWS, one_thread


class TeeModel:
    def __init__(self, model: str | Path | Checkpoint, ops: Ops, stats: Stats | None = None):
        """model: the TEE's own copy of the model (a folder or its Checkpoint); ops: where the rest runs."""
        checkpoint = model if isinstance(model, Checkpoint) else Checkpoint(model)
        self.config = c = checkpoint.config
        self.fingerprint = checkpoint.fingerprint()
        self.norms = {name: t.to(torch.float32) for name, t in checkpoint.tensors(norm_weight_names(c))}
        self.rotary = Rotary(c)
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
        return info

    def rms_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        with self.stats.tee("rmsnorm"):
            variance = x.pow(2).mean(-1, keepdim=True)
            return x * torch.rsqrt(variance + self.config.rms_norm_eps) * self.norms[name]

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: int = 0, last_only: bool = False) -> torch.Tensor:
        """ids (T,) at positions [pos, pos+T) of the open session -> float32 logits (T or 1, vocab)."""
        self.check_ids(ids)
        with one_thread(ids.shape[0] <= SMALL_STEP_ROWS):
            return self._forward(ids, pos, last_only)

    def _forward(self, ids: torch.Tensor, pos: int, last_only: bool) -> torch.Tensor:
        c, ops, stats = self.config, self.ops, self.stats
        T = ids.shape[0]
        ops.begin_step(pos, T)
        x = ops.embedding(ids)  # (T, hidden)
        with stats.tee("rope"):
            cos, sin = self.rotary.cos_sin(torch.arange(pos, pos + T))
        for layer in range(c.num_layers):
            stats.layer = layer
            p = layer_prefix(layer)
            h = self.rms_norm(x, p + "input_layernorm.weight")
            q, k = ops.qkv(layer, pos, h)  # (T, q_dim), (T, kv_dim)
            with stats.tee("rope"):
                q = self.rotary.apply(q.view(T, c.num_heads, c.head_dim), cos, sin)
                k = self.rotary.apply(k.view(T, c.num_kv_heads, c.head_dim), cos, sin)
            attn = ops.attention(layer, pos, q, k, self.softmax_)  # o_proj(softmax(q k^T) V) (T, hidden)
            with stats.tee("residual"):
                x = x + attn
            h = self.rms_norm(x, p + "post_attention_layernorm.weight")
            gate, up = ops.gate_up(layer, h)  # (T, intermediate) each
            with stats.tee("silu_mul"):
                act = F.silu(gate).mul_(up)
            mlp = ops.down(layer, act)  # (T, hidden)
            with stats.tee("residual"):
                x = x + mlp
        stats.layer = None
        if last_only:
            x = x[-1:]
        x = self.rms_norm(x, "model.norm.weight")
        return ops.lm_head(x)  # (T or 1, vocab)

    def softmax_(self, block: torch.Tensor) -> torch.Tensor:
        """Runs in the TEE between the server's two attention products, on one query tile of scores."""
        with self.stats.tee("softmax"):
            return causal_softmax_(block)

    def check_ids(self, ids: torch.Tensor) -> None:
        if ids.dim() != 1 or ids.numel() == 0:
            raise TsqpError("give at least one token id")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise TsqpError(f"token id {bad} is out of range: the vocabulary has {self.config.vocab_size} entries")


def causal_softmax_(block: torch.Tensor) -> torch.Tensor:
    """Softmax over keys with the causal mask, in place on a query tile's scores (heads, rows, keys)
    (the TEE owns this copy).

    Only the last `rows` key columns can lie in the future of a row of the tile: that diagonal block
    gets -inf above its diagonal; every earlier key is visible to every row of the tile.
    """
    rows, keys = block.shape[1], block.shape[2]
    future = torch.ones(rows, rows, dtype=torch.bool).triu_(1)
    block[:, :, keys - rows :].masked_fill_(future, float("-inf"))
    return torch.softmax(block, dim=-1, out=block)
