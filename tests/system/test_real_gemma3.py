"""The second real model through the split: Gemma 3 270M (the base model, `gemma3-270m` preset).

tests/model/test_gguf_real_gemma3.py checks the conversion of the real file; here the split runs it,
as `tsqp logits` and `tsqp generate` subprocesses, plain and private: its logits at every position of a
100+ token prompt (longer than nothing here: Gemma's window is 512) equal transformers' own GGUF
loading within 1e-3 with the same top-1 everywhere, and the France question is completed with Paris.
The reference model is dropped once its logits are taken, so the split's processes have the memory.
"""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch
from conftest import run_tsqp
from support import real_model
from test_real_model import PROMPT

from tsqp.tee.tokenizer import TextTokenizer

pytestmark = pytest.mark.real_model  # conftest makes it slow too

ATOL = 1e-3  # float32; a trained model's logits run to the tens
MODES = {"plain": [], "private": ["--private"]}
PRESET = "gemma3-270m"
FRANCE = "Question: What is the capital of France?\nAnswer:"


@pytest.fixture(scope="module")
def gemma():
    """(converted folder, GGUF file) of the real model, in the caller's cache."""
    return real_model(PRESET)


@pytest.fixture(scope="module")
def expected(gemma):
    """(prompt ids, transformers' float32 logits at every position) from its own loading of the GGUF."""
    from transformers import AutoModelForCausalLM

    ids = TextTokenizer(gemma[0]).encode(PROMPT)
    reference = AutoModelForCausalLM.from_pretrained(gemma[1].parent, gguf_file=gemma[1].name, dtype=torch.float32)
    with torch.inference_mode():
        logits = reference.eval()(torch.tensor(ids)[None]).logits[0].float()
    del reference
    gc.collect()
    return ids, logits


@pytest.mark.parametrize("mode", MODES)
def test_split_logits_equal_transformers_gguf_loading(gemma, expected, mode, tmp_path):
    ids, want = expected
    assert len(ids) >= 100
    out = tmp_path / "logits.npy"
    args = ["logits", "--model", gemma[0], "--token-ids", ",".join(map(str, ids)), "--out", out, *MODES[mode]]
    result = run_tsqp(*args, "--pads-dir", tmp_path / "pads", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.from_numpy(np.load(out))
    assert got.shape == want.shape
    difference = (got - want).abs().max().item()
    print(f"gemma3-270m {mode}: max abs logits difference {difference:.2e} over {len(ids)} positions")
    assert difference < ATOL, f"max abs difference {difference:.2e}"
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert want.abs().max() > 10  # a trained model's logits, not noise near zero


@pytest.mark.parametrize("mode", MODES)
def test_the_france_question_is_completed_with_paris(gemma, mode, tmp_path):
    args = ["generate", "--model", gemma[0], "--prompt", FRANCE, "--max-new-tokens", "8", "--json", *MODES[mode]]
    result = run_tsqp(*args, "--pads-dir", tmp_path / "pads", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["text"].startswith(" Paris"), result.stdout
