"""Reading a Hugging Face checkpoint folder: safetensors (single or sharded), and its fingerprint.

The TEE and the server each open the folder they were given; neither takes weights from the other.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from tsqp.errors import ModelError
from tsqp.model.config import ModelConfig, read_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FINGERPRINT_SAMPLES = 64  # strided 4 KiB samples per file: different weights of one shape differ here
_SAMPLE_BYTES = 4096
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class Checkpoint:
    """A model folder: its config and a map from tensor name to the safetensors file holding it."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.config = ModelConfig.from_model_dir(self.dir)
        self.files = self._weight_files()
        self.where: dict[str, Path] = {}
        self.entries: dict[str, tuple[int, dict]] = {}  # name -> (where the file's data starts, header entry)
        for path in self.files:
            data_start, header = _header(path)
            for name, entry in header.items():
                self.where[name] = path
                self.entries[name] = (data_start, entry)

    def _weight_files(self) -> list[Path]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelError(f"{index} has no weight_map")
            files = sorted({self.dir / str(name) for name in weight_map.values()})
        elif (self.dir / SINGLE_FILE).is_file():
            files = [self.dir / SINGLE_FILE]
        else:
            raise ModelError(f"{self.dir} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
        for path in files:
            if not path.is_file():
                raise ModelError(f"{path} is listed in {INDEX_FILE} but missing")
        return files

    def has(self, name: str) -> bool:
        return name in self.where

    def tensors(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (name, tensor) one at a time, grouped by file in the order asked; a missing name is a
        ModelError.

        Each tensor's bytes are read from the file at the offsets its header gives, nothing mapped: a
        safetensors mapping of the whole file kept every page read resident (the TEE's peak RSS held a
        1 GB shard while it computed the verification keys), and in an SGX enclave mapping a trusted file
        copies all of it into enclave memory, where a read brings in only the bytes asked for."""
        names = list(names)
        for name in names:
            if name not in self.where:
                raise ModelError(f"{self.dir} has no tensor {name!r}: is the checkpoint complete?")
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.where[name], []).append(name)
        for path, group in by_file.items():
            try:
                with path.open("rb") as handle:
                    for name in group:
                        yield name, _read_tensor(handle, path, name, self.entries[name])
            except OSError as exc:
                raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None

    def tensor(self, name: str) -> torch.Tensor:
        return next(self.tensors([name]))[1]

    def fingerprint(self) -> str:
        """sha256 over config.json, every safetensors header and strided samples of the weight bytes.

        It tells two checkpoints apart (another model, another seed, another dtype) without hashing
        gigabytes on every start. It is a guard against running with the wrong model, not an integrity
        proof: a lying server can report any fingerprint; verified mode checks the results themselves.
        """
        digest = hashlib.sha256((self.dir / "config.json").read_bytes())
        for path in self.files:
            size = path.stat().st_size
            with path.open("rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                digest.update(handle.read(header_len))
                data_start = 8 + header_len
                span = max(size - data_start - _SAMPLE_BYTES, 0)
                for i in range(_FINGERPRINT_SAMPLES):
                    handle.seek(data_start + span * i // max(_FINGERPRINT_SAMPLES - 1, 1))
                    digest.update(handle.read(_SAMPLE_BYTES))
        return digest.hexdigest()


def _header(path: Path) -> tuple[int, dict]:
    """(where the tensor data starts, the header's entries by name) of a safetensors file."""
    try:
        with path.open("rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) != 8:
                raise ValueError("file is shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(handle.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not a valid safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return 8 + header_len, header


def _read_tensor(handle, path: Path, name: str, entry: tuple[int, dict]) -> torch.Tensor:
    """One tensor read from an open safetensors file, its header entry checked against the file."""
    data_start, info = entry
    dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
    shape, offsets = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
    well_formed = (
        dtype is not None
        and isinstance(shape, list)
        and all(isinstance(d, int) and d >= 0 for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and o >= 0 for o in offsets)
    )
    if not well_formed or offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
        raise ModelError(f"{path}: the header entry of {name!r} is malformed: {info!r:.200}")
    raw = torch.empty(offsets[1] - offsets[0], dtype=torch.uint8)
    handle.seek(data_start + offsets[0])
    if handle.readinto(raw.numpy()) != raw.numel():
        raise ModelError(f"{path} is truncated: {name!r} ends past the end of the file")
    return raw.view(dtype).view(shape)


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def norm_weight_names(config: ModelConfig) -> list[str]:
    """The only weights the TEE holds: RMSNorm gains (the family's per layer, q/k norms too, and the final one)."""
    family, names = config.family, []
    per_layer = [f"{norm}.weight" for norm in family.layer_norms()]
    if family.qk_norm:
        per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    for layer in range(config.num_layers):
        names += [layer_prefix(layer) + name for name in per_layer]
    return names + ["model.norm.weight"]
