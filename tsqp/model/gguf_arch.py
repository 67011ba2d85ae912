"""What differs between llama.cpp's architectures when a GGUF becomes a Hugging Face folder.

Each architecture `general.architecture` names is a `Family`: the transformers class its config.json
declares (built from the `{arch}.*` metadata keys), the ggml names of a layer's tensors, whether
llama.cpp permuted the rows of q and k (its converter does so for `llama` only: the others' rope
kernel rotates halves, as transformers does) and whether it stored norm weights shifted by one (Gemma
computes x * (1 + w) and llama.cpp's converter stores 1 + w). Any other architecture is refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tsqp.errors import ModelError

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_LAYER = {
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
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA3_LAYER = {
    **_LLAMA_LAYER,
    **_QK_NORMS,
    "post_attention_norm": "post_attention_layernorm",  # after attention, before the residual add
    "ffn_norm": "pre_feedforward_layernorm",  # gemma's ffn_norm is the MLP's input norm
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_IGNORED = re.compile(r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd(\.weight)?")  # rope tables, handled in config
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # llama.cpp's fixed rope base of gemma3's sliding-window layers
GEMMA3_WINDOW_PATTERN = 6  # llama.cpp: every sixth gemma3 layer attends globally, the rest in the window


@dataclass(frozen=True)
class Family:
    """One llama.cpp architecture's mapping onto one transformers class."""

    label: str  # how refusals name the model
    layer_tensors: dict[str, str]  # ggml stem in blk.N -> transformers name in model.layers.N
    permuted_qk: bool  # llama.cpp interleaved each head's two rotary halves in the rows of q and k
    norm_offset: float  # llama.cpp stored every norm weight plus this
    config: Callable[[Path, dict[str, Any], dict], dict[str, Any]]


class _Keys:
    """The `{arch}.*` metadata values, each checked to be a positive number."""

    def __init__(self, path: Path, meta: dict[str, Any], arch: str):
        self.path, self.meta, self.arch = path, meta, arch

    def __call__(self, name: str, default: Any = None, kind: type = int) -> Any:
        value = self.meta.get(f"{self.arch}.{name}", default)
        if isinstance(value, bool) or not isinstance(value, kind if kind is int else (int, float)) or value <= 0:
            raise ModelError(f"{self.path} has no usable {self.arch}.{name} in its metadata (found {value!r:.60})")
        return value

    def optional(self, name: str, kind: type = float) -> Any:
        return None if f"{self.arch}.{name}" not in self.meta else self(name, kind=kind)


def _common(path: Path, meta: dict[str, Any], tensors: dict, arch: str) -> tuple[_Keys, dict[str, Any]]:
    """The fields every family shares, read from the `{arch}.*` keys: sizes, heads, norms, rope base, tokens."""
    key = _Keys(path, meta, arch)
    if meta.get(f"{arch}.expert_count"):
        raise ModelError(f"{path} is a mixture-of-experts model: TSQP runs dense models only")
    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", key("rope.dimension_count", hidden // heads))
    if key("attention.value_length", head_dim) != head_dim:
        raise ModelError(f"{path} has keys and values of different widths, which TSQP does not run")
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ModelError(f"{path} rotates part of each head: TSQP applies rope to whole heads only")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    return key, {
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
        "tie_word_embeddings": "output.weight" not in tensors,  # llama.cpp omits the head when it is the embedding
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": _storage_dtype(tensors),
    }


def _llama(path: Path, meta: dict[str, Any], tensors: dict) -> dict[str, Any]:
    """Llama, or Mistral when the file has a sliding window (llama.cpp files Mistral as llama; without a
    window the two are the same model)."""
    key, fields = _common(path, meta, tensors, "llama")
    window = key.optional("attention.sliding_window", kind=int)
    config = {
        "architectures": ["MistralForCausalLM" if window else "LlamaForCausalLM"],
        "model_type": "mistral" if window else "llama",
        "hidden_act": "silu",
        **fields,
        "attention_bias": _has_biases(path, tensors, ("attn_q", "attn_k", "attn_v", "attn_output")),
        "mlp_bias": _has_biases(path, tensors, ("ffn_gate", "ffn_up", "ffn_down")),
    }
    if window:
        if config["attention_bias"] or config["mlp_bias"]:
            raise ModelError(f"{path} has a sliding window and biases: neither a Llama nor a Mistral layout")
        config["sliding_window"] = window
    scaling = _rope_scaling(path, meta, tensors, config, "llama")
    if scaling:
        config["rope_scaling"] = scaling
    return config


