"""The weights one server rank holds, in the layout the engine computes with, read from the checkpoint.

A rank of a tensor-parallel server (parallel.Shard) reads only its share: row ranges are one read each,
column ranges (o_proj, down) one read per row, so no rank ever holds a whole projection it does not own.
An unsharded server's share is everything, read one tensor at a time as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tsqp.errors import ModelError
from tsqp.model.checkpoint import SAFETENSORS_DTYPES, Checkpoint, _read_tensor, layer_prefix
from tsqp.server.sharded import Shard

# The value path (v_proj, the V cache, P @ V, o_proj) runs in float32 whatever the server dtype: the
# TEE never sees V or P @ V, so their rounding is what verification must tolerate in attn_out; in
# bfloat16 that bound was loose enough to let a single-element lie through. It costs one float32
# copy of v_proj and o_proj, and a float32 V cache.
VALUE_DTYPE = torch.float32


@dataclass
class Layer:
    qk: torch.Tensor  # (q_dim + kv_dim, hidden): q and k projections fused, their result goes to the TEE
    qk_bias: torch.Tensor | None
    v: torch.Tensor  # (kv_dim, hidden), float32: its result stays in the KV cache
    v_bias: torch.Tensor | None
    o: torch.Tensor  # (hidden, q_dim), float32
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor  # (2 intermediate, hidden)
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # (hidden, intermediate)
    down_bias: torch.Tensor | None


class Slices:
    """Row and column ranges of a checkpoint's tensors, read at the offsets its headers give."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.handles: dict[Path, object] = {}

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """tensor[start:stop] (a 1-d tensor's elements, a 2-d one's rows), in one read."""
        path, data_start, info, shape = self._entry(name)
        if not 0 <= start <= stop <= shape[0]:
            raise ModelError(f"{path}: {name!r} has {shape[0]} rows, not [{start}, {stop})")
        row_bytes = math.prod(shape[1:]) * SAFETENSORS_DTYPES[info["dtype"]].itemsize
        first = info["data_offsets"][0]
        part = {
            **info,
            "shape": [stop - start, *shape[1:]],
            "data_offsets": [first + start * row_bytes, first + stop * row_bytes],
        }
        return self._read(path, name, data_start, part)

    def whole(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self._entry(name)[3][0])

    def columns(self, name: str, start: int, stop: int) -> torch.Tensor:
        """tensor[:, start:stop] of a 2-d tensor: one read per row, of that row's columns only."""
        path, data_start, info, shape = self._entry(name)
        rows, width = shape
        if not 0 <= start <= stop <= width:
            raise ModelError(f"{path}: {name!r} has {width} columns, not [{start}, {stop})")
        if (start, stop) == (0, width):
            return self.rows(name, 0, rows)
        itemsize = SAFETENSORS_DTYPES[info["dtype"]].itemsize
        out = torch.empty(rows, stop - start, dtype=SAFETENSORS_DTYPES[info["dtype"]])
        first = info["data_offsets"][0]
        for row in range(rows):
            at = first + (row * width + start) * itemsize
            part = {**info, "shape": [stop - start], "data_offsets": [at, at + (stop - start) * itemsize]}
            out[row] = self._read(path, name, data_start, part)
        return out

    def _entry(self, name: str) -> tuple[Path, int, dict, list[int]]:
        checkpoint = self.checkpoint
        if not checkpoint.has(name):
            raise ModelError(f"{checkpoint.dir} has no tensor {name!r}: is the checkpoint complete?")
        path, (data_start, info) = checkpoint.where[name], checkpoint.entries[name]
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if dtype is not None else (None, None)
        consistent = (
            isinstance(shape, list)
            and len(shape) in (1, 2)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and o >= 0 for o in offsets)
            and offsets[1] - offsets[0] == math.prod(shape) * dtype.itemsize
        )
        if not consistent:
            raise ModelError(f"{path}: the header entry of {name!r} is malformed: {info!r:.200}")
        return path, data_start, info, shape

    def _read(self, path: Path, name: str, data_start: int, part: dict) -> torch.Tensor:
        try:
            if path not in self.handles:
                self.handles[path] = path.open("rb")
            return _read_tensor(self.handles[path], path, name, (data_start, part))
        except OSError as exc:
            raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


