"""Gemma 3 text (Gemma3ForCausalLM): embeddings times sqrt(hidden), RMSNorm gains 1 + w, four norms a layer,
GELU-tanh gate, q/k norms, scores scaled by query_pre_attn_scalar^-1/2, sliding-window layers (their own
rope base) between global ones, and an optional tanh soft-cap of the logits.
"""

from __future__ import annotations

import math
from typing import Any

from tsqp.errors import ModelError
from tsqp.model.family import Family, activation, biases, field, rope_of, window_size, windows_of_layer_types

ARCHITECTURE = "Gemma3ForCausalLM"
MODEL_TYPES = ("gemma3_text",)
SLIDING_PATTERN = 6  # transformers' default: every sixth layer global


def describe(raw: dict[str, Any], layers: int, hidden: int, head_dim: int) -> Family:
    if raw.get("attn_logit_softcapping") is not None or raw.get("use_bidirectional_attention"):
        raise ModelError("Gemma 3 with attn_logit_softcapping or bidirectional attention is not supported by TSQP")
    window = window_size(raw)
    if raw.get("layer_types") is None:
        pattern = field(raw, "sliding_window_pattern", int, SLIDING_PATTERN)
        kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
        raw = {**raw, "layer_types": kinds}
    rope, sliding_rope = _ropes(raw)
    return Family(
        name="gemma3",
        rope=rope,
        sliding_rope=sliding_rope,
        windows=windows_of_layer_types(raw, layers, window),
        biases=biases({"attention_bias": raw.get("attention_bias")}),
        activation=activation(raw, "hidden_activation", ("gelu_pytorch_tanh",)),
        norm_offset=1.0,
        attn_out_norm="post_attention_layernorm",
        mlp_in_norm="pre_feedforward_layernorm",
        mlp_out_norm="post_feedforward_layernorm",
        qk_norm=True,
        embed_scale=math.sqrt(hidden),
        query_scale=math.sqrt(head_dim / field(raw, "query_pre_attn_scalar", float, 256.0)),
        logit_softcap=field(raw, "final_logit_softcapping", float, None),
    )


def _ropes(raw: dict[str, Any]):
    """(global, sliding) ropes: rope_parameters by layer kind (v5), or rope_theta and rope_scaling for the
    global layers and rope_local_base_freq for the sliding ones (v4)."""
    params = raw.get("rope_parameters") or {}
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise ModelError("config.json has a bad rope field (Gemma 3's rope_parameters hold one object per layer kind)")
    scaling = raw.get("rope_scaling") or {}
    full = {**scaling, **params.get("full_attention", {})} if isinstance(scaling, dict) else None
    if full is None:
        raise ModelError("config.json has a bad rope field (rope_scaling is an object)")
    rope = rope_of(full, field(raw, "rope_theta", float, 1_000_000.0))
    sliding = rope_of(params.get("sliding_attention", {}), field(raw, "rope_local_base_freq", float, 10_000.0))
    return rope, sliding
