"""What differs between the model families the TEE runs: one declared `Family` per checkpoint, and the
config.json readers the family modules (tsqp/model/families/) share.

A family is a LLaMA-shaped decoder (embedding, layers of attention then a gated MLP, final norm, LM head)
with a few declared differences; the TEE's forward pass (tsqp/tee/forward.py) reads them from here and
never asks which family it runs. The server serves linears and attention products whatever the family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsqp.errors import ModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # the gated MLP's act(gate) * up; tee/forward.py has the functions
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Rope:
    """One rotary embedding: base, type (one of SUPPORTED_ROPE_TYPES) and the type's numeric parameters."""

    theta: float
    type: str = "default"
    params: tuple[tuple[str, float], ...] = ()  # factor, low/high_freq_factor, original_max_position_embeddings

    def param(self, name: str) -> float:
        return dict(self.params)[name]


@dataclass(frozen=True)
class Family:
    """The declared differences of one checkpoint's family from the LLaMA layer.

    Per layer: x += norm_attn_out(attention(norm_attn_in(x))); x += norm_mlp_out(down(act(gate) * up)) of
    norm_mlp_in(x); a norm named None is the identity. RMSNorm gains are (norm_offset + w).
    """

    name: str  # the family: llama, mistral, qwen2, qwen3, gemma3
    rope: Rope  # every layer's rope but the sliding-window layers' when sliding_rope is set
    windows: tuple[int | None, ...]  # per layer: a query at i sees keys (i - window, i]; None: [0, i]
    sliding_rope: Rope | None = None  # the sliding-window layers' own rope (Gemma 3: rope_local_base_freq)
    biases: frozenset[str] = frozenset()  # the projections with a bias (q_proj ... o_proj, gate_proj ... down_proj)
    activation: str = "silu"  # one of ACTIVATIONS
    norm_offset: float = 0.0  # Gemma: x * (1 + w)
    attn_in_norm: str = "input_layernorm"
    attn_out_norm: str | None = None  # Gemma: on the attention's output, before the residual add
    mlp_in_norm: str = "post_attention_layernorm"
    mlp_out_norm: str | None = None  # Gemma: on the MLP's output, before the residual add
    qk_norm: bool = False  # RMSNorm of each q and k head (head_dim gains q_norm, k_norm) before rope
    embed_scale: float = 1.0  # the embedding rows are multiplied by it (Gemma: sqrt(hidden))
    query_scale: float = 1.0  # q after rope times it: the scores' 1/sqrt(head_dim) becomes the family's scale
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)

    def layer_rope(self, layer: int) -> Rope:
        return self.sliding_rope if self.sliding_rope is not None and self.windows[layer] is not None else self.rope

    def layer_norms(self) -> tuple[str, ...]:
        """The hidden-size norms of a layer, by their checkpoint names (model.layers.N.<name>.weight)."""
        return tuple(n for n in (self.attn_in_norm, self.attn_out_norm, self.mlp_in_norm, self.mlp_out_norm) if n)


def read_json(path: Path) -> dict[str, Any]:
    if not path.parent.is_dir():
        raise ModelError(f"model folder {path.parent} does not exist")
    if not path.is_file():
        raise ModelError(f"{path} is missing: is {path.parent} a Hugging Face model folder?")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return value


_MISSING = object()


def field(raw: dict[str, Any], name: str, convert, default: Any = _MISSING) -> Any:
    """raw[name] converted, or the default when absent or null; a ModelError naming the field otherwise."""
    value = raw.get(name)
    if value is None:
        if default is _MISSING:
            raise ModelError(f"config.json has no {name!r}")
        return default
    if convert in (int, float) and isinstance(value, bool) or convert is bool and not isinstance(value, bool):
        raise ModelError(f"config.json has a bad value for {name!r}: {value!r}")
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise ModelError(f"config.json has a bad value for {name!r}: {value!r}") from None


def rope_of(params: dict[str, Any], theta: float) -> Rope:
    """A Rope from a rope_parameters (v5) or rope_scaling (v4) dict; theta when it names none."""
    params = dict(params)
    try:
        theta = float(params.pop("rope_theta", theta))
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        numeric = tuple(sorted((k, float(v)) for k, v in params.items() if isinstance(v, (int, float))))
    except (TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"config.json has a bad rope field ({exc})") from None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(f"unsupported rope type {rope_type!r}: TSQP supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    needed = {
        "linear": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    }
    missing = [k for k in needed.get(rope_type, ()) if k not in dict(numeric)]
    if missing:
        raise ModelError(f"rope type {rope_type!r} needs {', '.join(missing)} in config.json")
    return Rope(theta, rope_type, numeric)


def single_rope(raw: dict[str, Any]) -> Rope:
    """The one rope of a config.json: `rope_parameters` (transformers v5) or `rope_theta`/`rope_scaling` (v4)."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ModelError("config.json has a bad rope field (rope_parameters and rope_scaling are objects)")
    theta = field(raw, "rope_theta", float, 10000.0)
    return rope_of({**scaling, **params}, theta)


def activation(raw: dict[str, Any], name: str, allowed: tuple[str, ...]) -> str:
    act = raw.get(name) or allowed[0]
    if act not in allowed:
        family = raw.get("model_type")
        raise ModelError(f"unsupported {name} {act!r} for {family}: TSQP implements {', '.join(allowed)}")
    return act


def windows_of_layer_types(raw: dict[str, Any], layers: int, window: int | None) -> tuple[int | None, ...]:
    """Per layer: window on the `layer_types` entries that say sliding_attention, None on full_attention."""
    kinds = raw.get("layer_types")
    if not isinstance(kinds, list) or len(kinds) != layers:
        raise ModelError(f"config.json's layer_types must list {layers} layer kinds")
    unknown = sorted({k for k in kinds if k not in ("sliding_attention", "full_attention")})
    if unknown:
        raise ModelError(f"unsupported layer type {unknown[0]!r}: TSQP runs sliding_attention and full_attention")
    return tuple(window if kind == "sliding_attention" else None for kind in kinds)


def window_size(raw: dict[str, Any]) -> int | None:
    """config.json's sliding window; None also for one no session can outgrow (max_position_embeddings or
    more, as some configs declare): every key lies inside it, and the server takes no larger window."""
    window = field(raw, "sliding_window", int, None)
    if window is not None and window < 1:
        raise ModelError(f"config.json has a bad value for 'sliding_window': {window}")
    return None if window is not None and window >= max_positions(raw) else window


def max_positions(raw: dict[str, Any]) -> int:
    """config.json's max_position_embeddings (transformers' LlamaConfig default when absent)."""
    return field(raw, "max_position_embeddings", int, 2048)


def qwen_windows(raw: dict[str, Any], layers: int) -> tuple[int | None, ...]:
    """Qwen2 and Qwen3: a window only with use_sliding_window, on the layers layer_types (or, without it,
    max_window_layers) marks sliding, as transformers' configs derive them."""
    window = window_size(raw) if field(raw, "use_sliding_window", bool, False) else None
    if raw.get("layer_types") is not None:
        return windows_of_layer_types(raw, layers, window)
    first = field(raw, "max_window_layers", int, 28)
    return tuple(window if layer >= first else None for layer in range(layers))


def biases(raw: dict[str, Any]) -> frozenset[str]:
    """The LLaMA spelling: attention_bias puts a bias on q, k, v and o; mlp_bias on gate, up and down."""
    found = ATTENTION_PROJECTIONS if field(raw, "attention_bias", bool, False) else ()
    return frozenset(found + (MLP_PROJECTIONS if field(raw, "mlp_bias", bool, False) else ()))
