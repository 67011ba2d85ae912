"""Each family's config.json, as transformers writes it, read into the declared `Family`: windows per layer,
ropes per layer kind, biases per projection, norms, scales; the v4 spellings; refusals in one line."""

from __future__ import annotations

import math

import pytest
from conftest import build_checkpoint
from support import FAMILY_MODELS

from tsqp.errors import ModelError
from tsqp.model.config import ModelConfig
from tsqp.model.families import FAMILIES

QKV = {"q_proj", "k_proj", "v_proj"}
ATTENTION = QKV | {"o_proj"}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """name -> (our ModelConfig, transformers' config) of each family model, written by save_pretrained."""
    root = tmp_path_factory.mktemp("family-configs")
    read = {}
    for name, overrides in FAMILY_MODELS.items():
        path, hf = build_checkpoint(root / name, **overrides)
        read[name] = (ModelConfig.from_model_dir(path), hf)
    return read


def test_every_family_is_registered():
    assert set(FAMILIES) == {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma3ForCausalLM",
    }


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_shapes_and_windows_follow_transformers(configs, name):
    ours, hf = configs[name]
    f = ours.family
    assert ours.architecture == hf.architectures[0] and f.name == FAMILY_MODELS[name]["family"]
    assert (ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
        hf.num_attention_heads,
        hf.num_key_value_heads,
        hf.head_dim if getattr(hf, "head_dim", None) else hf.hidden_size // hf.num_attention_heads,
    )
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    kinds = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
    expected = tuple(
        hf.sliding_window if kind == "sliding_attention" or f.name == "mistral" else None for kind in kinds
    )
    assert f.windows == expected


def test_mistral_window_on_every_layer(configs):
    assert configs["mistral-window-gqa"][0].family.windows == (8, 8)
    assert configs["mistral-tied-mqa"][0].family.windows == (None, None)


def test_qwen2_biases_on_q_k_v_only_and_its_window_layers(configs):
    for name in ("qwen2-gqa", "qwen2-tied-mqa", "qwen2-window"):
        assert configs[name][0].family.biases == QKV
        assert configs[name][0].attention_bias and not configs[name][0].has_bias("o_proj")
    assert configs["qwen2-gqa"][0].family.windows == (None, None)
    assert configs["qwen2-window"][0].family.windows == (None, 8)  # max_window_layers=1


def test_qwen2_window_only_with_use_sliding_window():
    raw = dict(QWEN2_RAW, sliding_window=4096, use_sliding_window=False, max_window_layers=0)
    assert ModelConfig.from_dict(raw).family.windows == (None, None)
    raw = dict(QWEN2_RAW, sliding_window=16, use_sliding_window=True, max_window_layers=0)
    assert ModelConfig.from_dict(raw).family.windows == (16, 16)


@pytest.mark.parametrize("window", [1024, 131072])
def test_a_window_no_session_outgrows_is_none(window):
    """Qwen2.5's configs declare a 131072-key window beside 32768 positions: every key lies inside it, so
    the layer is global (the server accepts windows up to max_position_embeddings only)."""
    raw = dict(QWEN2_RAW, sliding_window=window, use_sliding_window=True, max_window_layers=0)
    raw["max_position_embeddings"] = 1024
    assert ModelConfig.from_dict(raw).family.windows == (None, None)
    raw["max_position_embeddings"] = window + 1
    assert ModelConfig.from_dict(raw).family.windows == (window, window)


def test_qwen3_q_k_norms_and_optional_biases(configs):
    plain, biased = configs["qwen3-gqa"][0].family, configs["qwen3-tied-mqa-bias"][0].family
    assert plain.qk_norm and biased.qk_norm
    assert plain.biases == frozenset() and biased.biases == ATTENTION


def test_gemma3_declares_its_differences(configs):
    c, hf = configs["gemma3-gqa"]
    f = c.family
    assert f.norm_offset == 1.0 and f.qk_norm and f.activation == "gelu_pytorch_tanh"
    assert f.layer_norms() == (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    )
    assert f.embed_scale == math.sqrt(hf.hidden_size)
    assert math.isclose(f.query_scale**2, hf.head_dim / hf.query_pre_attn_scalar)
    assert f.logit_softcap == 50.0 and configs["gemma3-mqa"][0].family.logit_softcap is None
    assert f.windows == (8, None)
    assert [f.layer_rope(i).theta for i in range(2)] == [100.0, 10000.0]  # sliding, then global


GEMMA3_V4 = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 7,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "query_pre_attn_scalar": 32,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
}
QWEN2_RAW = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def test_gemma3_v4_spelling():
    """rope_theta with rope_scaling for the global layers, rope_local_base_freq for the sliding ones, and
    sliding_window_pattern instead of layer_types: every sixth layer global."""
    f = ModelConfig.from_dict(GEMMA3_V4).family
    assert f.windows == (512, 512, 512, 512, 512, None, 512)
    assert (f.rope.theta, f.rope.type, f.rope.param("factor")) == (1000000.0, "linear", 8.0)
    assert (f.sliding_rope.theta, f.sliding_rope.type) == (10000.0, "default")
    assert f.layer_rope(5) == f.rope and f.layer_rope(0) == f.sliding_rope
    assert f.query_scale == 1.0


@pytest.mark.parametrize(
    "raw,fragment",
    [
        (dict(GEMMA3_V4, attn_logit_softcapping=50.0), "attn_logit_softcapping"),
        (dict(GEMMA3_V4, use_bidirectional_attention=True), "bidirectional"),
        (dict(GEMMA3_V4, hidden_activation="silu"), "hidden_activation"),
        (dict(GEMMA3_V4, layer_types=["sliding_attention"] * 6 + ["chunked_attention"]), "chunked_attention"),
        (dict(GEMMA3_V4, layer_types=["full_attention"]), "layer_types"),
        (dict(GEMMA3_V4, model_type="gemma3"), "unsupported architecture"),
        (dict(GEMMA3_V4, rope_parameters={"full_attention": {"rope_type": "yarn"}}), "yarn"),
        (dict(QWEN2_RAW, use_sliding_window=True, sliding_window=0), "sliding_window"),
        (dict(QWEN2_RAW, hidden_act="gelu"), "hidden_act"),
        (dict(QWEN2_RAW, architectures=["Qwen2MoeForCausalLM"]), "unsupported architecture"),
    ],
)
def test_refused_in_one_line(raw, fragment):
    with pytest.raises(ModelError, match=fragment) as caught:
        ModelConfig.from_dict(raw)
    assert "\n" not in str(caught.value)
