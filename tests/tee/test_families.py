"""Every family beside Llama (Mistral, Qwen2, Qwen3, Gemma 3) against transformers' own model classes.

Each tiny checkpoint of support.FAMILY_MODELS (tied and untied, GQA and MQA, Qwen2's biases, Qwen3's and
Gemma 3's q/k norms, sliding windows of 8 and 16 keys with prompts past them, Gemma 3's two layer kinds)
must give transformers' logits at every position within 1e-4 (float32) and its greedy tokens for 32 new
tokens, in plain mode (attention on the server, or in the TEE: `--attention tee`) and in private mode,
every product verified.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import BASE_CONFIG, reference_logits, token_ids
from support import FAMILY_MODELS, transformers_greedy

from tsqp.server.engine import Engine
from tsqp.tee.compose import attach, tee_model
from tsqp.tee.generate import generate
from tsqp.tee.private import PrivateOptions
from tsqp.tee.remote import InProcess

ATOL = 1e-4
NEW_TOKENS = 32
MODES = ["plain", "tee", "private"]  # tee: the plain split with attention in the TEE


@pytest.fixture(scope="module")
def family_model(checkpoints):
    """get(name) -> (folder, transformers reference) for each model of support.FAMILY_MODELS."""

    def get(name: str):
        path = checkpoints("family-" + name, seed=700 + list(FAMILY_MODELS).index(name), **FAMILY_MODELS[name])
        return path, checkpoints.reference("family-" + name)

    return get


def attached(path, mode: str, pads_dir):
    """A verified TeeModel over an in-process engine, plain (attention on either side) or private."""
    private = PrivateOptions(pads_dir=pads_dir) if mode == "private" else None
    attention = "tee" if mode == "tee" else None
    tee = tee_model(path, InProcess(Engine(str(path))), private=private, attention=attention)
    attach(tee)
    return tee


def checked_everything(tee, mode: str) -> bool:
    if mode == "private":
        return tee.ops.checked.checks > 0 and max(tee.ops.checked.margin.values()) < 0.5
    if mode == "tee":  # no scores or attn_out crossed: v and o_proj checked as linears
        checks = set(tee.ops.checker.checks)
        crossed = {"qkv", "o_proj", "gate_up", "down", "lm_head"} <= checks and not {"scores", "attn_out"} & checks
        return crossed and max(tee.ops.checker.margin.values()) < 0.5
    return {"qkv", "scores", "attn_out", "gate_up", "down", "lm_head"} <= set(tee.ops.checker.checks)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("length", [1, 37])
@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_logits_match_transformers(family_model, name, length, mode, tmp_path):
    path, reference = family_model(name)
    ids = token_ids(length, seed=length + 1)
    tee = attached(path, mode, tmp_path / "pads")
    tee.ops.open_session(length)
    logits = tee.forward(ids)
    tee.ops.close_session()
    assert logits.shape == (length, BASE_CONFIG["vocab_size"])
    torch.testing.assert_close(logits, reference_logits(reference, ids), atol=ATOL, rtol=0)
    assert checked_everything(tee, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mistral-window-gqa", "qwen2-window", "gemma3-gqa"])
def test_appends_across_the_window_equal_one_prefill(family_model, name, mode, tmp_path):
    """A prompt fed in pieces (a prefill, single tokens, a block that straddles the window) on one session."""
    path, reference = family_model(name)
    ids = token_ids(40, seed=9)
    tee = attached(path, mode, tmp_path / "pads")
    tee.ops.open_session(ids.shape[0])
    outputs, pos = [], 0
    for size in (5, 1, 1, 12, 1, 20):
        outputs.append(tee.forward(ids[pos : pos + size], pos=pos))
        pos += size
    tee.ops.close_session()
    torch.testing.assert_close(torch.cat(outputs), reference_logits(reference, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_greedy_equals_transformers_generate(family_model, name, mode, tmp_path):
    path, reference = family_model(name)
    prompt = token_ids(7, seed=list(FAMILY_MODELS).index(name))
    expected = transformers_greedy(reference, prompt, NEW_TOKENS)
    tee = attached(path, mode, tmp_path / "pads")
    result = generate(tee, prompt.tolist(), NEW_TOKENS, eos_ids=[])
    assert len(expected) == NEW_TOKENS
    assert result.generated_ids == expected
    assert checked_everything(tee, mode)


@pytest.mark.parametrize("name", ["mistral-window-gqa", "qwen2-window", "gemma3-gqa", "gemma3-mqa"])
def test_the_windows_are_exercised(family_model, name):
    """Guards the test models: without its windows (every layer global) a model's logits leave transformers'."""
    path, reference = family_model(name)
    ids = token_ids(37, seed=38)
    tee = attached(path, "plain", None)
    tee.family = dataclasses.replace(tee.family, windows=(None,) * tee.config.num_layers, sliding_rope=None)
    tee.ops.open_session(ids.shape[0])
    logits = tee.forward(ids)
    tee.ops.close_session()
    assert (logits - reference_logits(reference, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemma3_embedding_scale_is_rounded_as_transformers_rounds_it(family_model, dtype):
    """transformers multiplies Gemma's embeddings by sqrt(hidden) cast to the weights' dtype."""
    from transformers import AutoModelForCausalLM

    path, _ = family_model("gemma3-gqa")
    tee = tee_model(path, InProcess(Engine(str(path), dtype=dtype)))
    tee.attach()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).model.embed_tokens
    assert tee.embed_scale == hf.embed_scale.to(hf.weight.dtype).item()
