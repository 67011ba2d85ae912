"""A GGUF file (llama.cpp's format) turned into a Hugging Face model folder in the cache, once.

Both sides read model folders (config.json, safetensors, tokenizer.json), so a GGUF is converted rather
than read in place, and the TEE and the server each convert the file they were given. The folder is named
by the file's sha256, written into a staging folder beside it and renamed into place only once complete
(config.json last), so a refused, truncated or interrupted file leaves nothing that looks like a model.

llama.cpp's converter changes three things that are undone here: the tensor names, the order of the
dimensions (ggml lists them fastest-moving first, torch the other way round) and the order of the rows of
q and k (it interleaves the two rotary halves of each head for its own rope kernel). Quantized tensors are
dequantized to float32 by gguf's own code, so every weight equals what transformers' GGUF loader produces.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from safetensors.torch import save_file

from tsqp.errors import ModelError
from tsqp.model.checkpoint import INDEX_FILE, SINGLE_FILE
from tsqp.model.fetch import cache_root, sha256_file
from tsqp.model.gguf_tokenizer import write_tokenizer
from tsqp.model.presets import SHARD_BYTES

GGUF_MAGIC = b"GGUF"  # a GGUF file's first four bytes
_DIGEST_CHARS = 16  # 64 bits of sha256 name the cache folder
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_IGNORED = re.compile(r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd(\.weight)?")  # rope tables, handled in config


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
    config = _config(path, meta, tensors)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as exc:
        raise ModelError(f"cannot write the converted model under {folder.parent}: {exc.strerror or exc}") from None
    try:
        write_tokenizer(staging, path, meta, config)
        _write_weights(staging, path, tensors, config, bar)
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
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, UnicodeDecodeError, MemoryError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise ModelError(f"{path} is truncated or not a valid GGUF file ({type(exc).__name__}: {detail})") from None
    return reader, meta


def _config(path: Path, meta: dict[str, Any], tensors: dict) -> dict[str, Any]:
    """config.json from llama.cpp's metadata keys, and from which tensors the file holds."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelError(f"{path} holds a {arch!r} model: TSQP converts GGUF files of architecture 'llama' only")

    def key(name: str, default: Any = None, kind: type = int) -> Any:
        value = meta.get(f"llama.{name}", default)
        if isinstance(value, bool) or not isinstance(value, kind if kind is int else (int, float)) or value <= 0:
            raise ModelError(f"{path} has no usable llama.{name} in its metadata (found {value!r:.60})")
        return value

    if meta.get("llama.expert_count"):
        raise ModelError(f"{path} is a mixture-of-experts model: TSQP runs dense Llama models only")
    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", key("rope.dimension_count", hidden // heads))
    if key("attention.value_length", head_dim) != head_dim:
        raise ModelError(f"{path} has keys and values of different widths, which Llama does not")
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ModelError(f"{path} rotates part of each head: TSQP applies rope to whole heads only")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    names = set(tensors)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", kind=float),
        "rope_theta": key("rope.freq_base", 10000.0, kind=float),
        "max_position_embeddings": key("context_length", 2048),
        "vocab_size": key("vocab_size", len(tokens) or None),
        "tie_word_embeddings": "output.weight" not in names,  # llama.cpp omits the head when it is the embedding
        "attention_bias": _has_biases(path, names, ("attn_q", "attn_k", "attn_v", "attn_output")),
        "mlp_bias": _has_biases(path, names, ("ffn_gate", "ffn_up", "ffn_down")),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": _storage_dtype(tensors),
    }
    scaling = _rope_scaling(path, meta, tensors, config)
    if scaling:
        config["rope_scaling"] = scaling
    return config


def _has_biases(path: Path, names: set[str], kinds: tuple[str, ...]) -> bool:
    """Whether these projections carry biases: all of them in every layer, or none (Llama has no other shape)."""
    found = {name for name in names if _LAYER_NAME.fullmatch(name) and name.endswith(".bias")}
    found = {name for name in found if name.split(".")[2] in kinds}
    layers = {name.split(".")[1] for name in names if name.startswith("blk.")}
    if found and len(found) != len(kinds) * len(layers):
        raise ModelError(f"{path} has biases on only some of {', '.join(kinds)}: not a Llama layout")
    return bool(found)


def _storage_dtype(tensors: dict) -> str:
    """float16 or bfloat16 when every matrix was stored so; float32 when any was F32 or quantized."""
    kinds = {t.tensor_type.name for t in tensors.values() if len(t.shape) > 1}
    if kinds == {"F16"}:
        return "float16"
    return "bfloat16" if kinds == {"BF16"} else "float32"