def _qwen(arch: str) -> Callable[[Path, dict[str, Any], dict], dict[str, Any]]:
    """Qwen2/2.5 (biases on q, k and v) or Qwen3 (no biases, per-head RMSNorm of q and k)."""

    def config(path: Path, meta: dict[str, Any], tensors: dict) -> dict[str, Any]:
        _, fields = _common(path, meta, tensors, arch)
        if arch == "qwen2" and fields["head_dim"] != fields["hidden_size"] // fields["num_attention_heads"]:
            raise ModelError(f"{path} has heads of {fields['head_dim']}, which Qwen2's config cannot state")
        out = {
            "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "Qwen3ForCausalLM"],
            "model_type": arch,
            "hidden_act": "silu",
            **fields,
            "attention_bias": False,  # Qwen2's q, k and v biases are fixed by its class, not by this field
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": fields["num_hidden_layers"],
        }
        if arch == "qwen2":
            del out["head_dim"], out["attention_bias"]
        scaling = _rope_scaling(path, meta, tensors, out, arch)
        if scaling:
            out["rope_scaling"] = scaling
        return out

    return config


def _gemma3(path: Path, meta: dict[str, Any], tensors: dict) -> dict[str, Any]:
    """Gemma 3 text, in the spelling of Google's config.json (rope_theta for the global layers,
    rope_local_base_freq for the windowed ones) and transformers v5's per-layer-type rope_parameters.

    llama.cpp's metadata gives the window but neither the pattern nor the windowed layers' rope base nor
    the query scale: it fixes them in code, and the same values are written here (the query scale is
    hidden / heads for the 62-layer 27B, the head width otherwise)."""
    key, fields = _common(path, meta, tensors, "gemma3")
    layers, heads = fields["num_hidden_layers"], fields["num_attention_heads"]
    pattern = meta.get("gemma3.attention.sliding_window_pattern", GEMMA3_WINDOW_PATTERN)
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise ModelError(f"{path} has a sliding-window pattern of {len(pattern)} layers, not {layers}")
        windowed = [bool(p) for p in pattern]
    else:
        windowed = [pattern == 0 or i % pattern < pattern - 1 for i in range(layers)]
    scaling = _rope_scaling(path, meta, tensors, fields, "gemma3")
    global_rope = {"rope_type": "default", "rope_theta": fields["rope_theta"], **(scaling or {})}
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        **fields,
        "rope_local_base_freq": GEMMA3_LOCAL_ROPE_BASE,
        "rope_scaling": scaling,  # Gemma 3 scales the global layers' rope only
        "rope_parameters": {
            "full_attention": global_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE_BASE},
        },
        "sliding_window": key("attention.sliding_window"),
        "layer_types": ["sliding_attention" if w else "full_attention" for w in windowed],
        "query_pre_attn_scalar": fields["hidden_size"] // heads if layers == 62 else fields["head_dim"],
        "attn_logit_softcapping": key.optional("attn_logit_softcapping"),
        "final_logit_softcapping": key.optional("final_logit_softcapping"),
        "attention_bias": False,
        "use_bidirectional_attention": False,
    }


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama", _LLAMA_LAYER, permuted_qk=True, norm_offset=0.0, config=_llama),
    "qwen2": Family("Qwen2", _LLAMA_LAYER, permuted_qk=False, norm_offset=0.0, config=_qwen("qwen2")),
    "qwen3": Family("Qwen3", _LLAMA_LAYER | _QK_NORMS, permuted_qk=False, norm_offset=0.0, config=_qwen("qwen3")),
    "gemma3": Family("Gemma 3", _GEMMA3_LAYER, permuted_qk=False, norm_offset=1.0, config=_gemma3),
}


