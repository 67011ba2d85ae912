"""The floor's record and replay (measure/replay.py): a replayed run computes what the recorded one did, its
replies still checked, and `tsqp bench --replay` reports the TEE's own cost."""

from __future__ import annotations

import io
import json
from contextlib import contextmanager

import pytest
import torch
from conftest import run_tsqp, token_ids
from rich.console import Console

from tsqp.errors import IntegrityError, TsqpError
from tsqp.measure import bench
from tsqp.measure.floor import DecodeMark, Snapshot, cost
from tsqp.measure.replay import Recorder, Recording, Replayer
from tsqp.options import RunOptions
from tsqp.server.engine import Engine
from tsqp.stats import Stats
from tsqp.tee.compose import attach, run_attention, tee_model
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


def test_a_round_trips_parts_are_summed_per_call_from_its_timestamps():
    stats = Stats()
    # out after 10 us, the server starts 30 us later and computes 100 us, the reply in hand 20 us after
    stats.rpc("qkv", **call(0.0, sent_at=10e-6, server_start=40e-6, server_s=100e-6, done=160e-6))
    # 50 us of the TEE's own work; the TEE waits only from 300 us, after the server's end at 280 us
    stats.rpc("down", **call(210e-6, sent_at=220e-6, server_start=230e-6, server_s=50e-6, done=320e-6, waiting=300e-6))
    phases = {name: round(1e6 * seconds, 6) for name, seconds in stats.phase_s.items()}
    assert phases == {"send": 20, "to_server": 40, "compute": 150, "back": 40, "between": 50}
    start = Snapshot({}, calls=0, waited_s=0.0, at=0.0)
    figures = cost(320e-6, 1, start, Snapshot({}, calls=2, waited_s=0.0, at=320e-6, phases=stats.phase_s))
    assert figures["call_us"] == pytest.approx({"send": 10, "to_server": 20, "compute": 75, "back": 20, "between": 25})
    assert figures["beyond_compute_us"] == pytest.approx(50)  # send, to_server and back: not compute, not between


def test_decodes_between_counts_from_the_first_token_not_from_the_prefills_last_reply():
    stats = Stats()
    stats.rpc("lm_head", **call(0.0, sent_at=1e-6, server_start=2e-6, server_s=1e-6, done=4e-6))  # prefill's end
    mark = DecodeMark(stats)
    mark(7)  # the first token: decode starts here
    start = mark.first.at
    stats.rpc("qkv", **call(start + 30e-6, sent_at=start + 31e-6, server_start=start + 32e-6, server_s=1e-6,
                            done=start + 34e-6))  # fmt: skip
    assert stats.phase_s["between"] == pytest.approx(30e-6, abs=1e-9)  # not the sampling of the first token


def call(start: float, sent_at: float, server_start: float, server_s: float, done: float, waiting=None) -> dict:
    return dict(
        sent=0, received=0, serialize_s=0.0, deserialize_s=0.0, server_s=server_s, start=start, sent_at=sent_at,
        waiting=sent_at if waiting is None else waiting, done=done, server_start=server_start,
    )  # fmt: skip


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
        parts = run[span]["call_us"]  # a call's parts: what the server computed, and the rest, add up to its time
        assert parts["compute"] > 0 and floor[span]["call_us"]["compute"] == 0, span
        assert sum(parts.values()) * run[span]["rpc_calls"] / 1e6 <= run[span]["seconds"] * 1.01, span
    assert figures["rpc_calls"] == run["prefill"]["rpc_calls"]  # the existing fields stay
    assert "floor prefill" in result.stdout


def test_bench_replay_refuses_private_mode(tiny_model):
    result = run_tsqp("bench", "--model", tiny_model, "--tokens", "8", "--replay", "--private", timeout=300)
    assert result.returncode != 0 and "private mode's pads differ" in result.stderr


def test_bench_replay_times_a_run_that_records_nothing(tiny_model, monkeypatch):
    """--replay records the replies in a second, untimed run: the timed run's link is the client itself
    (a Recorder's copy of every reply, into fresh memory, would slow the run it measures)."""
    links = []

    @contextmanager
    def in_process(options, stats, wrap=None):
        link = Synchronous(InProcess(Engine(str(options.model_dir))))
        link = wrap(link) if wrap else link
        links.append(link)
        tee = tee_model(options.model_dir, link, stats, attention=run_attention(options.attention, False))
        attach(tee)
        yield tee

    monkeypatch.setattr(bench, "open_model", in_process)
    result = bench.run_bench(
        RunOptions(model_dir=tiny_model), 12, decode=3, replay=True, console=Console(file=io.StringIO())
    )
    assert [type(link).__name__ for link in links] == ["Synchronous", "Recorder"]  # timed, then recorded
    assert links[1].recording.nbytes == result["floor"]["recorded_bytes"] > 0
    assert result["floor"]["same_tokens"] is True
    assert result["floor"]["prefill"]["rpc_calls"] > 0 and result["floor"]["decode"]["tokens"] == 2
