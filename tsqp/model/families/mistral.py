"""Mistral: Llama's layer with a sliding attention window on every layer when config.json sets one."""

from __future__ import annotations

from typing import Any

from tsqp.model.family import Family, activation, single_rope, window_size

ARCHITECTURE = "MistralForCausalLM"
MODEL_TYPES = ("mistral",)


def describe(raw: dict[str, Any], layers: int, hidden: int, head_dim: int) -> Family:
    return Family(
        name="mistral",
        rope=single_rope(raw),
        windows=(window_size(raw),) * layers,
        activation=activation(raw, "hidden_act", ("silu",)),
    )
