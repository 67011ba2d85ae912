"""A GGUF file (llama.cpp's format) turned into a Hugging Face model folder in the cache, once.

Both sides read model folders (config.json, safetensors, tokenizer.json), so a GGUF is converted rather
than read in place, and the TEE and the server each convert the file they were given. The folder is named
by the file's sha256, written into a staging folder beside it and renamed into place only once complete
(config.json last), so a refused, truncated or interrupted file leaves nothing that looks like a model.

llama.cpp's converter changes up to four things that are undone here: the tensor names, the order of
the dimensions (ggml lists them fastest-moving first, torch the other way round), for `llama` the order of
the rows of q and k (it interleaves the two rotary halves of each head for its own rope kernel), and for
`gemma3` the norm weights (stored as 1 + w). What differs by architecture lives in `gguf_arch`. Quantized
tensors are dequantized to float32 by gguf's own code, so every weight equals what transformers' GGUF
loader produces.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from safetensors.torch import save_file

from tsqp.errors import ModelError
from tsqp.model.checkpoint import INDEX_FILE, SINGLE_FILE
from tsqp.model.fetch import cache_root, sha256_file
from tsqp.model.gguf_arch import Family, expected_shapes, family, hf_name
from tsqp.model.gguf_tokenizer import write_tokenizer
from tsqp.model.presets import SHARD_BYTES

GGUF_MAGIC = b"GGUF"  # a GGUF file's first four bytes
_DIGEST_CHARS = 16  # 64 bits of sha256 name the cache folder
_DEQUANTIZE_BYTES = 64 << 20  # float32 rows dequantized at a time


def gguf_model_dir(path: Path, progress: bool = True) -> Path:
    """The converted folder of a GGUF file in the cache, written on first use; a ModelError if it cannot be."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file: it does not start with the GGUF magic bytes")
    root = cache_root() / "gguf"
    console = Console(stderr=True)  # stdout may be the generated text; a pipe gets no bar at all
    with Progress(console=console, transient=True, disable=not (progress and console.is_terminal)) as bar:
        folder = root / _sha256(path, bar)[:_DIGEST_CHARS]
        if not (folder / "config.json").is_file():
            _convert(path, folder, bar)
    return folder


