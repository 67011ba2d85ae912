"""The model configuration, read from a Hugging Face `config.json` by the TEE and the server alike.

Only fields that change the math are kept. Both the transformers v4 spelling of the rope fields
(`rope_theta`, `rope_scaling`) and the v5 one (`rope_parameters`) are understood.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsqp.errors import ModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # < num_heads: GQA; 1: MQA
    head_dim: int  # may differ from hidden_size // num_heads when config.json says so
    rms_norm_eps: float
    rope_theta: float
    rope_type: str  # one of SUPPORTED_ROPE_TYPES
    rope_params: tuple[tuple[str, float], ...]  # factor, low/high_freq_factor, original_max_position_embeddings
    tie_word_embeddings: bool
    attention_bias: bool  # q, k, v and o projections carry a bias
    mlp_bias: bool  # gate, up and down projections carry a bias
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    def rope_param(self, name: str) -> float:
        return dict(self.rope_params)[name]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LlamaConfig:
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if model_type != "llama" or (archs and "LlamaForCausalLM" not in archs):
            found = ", ".join(archs) or model_type or "unknown"
            raise ModelError(f"unsupported architecture {found!r}: TSQP runs LlamaForCausalLM checkpoints only")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelError(f"unsupported hidden_act {act!r}: TSQP implements the LLaMA SiLU MLP only")
        hidden = _field(raw, "hidden_size", int)
        heads = _field(raw, "num_attention_heads", int)
        kv_heads = _field(raw, "num_key_value_heads", int, heads)
        head_dim = _field(raw, "head_dim", int, hidden // heads if heads > 0 else 0)
        try:
            rope_theta, rope_type, rope_params = _rope_fields(raw)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"config.json has a bad rope field ({exc})") from None
        config = cls(
            vocab_size=_field(raw, "vocab_size", int),
            hidden_size=hidden,
            intermediate_size=_field(raw, "intermediate_size", int),
            num_layers=_field(raw, "num_hidden_layers", int),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_field(raw, "rms_norm_eps", float, 1e-6),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_params=rope_params,
            tie_word_embeddings=_field(raw, "tie_word_embeddings", bool, False),
            attention_bias=_field(raw, "attention_bias", bool, False),
            mlp_bias=_field(raw, "mlp_bias", bool, False),
            max_position_embeddings=_field(raw, "max_position_embeddings", int, 2048),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_field(raw, "eos_token_id", _int_tuple, ()),
        )
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
            raise ModelError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        return config

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> LlamaConfig:
        return cls.from_dict(read_json(Path(model_dir) / "config.json"))


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


def _field(raw: dict[str, Any], name: str, convert, default: Any = _MISSING) -> Any:
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


def _int_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rope_fields(raw: dict[str, Any]) -> tuple[float, str, tuple[tuple[str, float], ...]]:
    """(theta, type, params) from either `rope_parameters` (transformers v5) or `rope_theta`/`rope_scaling` (v4)."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(f"unsupported rope type {rope_type!r}: TSQP supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    numeric = tuple(sorted((k, float(v)) for k, v in params.items() if isinstance(v, (int, float))))
    needed = {
        "linear": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    }
    missing = [k for k in needed.get(rope_type, ()) if k not in dict(numeric)]
    if missing:
        raise ModelError(f"rope type {rope_type!r} needs {', '.join(missing)} in config.json")
    return theta, rope_type, numeric
