"""The floor's record and replay (measure/replay.py): a replayed run computes what the recorded one did, its
replies still checked, and `tsqp bench --replay` reports the TEE's own cost."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_tsqp, token_ids

from tsqp.errors import IntegrityError, TsqpError
from tsqp.measure.floor import Snapshot, cost
from tsqp.measure.replay import Recorder, Recording, Replayer
from tsqp.server.engine import Engine
from tsqp.stats import Stats
from tsqp.tee.compose import tee_model
from tsqp.tee.generate import generate
from tsqp.tee.remote import InProcess, Synchronous


def record(model_dir, prompt: list[int], new_tokens: int) -> tuple[Recording, list[int], torch.Tensor]:
    """A verified prefill's logits and a greedy generation, through a Recorder over an in-process engine."""
    recording = Recording()
    tee = tee_model(model_dir, Recorder(Synchronous(InProcess(Engine(str(model_dir)))), recording))
    tee.attach()
    tee.ops.open_session(len(prompt))
    logits = tee.forward(torch.tensor(prompt))
    tee.ops.close_session()
    return recording, generate(tee, prompt, new_tokens).generated_ids, logits


def replay(model_dir, recording: Recording, prompt: list[int], new_tokens: int, stats: Stats | None = None):
    stats = stats or Stats()
    tee = tee_model(model_dir, Replayer(recording, stats), stats)
    tee.attach()
    tee.ops.open_session(len(prompt))
    logits = tee.forward(torch.tensor(prompt))
    tee.ops.close_session()
    return generate(tee, prompt, new_tokens).generated_ids, logits


def test_replayed_run_computes_the_recorded_logits_and_tokens_with_no_server(tiny_model):
    prompt = token_ids(12).tolist()
    recording, tokens, logits = record(tiny_model, prompt, 5)
    stats = Stats()
    replayed_tokens, replayed_logits = replay(tiny_model, recording, prompt, 5, stats)
    assert replayed_tokens == tokens
    torch.testing.assert_close(replayed_logits, logits, rtol=0, atol=0)
    assert stats.rpc_calls == len(recording.methods) and stats.server_s == 0.0
    assert stats.tee_ops["verify"].count > 0  # the replies were checked


def test_a_tampered_recording_fails_verification(tiny_model):
    prompt = token_ids(12).tolist()
    recording, _, _ = record(tiny_model, prompt, 2)
    at = recording.methods.index("gate_up")
    wrong = recording.replies[at].tensors[0].clone()
    wrong[0, 0] += 1.0  # one product wrong by one
    recording.replies[at].tensors[0] = wrong
    with pytest.raises(IntegrityError):
        replay(tiny_model, recording, prompt, 2)


def test_a_run_that_asks_other_calls_than_the_recorded_one_is_refused(tiny_model):
    prompt = token_ids(12).tolist()
    recording, _, _ = record(tiny_model, prompt, 2)
    with pytest.raises(TsqpError, match="where the recorded run asked"):
        replay(tiny_model, recording, prompt, 5)  # more decode steps than were recorded


def test_cost_is_the_wall_time_less_the_wait_on_the_server_per_token_and_per_call():
    start = Snapshot({"verify": (2, 0.5)}, calls=10, waited_s=1.0, at=0.0)
    end = Snapshot({"verify": (6, 0.9), "rope": (3, 0.3)}, calls=30, waited_s=2.5, at=4.0)
    figures = cost(4.0, 8, start, end)
    assert figures["rpc_calls"] == 20 and figures["own_s"] == pytest.approx(4.0 - 1.5)
    assert figures["own_ms_per_token"] == pytest.approx(1e3 * figures["own_s"] / 8)
    assert figures["own_us_per_call"] == pytest.approx(1e6 * figures["own_s"] / 20)
    assert figures["ops"]["verify"]["count"] == 4 and figures["ops"]["verify"]["seconds"] == pytest.approx(0.4)
    assert figures["ops"]["rope"]["us_per_call"] == pytest.approx(1e6 * 0.3 / 20)
    assert list(figures["ops"]) == ["verify", "rope"]  # largest first


def test_bench_replay_reports_the_floor_next_to_the_run(tiny_model, tmp_path):
    path = tmp_path / "bench.json"
    result = run_tsqp(
        "bench", "--model", tiny_model, "--tokens", "20", "--decode", "4", "--replay", "--json", path, timeout=300
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(path.read_text())
    floor, run = figures["floor"], figures["tee_cost"]
    assert floor["same_tokens"] is True and floor["recorded_bytes"] > 0
    for span in ("prefill", "decode"):
        assert floor[span]["rpc_calls"] == run[span]["rpc_calls"] > 0, span
        assert floor[span]["tokens"] == run[span]["tokens"], span
        assert floor[span]["own_s"] == pytest.approx(floor[span]["seconds"], abs=1e-3), span  # nothing to wait on
        assert "verify" in floor[span]["ops"] and "rmsnorm" in floor[span]["ops"], span
    assert figures["rpc_calls"] == run["prefill"]["rpc_calls"]  # the existing fields stay
    assert "floor prefill" in result.stdout


def test_bench_replay_refuses_private_mode(tiny_model):
    result = run_tsqp("bench", "--model", tiny_model, "--tokens", "8", "--replay", "--private", timeout=300)
    assert result.returncode != 0 and "private mode's pads differ" in result.stderr
