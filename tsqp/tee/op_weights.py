"""The op table (the model's linears as private mode names them) and their weights streamed from the TEE's
checkpoint.

`Op` is one linear of a forward pass: qkv (q, k and v fused), o_proj, gate_up, down (each with its layer)
and lm_head. `weight_rows` reads an op's fused weight from the checkpoint a chunk at a time, rounded to
the server's dtype as the server holds it; the pads (pad_pool.py), the float64 Freivalds keys and the
calibration are all computed from it without a whole float64 copy of any weight.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tsqp.model.checkpoint import Checkpoint, layer_prefix
from tsqp.model.config import ModelConfig


@dataclass(frozen=True)
class Op:
    name: str  # one of protocol.MASKED_LINEARS
    layer: int = 0  # 0 for lm_head

    @property
    def args(self) -> dict:
        return {"op": self.name, "layer": self.layer}

    def __str__(self) -> str:
        return self.name if self.name == "lm_head" else f"{self.name} of layer {self.layer}"


def op_dims(config: ModelConfig, op: Op) -> tuple[int, int]:
    """(in, out) of an op's weight."""
    c = config
    return {
        "qkv": (c.hidden_size, c.q_dim + 2 * c.kv_dim),
        "o_proj": (c.q_dim, c.hidden_size),
        "gate_up": (c.hidden_size, 2 * c.intermediate_size),
        "down": (c.intermediate_size, c.hidden_size),
        "lm_head": (c.hidden_size, c.vocab_size),
    }[op.name]


def model_ops(config: ModelConfig) -> list[Op]:
    """Every linear of a forward pass, in the order it runs."""
    ops = [Op(name, layer) for layer in range(config.num_layers) for name in ("qkv", "o_proj", "gate_up", "down")]
    return ops + [Op("lm_head")]


def weight_names(checkpoint: Checkpoint, op: Op) -> list[tuple[str, str | None]]:
    """(weight, bias or None) names of an op's parts, stacked in this order along the output."""
    c, p = checkpoint.config, layer_prefix(op.layer)
    if op.name == "lm_head":
        return [("lm_head.weight" if checkpoint.has("lm_head.weight") else "model.embed_tokens.weight", None)]
    part, projs = {
        "qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
        "o_proj": ("self_attn", ("o_proj",)),
        "gate_up": ("mlp", ("gate_proj", "up_proj")),
        "down": ("mlp", ("down_proj",)),
    }[op.name]
    return [(f"{p}{part}.{proj}.weight", f"{p}{part}.{proj}.bias" if c.has_bias(proj) else None) for proj in projs]


def load_weight(
    checkpoint: Checkpoint, op: Op, wire: torch.dtype, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An op's fused weight (out, in) and bias, rounded to the server's dtype (as it holds them), in dtype."""
    parts = weight_names(checkpoint, op)
    names = [w for w, _ in parts] + [b for _, b in parts if b is not None]
    tensors = dict(checkpoint.tensors(names))
    weight = torch.cat([tensors[w].to(wire).to(dtype) for w, _ in parts])
    biases = [tensors[b].to(wire).to(dtype) for _, b in parts if b is not None]
    return weight, torch.cat(biases) if biases else None


CHUNK_BYTES = 64 << 20  # weight rows converted at a time into a reused buffer: no whole float64 copy of a weight


def chunk_buffer(dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of CHUNK_BYTES for `stream_rows`, to be reused across weights: a fresh one per weight is
    fresh pages each time (converting 64 MB into new pages took 6x as long as into touched ones here)."""
    return torch.empty(CHUNK_BYTES // dtype.itemsize, dtype=dtype)


def stream_rows(
    weight: torch.Tensor, wire: torch.dtype, dtype: torch.dtype, buffer: torch.Tensor | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows in dtype) over one weight (out, in) as stored, CHUNK_BYTES at a time, each chunk rounded
    to the server's dtype (as it holds the weight) and converted into one buffer that every chunk reuses
    (a fresh copy of every chunk costs more than the products made with it: the pages are new each time).
    The chunk is the caller's to overwrite until the next one. buffer: one to reuse (`chunk_buffer`, or any
    tensor of dtype with room for a row), its storage viewed as rows of this weight's width."""
    width = weight.shape[1]
    step = max(1, CHUNK_BYTES // (width * dtype.itemsize))
    if buffer is None or buffer.dtype != dtype or buffer.numel() < width:
        buffer = torch.empty(min(step, weight.shape[0]) * width, dtype=dtype)
    step = min(step, buffer.numel() // width, weight.shape[0])
    rows_buffer = buffer.view(-1)[: step * width].view(step, width)
    for start in range(0, weight.shape[0], step):
        rows = weight[start : start + step]
        chunk = rows_buffer[: rows.shape[0]]
        direct = rows.dtype == wire or wire == dtype  # converting straight to dtype rounds as the server does
        chunk.copy_(rows if direct else rows.to(wire))
        yield start, chunk


def weight_rows(
    checkpoint: Checkpoint,
    op: Op,
    wire: torch.dtype,
    dtype: torch.dtype,
    bias: bool = True,
    buffer: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """(first output row, W rows in dtype, their bias or None) over an op's fused weight (`stream_rows` per part).
    buffer: one to reuse across ops (`chunk_buffer`); by default one for this op."""
    row = 0
    for weight_name, bias_name in weight_names(checkpoint, op):
        weight = checkpoint.tensor(weight_name)
        b = checkpoint.tensor(bias_name).to(wire).to(dtype) if bias and bias_name is not None else None
        if buffer is None:
            step = max(1, CHUNK_BYTES // (weight.shape[1] * dtype.itemsize))
            buffer = torch.empty(min(step, weight.shape[0]), weight.shape[1], dtype=dtype)
        for start, chunk in stream_rows(weight, wire, dtype, buffer):
            yield row + start, chunk, None if b is None else b[start : start + chunk.shape[0]]
        row += weight.shape[0]
        del weight


def product(
    checkpoint: Checkpoint,
    op: Op,
    x: torch.Tensor,
    wire: torch.dtype,
    bias: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x W^T (+ b) (T, out) in x's dtype, the weight streamed from the checkpoint (`weight_rows`)."""
    out = torch.empty(x.shape[0], op_dims(checkpoint.config, op)[1], dtype=x.dtype) if out is None else out
    part = None
    for start, rows, b in weight_rows(checkpoint, op, wire, x.dtype, bias):
        n = rows.shape[0]
        if part is None or part.shape[1] < n:
            part = torch.empty(x.shape[0], n, dtype=x.dtype)
        torch.mm(x, rows.T, out=part[:, :n])
        out[:, start : start + n] = part[:, :n] if b is None else part[:, :n] + b
    return out
