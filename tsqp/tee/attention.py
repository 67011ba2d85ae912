"""Attention inside the TEE (private mode): the session's KV cache, the causal softmax(q k^T) v, and the
attention seam over them (`TeeAttention`).

q k^T multiplies two secrets, so an additive pad on one side does not survive it cheaply; kept here it
costs about 4% of a prefill's linear work (DESIGN.md section 6). No score, probability, key or value
leaves the TEE. The cache holds post-RoPE keys and values, float32, like the server's in plain mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tsqp.errors import TsqpError
from tsqp.model.config import ModelConfig
from tsqp.stats import Stats


class KVCache:
    """Post-RoPE keys and values of one session, per layer: (kv_heads, capacity, head_dim) each."""

    def __init__(self, config: ModelConfig, capacity: int):
        shape = (config.num_layers, config.num_kv_heads, capacity, config.head_dim)
        self.keys = torch.zeros(shape)
        self.values = torch.zeros(shape)
        self.filled = [0] * config.num_layers  # positions holding values, per layer
        self.capacity = capacity

    def put_values(self, layer: int, pos: int, v: torch.Tensor) -> None:
        """v (T, kv_heads, head_dim) at positions [pos, pos + T)."""
        T = v.shape[0]
        if pos > self.filled[layer] or pos + T > self.capacity:
            raise TsqpError(f"{T} tokens at position {pos} do not fit a session of {self.capacity} positions")
        self.values[layer, :, pos : pos + T] = v.transpose(0, 1)
        self.filled[layer] = pos + T

    def put_keys(self, layer: int, pos: int, k: torch.Tensor) -> None:
        """k (T, kv_heads, head_dim) post-RoPE at positions [pos, pos + T), attended elsewhere (on the server)."""
        self.keys[layer, :, pos : pos + k.shape[0]] = k.transpose(0, 1)

    def attend(self, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """q (T, heads, hd), k (T, kv_heads, hd) post-RoPE at [pos, pos + T) -> softmax(q K^T / sqrt(hd)) V
        over keys [0, pos + T), causal, as (T, heads * hd) head-major like o_proj's input. window: the
        query at i sees keys (i - window, i] only; keys older than the first query's window are not read."""
        T, heads, hd = q.shape
        end = pos + T
        if end > self.filled[layer]:
            raise TsqpError(f"attention of layer {layer} at positions up to {end} before their values")
        self.put_keys(layer, pos, k)
        start = 0 if window is None else max(0, pos + 1 - window)
        # 4-d (batch 1): with 3-d inputs torch's CPU attention falls back to its unfused path, 4.6 times
        # slower here (1024 tokens, 32 heads: 740 against 160 ms)
        keys, values = self.keys[None, layer, :, start:end], self.values[None, layer, :, start:end]  # (1, kv, n, hd)
        queries = q.transpose(0, 1)[None]  # (1, heads, T, hd)
        if T == 1 or (pos == 0 and (window is None or T <= window)):  # every key or the square causal mask
            out = F.scaled_dot_product_attention(queries, keys, values, is_causal=T > 1, enable_gqa=True)
        else:  # query i sees keys [0, i], or (i - window, i]
            key_pos, query_pos = torch.arange(start, end)[None, :], torch.arange(pos, end)[:, None]
            visible = key_pos <= query_pos
            if window is not None:
                visible &= key_pos > query_pos - window
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(T, heads * hd)


class TeeAttention:
    """Attention in the TEE (`ops.Attention`): the session's KVCache here, o_proj through the linear seam.

    The values come with qkv (`put_values`), so the ops that use it are those whose qkv returns v: a linear
    seam's fused qkv (private.LinearOps), or the plain split's qkv asked for them (remote.RemoteOps, o_proj
    then the server call remote.OProj): one round trip a layer less than the server's scores and attn_out."""

    pipelined = False  # nothing crosses between the two products
    keeps_values = True

    def init(self, info: dict) -> None:
        """The server's description: nothing here depends on it."""

    def attends_here(self, pos: int, T: int) -> bool:
        return True

    def __init__(self, config: ModelConfig, o_proj, stats: Stats):
        """o_proj: (layer, out (T, q_dim), residual or None) -> out W_o^T + b_o (T, hidden), through the linear
        seam (residual: `ops.Attention`'s)."""
        self.config, self.o_proj, self.stats = config, o_proj, stats
        self.cache: KVCache | None = None

    def open_session(self, capacity: int) -> None:
        if capacity < 1 or capacity > self.config.max_position_embeddings:
            raise TsqpError(f"a session holds 1 to {self.config.max_position_embeddings} positions, not {capacity}")
        self.cache = KVCache(self.config, capacity)

    def close_session(self) -> None:
        self.cache = None

    def put_values(self, layer: int, pos: int, v: torch.Tensor) -> None:
        """v (T, kv_dim) from qkv at positions [pos, pos + T)."""
        if self.cache is None:
            raise TsqpError("open a session before the per-layer calls")
        self.cache.put_values(layer, pos, v.reshape(-1, self.config.num_kv_heads, self.config.head_dim))

    def __call__(self, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor, softmax_=None, residual=None):
        """softmax_: unused (the fused kernel runs it); residual: handed to o_proj (`ops.Attention`)."""
        with self.stats.tee("attention"):
            out = self.cache.attend(layer, pos, q, k, self.config.family.windows[layer])  # (T, q_dim)
        return self.o_proj(layer, out, residual)