def _rope_scaling(path: Path, meta: dict[str, Any], tensors: dict, config: dict) -> dict | None:
    """rope_scaling from llama.rope.scaling.*, or the llama3 scaling that llama.cpp stores as rope_freqs.weight."""
    kind, factor = meta.get("llama.rope.scaling.type"), meta.get("llama.rope.scaling.factor")
    if kind is None and "llama.rope.scale_linear" in meta:  # the key older files used
        kind, factor = "linear", meta["llama.rope.scale_linear"]
    if kind == "linear" and factor not in (None, 1.0):
        return {"rope_type": "linear", "factor": float(factor)}
    if kind not in (None, "none", "linear"):
        raise ModelError(f"{path} uses rope scaling {kind!r}: TSQP supports linear and llama3 rope scaling only")
    if "rope_freqs.weight" not in tensors:
        return None
    from gguf.quants import dequantize

    table = tensors["rope_freqs.weight"]
    found = torch.from_numpy(np.array(dequantize(table.data, table.tensor_type)))
    if torch.all(found == 1):
        return None
    # llama.cpp divides each rotary frequency by these factors; Meta's llama3 scaling is the one known source.
    scaling = {
        "rope_type": "llama3",
        "factor": float(found.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": int(meta.get("llama.rope.scaling.original_context_length", 8192)),
    }
    if found.shape != (config["head_dim"] // 2,) or not torch.allclose(found, _llama3_factors(config, scaling)):
        raise ModelError(f"{path} scales rope frequencies by a rope_freqs.weight TSQP cannot express as llama3 scaling")
    return scaling


def _llama3_factors(config: dict, scaling: dict) -> torch.Tensor:
    """The per-frequency divisors of Meta's llama3 rope scaling, as llama.cpp's converter computes them."""
    dim = config["head_dim"]
    freqs = 1.0 / config["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    context, low, high, factor = (
        scaling[k] for k in ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "factor")
    )
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    middle = 1 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelen > context / low, torch.full_like(freqs, factor), middle)
    return torch.where(wavelen < context / high, torch.ones_like(freqs), factors).float()


def _hf_name(path: Path, name: str, layers: int) -> str | None:
    """The transformers name of a llama.cpp tensor; None for the rope tables the config already covers."""
    if _IGNORED.fullmatch(name):
        return None
    stem, _, suffix = name.rpartition(".")
    if stem in _GLOBAL_TENSORS and suffix == "weight":
        return f"{_GLOBAL_TENSORS[stem]}.weight"
    match = _LAYER_NAME.fullmatch(name)
    if match and int(match[1]) < layers and match[2] in _LAYER_TENSORS and not (suffix == "bias" and "norm" in stem):
        return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.{suffix}"
    raise ModelError(f"{path} holds a tensor {name!r} that has no place in a Llama model")


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, h)
    layer = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
    mlp = {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        shapes |= {f"{p}self_attn.{k}.weight": s for k, s in layer.items()}
        shapes |= {f"{p}mlp.{k}.weight": s for k, s in mlp.items()}
        if config["attention_bias"]:
            shapes |= {f"{p}self_attn.{k}.bias": s[:1] for k, s in layer.items()}
        if config["mlp_bias"]:
            shapes |= {f"{p}mlp.{k}.bias": s[:1] for k, s in mlp.items()}
    return shapes


def _write_weights(folder: Path, path: Path, tensors: dict, config: dict, bar: Progress) -> None:
    """The weights as safetensors, one shard in memory at a time, sharded like presets.write_weights."""
    names = {t: _hf_name(path, t, config["num_hidden_layers"]) for t in tensors}
    names = {gguf_name: hf for gguf_name, hf in names.items() if hf}
    expected = _expected_shapes(config)
    for gguf_name, hf in names.items():
        shape = tuple(reversed(tensors[gguf_name].shape.tolist()))
        if expected.get(hf, shape) != shape:
            raise ModelError(f"{path}: tensor {gguf_name!r} has shape {shape}, the metadata says {expected[hf]}")
    missing = sorted(set(expected) - set(names.values()))
    if missing:
        raise ModelError(f"{path} lacks {len(missing)} tensor(s) of a Llama model, among them {missing[0]!r}")
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
            weights[names[gguf_name]] = _tensor(path, tensors[gguf_name], config)
            weight_map[names[gguf_name]] = file
            bar.advance(task)
        save_file(weights, folder / file, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _tensor(path: Path, tensor, config: dict) -> torch.Tensor:
    """One tensor in torch's shape and transformers' row order: F16/BF16 kept, everything else float32."""
    from gguf.quants import dequantize

    shape = tuple(reversed(tensor.shape.tolist()))
    kind = tensor.tensor_type.name
    if kind == "F16":
        weight = torch.from_numpy(np.array(tensor.data))
    elif kind == "BF16":  # numpy has no bfloat16: the reader hands over the raw bytes
        weight = torch.from_numpy(np.array(tensor.data)).view(torch.bfloat16)
    else:
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise ModelError(f"{path}: tensor {tensor.name!r} is stored as {kind}, which TSQP cannot convert") from None
        weight = torch.from_numpy(np.array(values) if kind == "F32" else values)  # F32: a view of the mapped file
    weight = weight.reshape(shape)
    if ".attn_q." in tensor.name or ".attn_k." in tensor.name:
        # llama.cpp stored each head's rows as (head_dim/2, 2) pairs; transformers wants (2, head_dim/2) halves
        heads = config["num_attention_heads"] if ".attn_q." in tensor.name else config["num_key_value_heads"]
        weight = weight.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)
    return weight.contiguous()