def is_gguf(path: Path) -> bool:
    """Whether path starts like a GGUF file (an unreadable one does not)."""
    try:
        with path.open("rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _sha256(path: Path, bar: Progress) -> str:
    task = bar.add_task(f"hashing {path.name}", total=path.stat().st_size)
    return sha256_file(path, lambda n: bar.advance(task, n))


def _convert(path: Path, folder: Path, bar: Progress) -> None:
    reader, meta = _read(path)
    tensors = {t.name: t for t in reader.tensors}
    fam = family(path, meta)[1]
    config = fam.config(path, meta, tensors)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as exc:
        raise ModelError(f"cannot write the converted model under {folder.parent}: {exc.strerror or exc}") from None
    try:
        write_tokenizer(staging, path, meta, config)
        _write_weights(staging, path, tensors, config, fam, bar)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        try:
            if folder.exists() and not (folder / "config.json").is_file():  # unfinished, never left by this code
                shutil.rmtree(folder)
            staging.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # else another process converting the file finished first
                raise
    except OSError as exc:
        raise ModelError(f"cannot write the converted model to {folder}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read(path: Path):
    """(GGUFReader, {key: value}); any damage the reader trips over becomes one ModelError line.

    The reader maps the file and shapes each tensor's view of it, so one that runs past the end of the file
    fails there (a short view cannot take the tensor's shape) before anything is converted."""
    from gguf import GGUFReader  # imported here: it takes a quarter of a second and only conversion needs it

    try:
        reader = GGUFReader(path)
        meta = {key: field.contents() for key, field in reader.fields.items()}
        reader.fields.clear()  # a view per array element (a million for a 262k vocabulary): gone before the weights
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, UnicodeDecodeError, MemoryError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise ModelError(f"{path} is truncated or not a valid GGUF file ({type(exc).__name__}: {detail})") from None
    return reader, meta


def _write_weights(folder: Path, path: Path, tensors: dict, config: dict, fam: Family, bar: Progress) -> None:
    """The weights as safetensors, one shard in memory at a time, sharded like presets.write_weights."""
    names = {t: hf_name(path, fam, t, config["num_hidden_layers"]) for t in tensors}
    names = {gguf_name: hf for gguf_name, hf in names.items() if hf}
    expected = expected_shapes(config, fam)
    for gguf_name, hf in names.items():
        shape = tuple(reversed(tensors[gguf_name].shape.tolist()))
        if hf not in expected:
            raise ModelError(f"{path} holds a tensor {gguf_name!r} that has no place in a {fam.label} model")
        if expected[hf] != shape:
            raise ModelError(f"{path}: tensor {gguf_name!r} has shape {shape}, the metadata says {expected[hf]}")
    missing = sorted(set(expected) - set(names.values()))
    if missing:
        raise ModelError(f"{path} lacks {len(missing)} tensor(s) of a {fam.label} model, among them {missing[0]!r}")
    sizes = {g: tensors[g].n_elements * (2 if tensors[g].tensor_type.name in ("F16", "BF16") else 4) for g in names}
    shards: list[list[str]] = [[]]
    filled = 0
    for gguf_name in names:  # planned before any is read, so each shard's file name knows the count
        if filled + sizes[gguf_name] > SHARD_BYTES and shards[-1]:
            shards.append([])
            filled = 0
        shards[-1].append(gguf_name)
        filled += sizes[gguf_name]
    task = bar.add_task(f"converting {path.name}", total=len(names))
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        weights = {}
        for gguf_name in shard:
            weights[names[gguf_name]] = _tensor(path, tensors[gguf_name], config, fam)
            weight_map[names[gguf_name]] = file
            bar.advance(task)
        save_file(weights, folder / file, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _dequantized(tensor) -> torch.Tensor:
    """A quantized tensor in float32, dequantized a block of rows at a time into one buffer (gguf's own
    dequantize of the whole tensor holds about twice its float32 size while it works: 1.3 GB for Gemma's
    embedding). Rows are independent, so the values are those of the whole tensor's dequantization."""
    from gguf.quants import dequantize

    data = tensor.data
    if data.ndim != 2:
        return torch.from_numpy(dequantize(data, tensor.tensor_type))
    first = dequantize(data[:1], tensor.tensor_type)
    out = torch.empty((data.shape[0], first.shape[-1]), dtype=torch.float32)
    step = max(1, _DEQUANTIZE_BYTES // (4 * first.shape[-1]))
    for start in range(0, data.shape[0], step):
        out[start : start + step] = torch.from_numpy(dequantize(data[start : start + step], tensor.tensor_type))
    return out


def _tensor(path: Path, tensor, config: dict, fam: Family) -> torch.Tensor:
    """One tensor in torch's shape and transformers' row order and values: F16/BF16 kept, everything else
    float32 (a norm llama.cpp shifted by one is shifted back in float32, as transformers' loader does)."""
    shape = tuple(reversed(tensor.shape.tolist()))
    kind = tensor.tensor_type.name
    if kind == "F16":
        weight = torch.from_numpy(np.array(tensor.data))
    elif kind == "BF16":  # numpy has no bfloat16: the reader hands over the raw bytes
        weight = torch.from_numpy(np.array(tensor.data)).view(torch.bfloat16)
    elif kind == "F32":
        weight = torch.from_numpy(np.array(tensor.data))  # a copy: the reader's data is a view of the mapped file
    else:
        try:
            weight = _dequantized(tensor)
        except NotImplementedError:
            raise ModelError(f"{path}: tensor {tensor.name!r} is stored as {kind}, which TSQP cannot convert") from None
    weight = weight.reshape(shape)
    if fam.norm_offset and tensor.name.endswith("norm.weight"):
        weight = weight.float() - fam.norm_offset
    if fam.permuted_qk and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
        # llama.cpp stored each head's rows as (head_dim/2, 2) pairs; transformers wants (2, head_dim/2) halves
        heads = config["num_attention_heads"] if ".attn_q." in tensor.name else config["num_key_value_heads"]
        weight = weight.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)
    return weight.contiguous()