def family(path: Path, meta: dict[str, Any]) -> tuple[str, Family]:
    """(architecture, its Family); a ModelError in one line for any architecture not mapped."""
    arch = meta.get("general.architecture")
    if arch not in FAMILIES:
        names = ", ".join(repr(name) for name in FAMILIES)
        raise ModelError(f"{path} holds a {arch!r} model: TSQP converts GGUF files of architecture {names} only")
    return arch, FAMILIES[arch]


def _has_biases(path: Path, tensors: dict, kinds: tuple[str, ...]) -> bool:
    """Whether these projections carry biases: all of them in every layer, or none (Llama has no other shape)."""
    found = {name for name in tensors if _LAYER_NAME.fullmatch(name) and name.endswith(".bias")}
    found = {name for name in found if name.split(".")[2] in kinds}
    layers = {name.split(".")[1] for name in tensors if name.startswith("blk.")}
    if found and len(found) != len(kinds) * len(layers):
        raise ModelError(f"{path} has biases on only some of {', '.join(kinds)}: not a Llama layout")
    return bool(found)


def _storage_dtype(tensors: dict) -> str:
    """float16 or bfloat16 when every matrix was stored so; float32 when any was F32 or quantized."""
    kinds = {t.tensor_type.name for t in tensors.values() if len(t.shape) > 1}
    if kinds == {"F16"}:
        return "float16"
    return "bfloat16" if kinds == {"BF16"} else "float32"


def _rope_scaling(path: Path, meta: dict[str, Any], tensors: dict, config: dict, arch: str) -> dict | None:
    """rope_scaling from {arch}.rope.scaling.*, or the llama3 scaling that llama.cpp stores as rope_freqs.weight."""
    kind, factor = meta.get(f"{arch}.rope.scaling.type"), meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and f"{arch}.rope.scale_linear" in meta:  # the key older files used
        kind, factor = "linear", meta[f"{arch}.rope.scale_linear"]
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
        "original_max_position_embeddings": int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192)),
    }
    llama3 = arch == "llama" and found.shape == (config["head_dim"] // 2,)  # Meta's scaling, filed as llama only
    if not llama3 or not torch.allclose(found, _llama3_factors(config, scaling)):
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


def hf_name(path: Path, fam: Family, name: str, layers: int) -> str | None:
    """The transformers name of a llama.cpp tensor; None for the rope tables the config already covers."""
    if _IGNORED.fullmatch(name):
        return None
    stem, _, suffix = name.rpartition(".")
    if stem in _GLOBAL_TENSORS and suffix == "weight":
        return f"{_GLOBAL_TENSORS[stem]}.weight"
    match = _LAYER_NAME.fullmatch(name)
    if match and int(match[1]) < layers and match[2] in fam.layer_tensors and not (suffix == "bias" and "norm" in stem):
        return f"model.layers.{match[1]}.{fam.layer_tensors[match[2]]}.{suffix}"
    raise ModelError(f"{path} holds a tensor {name!r} that has no place in a {fam.label} model")


def _biased(config: dict) -> tuple[str, ...]:
    """The projections that carry a bias: Qwen2's q, k and v by its class, others as config.json says."""
    if config["model_type"] == "qwen2":
        return _ATTENTION[:3]
    return _ATTENTION * bool(config.get("attention_bias")) + _MLP * bool(config.get("mlp_bias"))


def expected_shapes(config: dict, fam: Family) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, in transformers' names and shapes."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, h)
    matrices = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
    matrices |= {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    biased = _biased(config)
    for i in range(config["num_hidden_layers"]):
        for module in fam.layer_tensors.values():
            kind = module.rpartition(".")[2]
            name = f"model.layers.{i}.{module}"
            shapes[f"{name}.weight"] = matrices.get(kind) or ((head_dim,) if kind in ("q_norm", "k_norm") else (h,))
            if kind in biased:
                shapes[f"{name}.bias"] = matrices[kind][:1]
    return shapes
