"""`tsqp bench --compare` on every family: transformers' reference comes from the config's architecture
(AutoModelForCausalLM), its timings are reported, and its greedy tokens are the split's."""

from __future__ import annotations

import json

import pytest
from conftest import run_tsqp
from support import FAMILY_MODELS

COMPARED = ["mistral-window-gqa", "qwen2-gqa", "qwen3-gqa", "gemma3-gqa"]


@pytest.mark.parametrize("name", COMPARED)
def test_bench_compare_runs_on_every_family(checkpoints, name, tmp_path):
    path = checkpoints("compare-" + name, seed=800 + COMPARED.index(name), **FAMILY_MODELS[name])
    out = tmp_path / "bench.json"
    result = run_tsqp("bench", "--model", path, "--tokens", "20", "--decode", "4", "--compare", "--json", out)
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["reference"]["sdpa_s"] > 0 and figures["reference"]["eager_s"] > 0
    assert figures["decode"]["new_tokens"] == 4 and figures["decode"]["same_tokens"] is True
