"""Reading a Hugging Face Llama checkpoint folder: safetensors (single or sharded), and its fingerprint.

The TEE and the server each open the folder they were given; neither takes weights from the other.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tsqp.errors import ModelError
from tsqp.model.config import LlamaConfig, read_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FINGERPRINT_SAMPLES = 64  # strided 4 KiB samples per file: different weights of one shape differ here
_SAMPLE_BYTES = 4096


class Checkpoint:
    """A model folder: its config and a map from tensor name to the safetensors file holding it."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.config = LlamaConfig.from_model_dir(self.dir)
        self.files = self._weight_files()
        self.where: dict[str, Path] = {}
        for path in self.files:
            for name in _header(path):
                self.where[name] = path

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
        """Yields (name, tensor) one at a time, in file order; a missing name is a ModelError.

        Each tensor is read through its own opening of the file: safetensors maps the whole file, and
        every page read stays in the process's resident set while the mapping lives (the TEE's peak RSS
        held a whole 1 GB shard while the verification keys were computed)."""
        names = list(names)
        for name in names:
            if name not in self.where:
                raise ModelError(f"{self.dir} has no tensor {name!r}: is the checkpoint complete?")
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.where[name], []).append(name)
        for path, group in by_file.items():
            try:
                for name in group:
                    with safe_open(path, framework="pt") as handle:
                        tensor = handle.get_tensor(name)
                    yield name, tensor
            except (SafetensorError, OSError) as exc:
                raise ModelError(f"cannot read {path}: {exc}") from None

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


def _header(path: Path) -> dict:
    try:
        with path.open("rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) != 8:
                raise ValueError("file is shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not a valid safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def norm_weight_names(config: LlamaConfig) -> list[str]:
    """The only weights the TEE holds: RMSNorm gains."""
    names = []
    for layer in range(config.num_layers):
        names += [
            layer_prefix(layer) + "input_layernorm.weight",
            layer_prefix(layer) + "post_attention_layernorm.weight",
        ]
    return names + ["model.norm.weight"]
