"""Qwen2 and Qwen2.5: biases on q, k and v (not o); a sliding window only where use_sliding_window says."""

from __future__ import annotations

from typing import Any

from tsqp.model.family import Family, activation, qwen_windows, single_rope

ARCHITECTURE = "Qwen2ForCausalLM"
MODEL_TYPES = ("qwen2",)


def describe(raw: dict[str, Any], layers: int, hidden: int, head_dim: int) -> Family:
    return Family(
        name="qwen2",
        rope=single_rope(raw),
        windows=qwen_windows(raw, layers),
        biases=frozenset({"q_proj", "k_proj", "v_proj"}),
        activation=activation(raw, "hidden_act", ("silu",)),
    )
