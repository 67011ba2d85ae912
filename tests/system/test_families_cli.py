"""`tsqp generate` as a user runs it (a server subprocess, sockets, the arena) on the other families: plain
and `--private` give the tokens of the in-process model, which test_families holds equal to transformers'."""

from __future__ import annotations

import json

import pytest
from conftest import run_tsqp
from support import FAMILY_MODELS, in_process

from tsqp.tee.generate import generate
from tsqp.tee.tokenizer import eos_token_ids

NAMES = ["mistral-window-gqa", "qwen2-gqa", "qwen3-tied-mqa-bias", "gemma3-gqa"]
PROMPT = [5, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("name", NAMES)
def test_cli_generate_plain_and_private(checkpoints, name, tmp_path):
    path = checkpoints("cli-" + name, seed=900 + NAMES.index(name), **FAMILY_MODELS[name])
    ids = ",".join(map(str, PROMPT))
    args = ["generate", "--model", path, "--token-ids", ids, "--max-new-tokens", "20", "--json"]
    plain = run_tsqp(*args)
    private = run_tsqp(*args, "--private", "--pads-dir", tmp_path / "pads")
    assert plain.returncode == 0, plain.stderr
    assert private.returncode == 0, private.stderr
    tee, _ = in_process(path)
    expected = generate(tee, PROMPT, 20, eos_ids=eos_token_ids(path, tee.config)).generated_ids
    assert json.loads(plain.stdout)["generated_ids"] == expected
    assert json.loads(private.stdout)["generated_ids"] == expected
