"""Checkpoint.tensors reads each tensor's bytes at its header's offsets (no mapping): the same tensors
safetensors reads, in every dtype, single and sharded; a malformed or truncated file is a ModelError."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tsqp.errors import ModelError
from tsqp.model.checkpoint import SAFETENSORS_DTYPES, Checkpoint


def test_reads_what_safetensors_reads(checkpoints):
    for model in (checkpoints("ckpt-single", seed=3), checkpoints("ckpt-sharded", seed=4, shard=True)):
        checkpoint = Checkpoint(model)
        assert len(checkpoint.files) >= 1 and checkpoint.where
        read = dict(checkpoint.tensors(checkpoint.where))
        for path in checkpoint.files:
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    assert read[name].dtype == handle.get_tensor(name).dtype
                    assert torch.equal(read[name], handle.get_tensor(name)), name


def test_every_dtype_and_empty_tensors(tmp_path, checkpoints):
    model = checkpoints("ckpt-dtypes", seed=5)
    folder = tmp_path / "dtypes"
    folder.mkdir()
    (folder / "config.json").write_text((model / "config.json").read_text())
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"t.{name}": (torch.randn(3, 5, generator=generator) * 50).to(dtype)
        for name, dtype in SAFETENSORS_DTYPES.items()
    }
    tensors["t.empty"] = torch.empty(0, 4)
    save_file(tensors, folder / "model.safetensors")
    read = dict(Checkpoint(folder).tensors(tensors))
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


def write_raw(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "entry, data, message",
    [
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, b"\0" * 8, "truncated"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}, b"\0" * 16, "malformed"),
        ({"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}, b"\0" * 8, "malformed"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, b"\0" * 8, "malformed"),
        ({"dtype": "F32", "shape": [2], "data_offsets": "0-8"}, b"\0" * 8, "malformed"),
        ("not an entry", b"", "malformed"),
    ],
)
def test_a_bad_header_entry_is_a_model_error(tmp_path, checkpoints, entry, data, message):
    model = checkpoints("ckpt-bad", seed=6)
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text((model / "config.json").read_text())
    write_raw(folder / "model.safetensors", {"w": entry}, data)
    with pytest.raises(ModelError, match=message):
        Checkpoint(folder).tensor("w")
