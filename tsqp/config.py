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
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            kv_heads = int(raw.get("num_key_value_heads") or heads)
            head_dim = int(raw.get("head_dim") or hidden // heads)
            rope_theta, rope_type, rope_params = _rope_fields(raw)
            config = cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_type=rope_type,
                rope_params=rope_params,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=_int_tuple(raw.get("eos_token_id")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"config.json is missing or has a bad value for {exc}") from None
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
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    missing = [k for k in needed.get(rope_type, ()) if k not in dict(numeric)]
    if missing:
        raise ModelError(f"rope type {rope_type!r} needs {', '.join(missing)} in config.json")
    return theta, rope_type, numeric
