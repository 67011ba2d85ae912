"""Qwen3: an RMSNorm on each q and k head before rope; biases only with attention_bias (q, k, v and o)."""

from __future__ import annotations

from typing import Any

from tsqp.model.family import Family, activation, biases, qwen_windows, single_rope

ARCHITECTURE = "Qwen3ForCausalLM"
MODEL_TYPES = ("qwen3",)


def describe(raw: dict[str, Any], layers: int, hidden: int, head_dim: int) -> Family:
    return Family(
        name="qwen3",
        rope=single_rope(raw),
        windows=qwen_windows(raw, layers),
        biases=biases(raw),
        activation=activation(raw, "hidden_act", ("silu",)),
        qk_norm=True,
    )
