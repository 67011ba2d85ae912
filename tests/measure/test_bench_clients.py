"""`tsqp bench --clients N`: N client processes decoding on one server, figures of one run."""

from __future__ import annotations

import json

import pytest
from conftest import run_tsqp
from support import in_process

from tsqp.model.presets import preset_path
from tsqp.tee.generate import generate


def test_bench_clients_json_fields_and_each_client_decodes_what_it_decodes_alone(tmp_path):
    out = tmp_path / "load.json"
    result = run_tsqp(
        "bench", "--preset", "tiny", "--clients", "2", "--tokens", "8", "--decode", "4", "--json", out, timeout=300
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    for name in ("aggregate_decode_tokens_per_s", "single_client_decode_tokens_per_s", "p50_token_ms", "p99_token_ms"):
        assert figures[name] > 0, name
    assert figures["clients"] == 2 and figures["p99_token_ms"] >= figures["p50_token_ms"]
    assert len(figures["together"]["per_client_decode_tokens_per_s"]) == 2
    assert 0 <= figures["batched_share"] <= 1 and figures["together"]["requests"] > 0
    for run in ("single", "together", "single_after"):  # CPU a decode token, of the clients and of the server
        assert figures[run]["client_cpu_ms_per_token"] > 0 and figures[run]["server_cpu_ms_per_token"] > 0, run
    lone = [figures[run]["aggregate_decode_tokens_per_s"] for run in ("single", "single_after")]
    assert figures["single_client_decode_tokens_per_s"] == pytest.approx(sum(lone) / 2)  # before and after
    assert figures["ratio_aggregate_to_single"] == pytest.approx(
        figures["aggregate_decode_tokens_per_s"] / figures["single_client_decode_tokens_per_s"]
    )
    assert "aggregate decode with 2 clients / one client" in result.stdout
    from tsqp.measure.prompts import token_ids

    tee, _ = in_process(preset_path("tiny"))
    for index, ids in enumerate(figures["generated_ids"]):
        prompt = token_ids(8, tee.config.vocab_size, seed=1000 + index).tolist()
        assert ids == generate(tee, prompt, 5).generated_ids  # concurrent greedy == alone, in process
