"""Llama (and every checkpoint saved as LlamaForCausalLM): the layer every other family is told apart from."""

from __future__ import annotations

from typing import Any

from tsqp.model.family import Family, activation, biases, single_rope

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPES = ("llama",)


def describe(raw: dict[str, Any], layers: int, hidden: int, head_dim: int) -> Family:
    return Family(
        name="llama",
        rope=single_rope(raw),
        windows=(None,) * layers,
        biases=biases(raw),
        activation=activation(raw, "hidden_act", ("silu",)),
    )
