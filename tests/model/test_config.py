"""ModelConfig.from_dict (both transformers spellings, refusals) and the rotary embedding against transformers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BASE_CONFIG, build_checkpoint

from tsqp.errors import ModelError, TsqpError
from tsqp.model.config import ModelConfig
from tsqp.tee.rope import inverse_frequencies

LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def raw_config(**overrides) -> dict:
    """A minimal Llama config.json as a dict."""
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
    }
    raw.update(overrides)
    return {k: v for k, v in raw.items() if v is not None}


# -- fields --------------------------------------------------------------------------------------------


def test_basic_fields():
    c = ModelConfig.from_dict(raw_config(tie_word_embeddings=True, attention_bias=True, eos_token_id=[2, 7]))
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (100, 64, 128, 2)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (8, 2, 8)
    assert (c.q_dim, c.kv_dim, c.group_size) == (64, 16, 4)
    assert c.rms_norm_eps == 1e-5 and c.max_position_embeddings == 1024
    assert c.tie_word_embeddings and c.attention_bias and not c.mlp_bias
    assert c.eos_token_ids == (2, 7)


def test_defaults():
    c = ModelConfig.from_dict(raw_config(num_key_value_heads=None, architectures=None))
    assert c.num_kv_heads == c.num_heads == 8  # MHA when num_key_value_heads is absent
    assert c.head_dim == 8
    assert c.rope_theta == 10000.0 and c.rope_type == "default"
    assert not c.tie_word_embeddings and not c.attention_bias and not c.mlp_bias


def test_explicit_head_dim():
    c = ModelConfig.from_dict(raw_config(head_dim=32))
    assert c.head_dim == 32 and c.q_dim == 256 and c.kv_dim == 64


# -- rope spellings --------------------------------------------------------------------------------------


def test_v5_rope_parameters():
    c = ModelConfig.from_dict(raw_config(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}))
    assert c.rope_theta == 500000.0 and c.rope_type == "llama3"
    assert {k: c.rope_param(k) for k in LLAMA3} == LLAMA3


def test_v4_rope_theta_and_scaling_with_type():
    c = ModelConfig.from_dict(raw_config(rope_theta=250000.0, rope_scaling={"type": "linear", "factor": 2.0}))
    assert c.rope_theta == 250000.0 and c.rope_type == "linear" and c.rope_param("factor") == 2.0


def test_v4_rope_scaling_with_rope_type():
    c = ModelConfig.from_dict(raw_config(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **LLAMA3}))
    assert c.rope_theta == 500000.0 and c.rope_type == "llama3"
    assert {k: c.rope_param(k) for k in LLAMA3} == LLAMA3


def test_v4_theta_without_scaling():
    c = ModelConfig.from_dict(raw_config(rope_theta=1234.5, rope_scaling=None))
    assert c.rope_theta == 1234.5 and c.rope_type == "default"


def test_v4_and_v5_spellings_read_the_same():
    v4 = ModelConfig.from_dict(raw_config(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **LLAMA3}))
    v5 = ModelConfig.from_dict(raw_config(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}))
    assert v4 == v5


def test_config_json_written_by_transformers(tmp_path):
    """The config.json transformers 5 writes (rope_parameters) reads back with the same values."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": 50000.0,
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    path, hf = build_checkpoint(
        tmp_path / "m",
        num_key_value_heads=2,
        head_dim=16,
        rope_parameters=rope,
        tie_word_embeddings=True,
        mlp_bias=True,
        rms_norm_eps=1e-5,
    )
    assert "rope_parameters" in json.loads((path / "config.json").read_text())
    c = ModelConfig.from_model_dir(path)
    assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (BASE_CONFIG["hidden_size"], 4, 2, 16)
    assert c.rope_type == "llama3" and c.rope_theta == 50000.0 and c.rope_param("factor") == 4.0
    assert c.tie_word_embeddings and c.mlp_bias and not c.attention_bias and c.rms_norm_eps == 1e-5


# -- refusals --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "unsupported architecture"),
        (dict(model_type="phi3", architectures=["Phi3ForCausalLM"]), "unsupported architecture"),
        (dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]), "unsupported architecture"),
        (dict(architectures=["MistralForCausalLM"]), "unsupported architecture"),  # llama model_type, other class
        (dict(model_type=None), "unsupported architecture"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}), "yarn"),
        (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "yarn"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "dynamic"),
        (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0}), "longrope"),
        (dict(rope_scaling={"type": "linear"}), "factor"),
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}), "low_freq_factor"),
        (dict(num_attention_heads=8, num_key_value_heads=3), "multiple"),
        (dict(hidden_size=None), "hidden_size"),
        (dict(vocab_size="many"), "many"),
    ],
)
def test_refused(overrides, fragment):
    with pytest.raises(ModelError, match=fragment):
        ModelConfig.from_dict(raw_config(**overrides))


def test_bad_value_names_the_field():
    with pytest.raises(ModelError, match="vocab_size"):
        ModelConfig.from_dict(raw_config(vocab_size="many"))


def test_model_error_is_a_tsqp_error():
    assert issubclass(ModelError, TsqpError)


def test_from_model_dir_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        ModelConfig.from_model_dir(tmp_path / "nope")
    with pytest.raises(ModelError, match="config.json"):
        ModelConfig.from_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="JSON object"):
        ModelConfig.from_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelConfig.from_model_dir(tmp_path)


# -- rope against transformers ---------------------------------------------------------------------------

ROPE_CASES = {
    "default": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "default-theta": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, head_dim=64),
    "linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}, head_dim=64),
    "llama3-small-context": dict(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        head_dim=32,
    ),
    "llama3-v4": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **LLAMA3}, head_dim=128),
}


def rope_and_head_dim(raw: dict):
    config = ModelConfig.from_dict(raw)
    return config.family.rope, config.head_dim


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_inverse_frequencies_match_transformers(case):
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    raw = raw_config(**ROPE_CASES[case])
    hf = HFConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    rope_type = hf.rope_parameters["rope_type"]
    init = ROPE_INIT_FUNCTIONS.get(rope_type, LlamaRotaryEmbedding.compute_default_rope_parameters)
    if rope_type != "default":
        assert rope_type in ROPE_INIT_FUNCTIONS
    expected, attention_scaling = init(hf)
    assert attention_scaling == 1.0  # none of the supported types rescales cos/sin

    ours = inverse_frequencies(*rope_and_head_dim(raw))
    assert ours.dtype == torch.float32
    assert ours.shape == expected.shape == ((raw.get("head_dim") or 8) // 2,)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)


def test_llama3_scaling_touches_low_frequencies_only():
    """The llama3 case above is not vacuous: some frequencies are scaled by 1/factor, some untouched,
    some smoothed in between."""
    plain = inverse_frequencies(*rope_and_head_dim(raw_config(rope_theta=500000.0, head_dim=128)))
    llama3 = raw_config(rope_theta=500000.0, head_dim=128, rope_scaling={"rope_type": "llama3", **LLAMA3})
    scaled = inverse_frequencies(*rope_and_head_dim(llama3))
    ratio = scaled / plain
    assert torch.isclose(ratio, torch.tensor(1.0)).any()
    assert torch.isclose(ratio, torch.tensor(1 / 8.0)).any()
    assert ((ratio < 0.99) & (ratio > 0.13)).any()
