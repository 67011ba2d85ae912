"""The model configuration, read from a Hugging Face `config.json` by the TEE and the server alike.

Only fields that change the math are kept: the shapes every family shares here, and what differs between
families as a declared `family.Family` (`family`), read by the family module of the config's architecture
(tsqp/model/families/). Both the transformers v4 spelling of the rope fields (`rope_theta`, `rope_scaling`)
and the v5 one (`rope_parameters`) are understood.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsqp.errors import ModelError
from tsqp.model.families import family_module
from tsqp.model.family import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, Family, field, max_positions, read_json


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # the Hugging Face class: LlamaForCausalLM, Qwen2ForCausalLM, ...
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # < num_heads: GQA; 1: MQA
    head_dim: int  # may differ from hidden_size // num_heads when config.json says so
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    family: Family  # what the family changes in the layer: norms, activation, windows, ropes, biases, scales

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

    # the rope of the full-attention layers (every layer's but Gemma 3's sliding ones)
    @property
    def rope_theta(self) -> float:
        return self.family.rope.theta

    @property
    def rope_type(self) -> str:
        return self.family.rope.type

    def rope_param(self, name: str) -> float:
        return self.family.rope.param(name)

    def has_bias(self, projection: str) -> bool:
        """projection: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj."""
        return projection in self.family.biases

    @property
    def attention_bias(self) -> bool:
        """Some attention projection carries a bias (Qwen2: q, k and v)."""
        return any(map(self.has_bias, ATTENTION_PROJECTIONS))

    @property
    def mlp_bias(self) -> bool:
        return any(map(self.has_bias, MLP_PROJECTIONS))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        module = family_module(raw)
        hidden = field(raw, "hidden_size", int)
        heads = field(raw, "num_attention_heads", int)
        kv_heads = field(raw, "num_key_value_heads", int, heads)
        head_dim = field(raw, "head_dim", int, hidden // heads if heads > 0 else 0)
        layers = field(raw, "num_hidden_layers", int)
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
            raise ModelError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        return cls(
            architecture=module.ARCHITECTURE,
            vocab_size=field(raw, "vocab_size", int),
            hidden_size=hidden,
            intermediate_size=field(raw, "intermediate_size", int),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=field(raw, "rms_norm_eps", float, 1e-6),
            tie_word_embeddings=field(raw, "tie_word_embeddings", bool, False),
            max_position_embeddings=max_positions(raw),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=field(raw, "eos_token_id", _int_tuple, ()),
            family=module.describe(raw, max(layers, 0), hidden, head_dim),
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelConfig:
        return cls.from_dict(read_json(Path(model_dir) / "config.json"))


def _int_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return (int(value),)