def load_weights(
    checkpoint: Checkpoint,
    shard: Shard,
    device: torch.device,
    dtype: torch.dtype,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[Layer]]:
    """(embedding rows, LM head rows, layers) of this rank's shard, each tensor read, converted and placed
    before the next is read."""
    c, s = checkpoint.config, shard
    q, kv, mlp = (s.q[0], s.q[0] + s.q[1]), (s.kv[0], s.kv[0] + s.kv[1]), (s.mlp.start, s.mlp.stop)
    # (name, how it is read, which range): this rank's rows or columns, or the whole tensor
    wanted: list[tuple[str, str, tuple[int, int] | None]] = [("model.embed_tokens.weight", "vocab", None)]
    if not c.tie_word_embeddings or checkpoint.has("lm_head.weight"):
        wanted.append(("lm_head.weight", "vocab", None))
    split = {
        "self_attn.q_proj": ("rows", q),
        "self_attn.k_proj": ("rows", kv),
        "self_attn.v_proj": ("rows", kv),
        "self_attn.o_proj": ("columns", q),
        "mlp.gate_proj": ("rows", mlp),
        "mlp.up_proj": ("rows", mlp),
        "mlp.down_proj": ("columns", mlp),
    }
    for layer in range(c.num_layers):
        for proj, (how, span) in split.items():
            wanted.append((f"{layer_prefix(layer)}{proj}.weight", how, span))
            if c.has_bias(proj.partition(".")[2]):
                # a bias follows its output rows; o_proj's and down's are whole, added once by rank 0
                name = f"{layer_prefix(layer)}{proj}.bias"
                wanted.append((name, "rows", span) if how == "rows" else (name, "whole", None))
    slices = Slices(checkpoint)
    weights: dict[str, torch.Tensor] = {}
    try:
        for done, (name, how, span) in enumerate(wanted, 1):
            if how == "vocab":
                tensor = _padded(slices.rows(name, s.vocab.start, s.vocab.stop), s.vocab_rows)
            elif how == "whole":
                tensor = slices.whole(name)
            else:
                tensor = getattr(slices, how)(name, *span)
            tensor = tensor.to(device, dtype)  # the value path too: its float32 copy holds rounded weights
            weights[name] = tensor.to(VALUE_DTYPE) if ".v_proj." in name or ".o_proj." in name else tensor
            if progress:
                progress(done, len(wanted))
    finally:
        slices.close()
    embed = weights.pop("model.embed_tokens.weight")
    head = weights.pop("lm_head.weight", embed)
    return embed, head, [_fuse(weights, layer) for layer in range(c.num_layers)]


def _padded(rows: torch.Tensor, count: int) -> torch.Tensor:
    """rows with zero rows appended up to count: the last rank's vocabulary share is the same size."""
    if rows.shape[0] == count:
        return rows
    return torch.cat([rows, rows.new_zeros(count - rows.shape[0], *rows.shape[1:])])


def _fuse(w: dict[str, torch.Tensor], layer: int) -> Layer:
    p = layer_prefix(layer)

    def cat(part: str, projs: list[str], kind: str) -> torch.Tensor | None:
        keys = [f"{p}{part}.{proj}.{kind}" for proj in projs]
        if kind == "bias" and keys[0] not in w:
            return None
        return torch.cat([w.pop(k) for k in keys])

    return Layer(
        qk=cat("self_attn", ["q_proj", "k_proj"], "weight"),
        qk_bias=cat("self_attn", ["q_proj", "k_proj"], "bias"),
        v=w.pop(f"{p}self_attn.v_proj.weight"),
        v_bias=w.pop(f"{p}self_attn.v_proj.bias", None),
        o=w.pop(f"{p}self_attn.o_proj.weight"),
        o_bias=w.pop(f"{p}self_attn.o_proj.bias", None),
        gate_up=cat("mlp", ["gate_proj", "up_proj"], "weight"),
        gate_up_bias=cat("mlp", ["gate_proj", "up_proj"], "bias"),
        down=w.pop(f"{p}mlp.down_proj.weight"),
        down_bias=w.pop(f"{p}mlp.down_proj.bias", None),
    )
