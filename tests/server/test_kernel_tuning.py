"""The server's measured kernel plan (kernel_tuning.py, kernels.set_plan): each large weight shape's kernels are
timed at load and ranked by row count; products then take the fastest usable one, fall back to the next
where a packed copy cannot be made, and equal torch.matmul whichever they take."""

import json

import pytest
import torch
from conftest import reference_logits, split_logits, token_ids

from tsqp.server import kernel_tuning, kernels
from tsqp.server.engine import Engine
from tsqp.tee.remote import InProcess

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN")


@pytest.fixture(autouse=True)
def fresh_plans(monkeypatch):
    """Small weights are measured too (by default only those of 64K elements and more); plans and packed copies
    made here are forgotten after each test."""
    monkeypatch.setattr(kernel_tuning, "TUNE_MIN_WEIGHTS", 0)
    monkeypatch.setattr(kernels, "_PLAN", {})
    monkeypatch.setattr(kernels, "_PACKED", {})
    monkeypatch.delenv("TSQP_CPU_LINEAR", raising=False)


def _weights(count: int, out: int = 80, inputs: int = 96, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(out, inputs, generator=generator) for _ in range(count)]


class FakeClock:
    """Time that passes only in products: `cost[name](rows)` seconds for each product a kernel runs."""

    def __init__(self, monkeypatch, cost):
        self.now, self.cost, self.runs = 0.0, cost, []
        real = kernels.run

        def run(name, x, weight, bias=None):
            self.now += cost[name](x.shape[0])
            self.runs.append(name)
            return real(name, x, weight, bias)

        monkeypatch.setattr(kernels, "run", run)

    def __call__(self) -> float:
        return self.now


def test_each_shape_is_ranked_by_its_measured_time_per_row_count(monkeypatch):
    # mkl fastest for one row, the weight on the left for 2 to 8, packed from 9 rows on; onednn never first
    cost = {
        "mkl": lambda rows: 1.0 if rows == 1 else 50.0,
        "left": lambda rows: 2.0,
        "packed": lambda rows: 3.0 if rows > 8 else 4.0,
        "onednn": lambda rows: 5.0,
    }
    clock = FakeClock(monkeypatch, cost)
    weights = _weights(5)
    measured = kernel_tuning.tune(weights, clock=clock)
    plan = kernels.plan_for(weights[0])
    assert plan[1] == ("mkl", "packed", "onednn")  # the weight on the left is not timed for one row
    assert all(plan[rows] == ("left", "packed", "onednn", "mkl") for rows in (2, 4, 8))
    assert plan[16] == plan[64] == ("packed", "onednn", "mkl")
    sample = kernel_tuning.SAMPLE_WEIGHTS
    figures = measured["80x96"]
    gigabytes = sample * 80 * 96 * 4 / 1e9
    assert figures[1]["mkl"] == pytest.approx(1000 * sample * 1.0 / gigabytes)  # ms a GB, over the sample
    assert set(figures) == set(kernels.PLAN_ROWS)
    # packed ranks first somewhere: every weight of the shape has its copy now, not at its first product
    assert all(kernels._PACKED.get(id(w)) is not None for w in weights)
    assert kernel_tuning.describe(measured) == "80x96: mkl 1, left 2-8, packed 16-64 rows"


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 40, 100])
def test_a_product_takes_its_row_counts_plan_and_equals_matmul(monkeypatch, rows):
    w, bias = _weights(1)[0], torch.randn(80)
    kernels.set_plan(
        w,
        {1: ("mkl",), 2: ("left",), 4: ("onednn",), 8: ("packed",), 16: ("left", "mkl"), 64: ("packed", "mkl")},
    )
    taken = []
    real = kernels.run
    monkeypatch.setattr(kernels, "run", lambda name, *args: taken.append(name) or real(name, *args))
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
    y = kernels.linear(x, w, bias)
    out = torch.full((rows, 80), float("nan"))
    assert kernels.linear_into(out, x, w, bias).data_ptr() == out.data_ptr()
    expected = torch.addmm(bias, x, w.t())
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    assert kernels.plan_rows(rows) == {1: 1, 2: 2, 3: 4, 8: 8, 9: 16, 40: 64, 100: 64}[rows]
    assert kernels.kernel_for(x, w, bias) == kernels.plan_for(w)[kernels.plan_rows(rows)][0]
    assert taken[0] == kernels.kernel_for(x, w, bias)


def test_a_plan_falls_back_past_packed_without_its_copy(monkeypatch):
    w = _weights(1)[0]
    kernels.set_plan(w, {rows: ("packed", "onednn", "mkl") for rows in kernels.PLAN_ROWS})
    x = torch.randn(4, 96)
    monkeypatch.setattr(kernels, "PACK_RESERVE_FRACTION", 1.0)  # no host has all its memory free
    assert kernels.kernel_for(x, w) == "onednn"
    monkeypatch.setattr(kernels, "_PACKED", {})
    monkeypatch.setenv("TSQP_CPU_LINEAR", "unpacked")
    monkeypatch.setattr(kernels, "PACK_RESERVE_FRACTION", 0.0)
    assert kernels.kernel_for(x, w) == "onednn", "unpacked: the plan's other kernels only"
    assert kernels._PACKED == {}
    monkeypatch.setenv("TSQP_CPU_LINEAR", "mkl")
    monkeypatch.setattr(kernels, "_ONEDNN", None)  # decided once a process: decided again
    assert kernels.kernel_for(x, w) == "mkl", "a fixed kernel named overrides the plan"
    monkeypatch.delenv("TSQP_CPU_LINEAR")
    monkeypatch.setattr(kernels, "_ONEDNN", None)
    assert kernels.kernel_for(x, w) == "packed"
    torch.testing.assert_close(kernels.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-4)


def test_packed_copies_made_for_timing_are_freed_when_packed_never_wins(monkeypatch):
    cost = {"packed": lambda rows: 9.0, "onednn": lambda rows: 1.0, "left": lambda rows: 5.0, "mkl": lambda rows: 2.0}
    weights = _weights(4)
    kernel_tuning.tune(weights, clock=FakeClock(monkeypatch, cost))
    assert "packed" in kernels.plan_for(weights[0])[1]  # timed ...
    assert all(id(w) not in kernels._PACKED for w in weights)  # ... and its copies gone
    assert kernels.kernel_for(torch.randn(3, 96), weights[0]) == "onednn"


def test_a_large_weight_is_timed_on_its_first_rows_and_small_ones_several_at_a_time(monkeypatch):
    monkeypatch.setattr(kernel_tuning, "SAMPLE_BYTES", 100 * 96 * 4)
    shapes = []
    monkeypatch.setattr(kernel_tuning, "measure", lambda sample, clock: shapes.append([s.shape for s in sample]) or {})
    monkeypatch.setattr(kernels, "set_plan", lambda weight, rankings: None)
    kernel_tuning.tune(_weights(2, out=300) + _weights(3, out=40), clock=lambda: 0.0)
    assert shapes == [[(100, 96)], [(40, 96), (40, 96), (40, 96)]]


def test_a_real_measurement_plans_every_row_count_and_every_kernel_equals_matmul():
    weights = _weights(3, out=64, inputs=48)
    measured = kernel_tuning.tune(weights)
    figures = measured["64x48"]
    assert set(figures) == set(kernels.PLAN_ROWS)
    assert all(ms > 0 for times in figures.values() for ms in times.values())
    assert {"onednn", "mkl"} <= set(figures[1]) and "left" in figures[2] and "left" not in figures[16]
    plan = kernels.plan_for(weights[0])
    for rows in kernels.PLAN_ROWS:
        assert plan[rows][0] == min(figures[rows], key=figures[rows].get)
        x = torch.randn(rows, 48)
        for name in plan[rows]:
            if name == "packed" and kernels.packed_copy(weights[1]) is None:
                continue
            torch.testing.assert_close(kernels.run(name, x, weights[1]), x @ weights[1].t(), rtol=1e-5, atol=1e-4)
    assert kernel_tuning.tune(weights) == {}, "a shape is measured once"


def test_nothing_is_measured_when_a_fixed_kernel_is_named_or_for_other_dtypes(monkeypatch):
    assert kernel_tuning.tune([w.double() for w in _weights(2)]) == {}
    monkeypatch.setenv("TSQP_CPU_LINEAR", "onednn")
    weights = _weights(2)
    assert kernel_tuning.tune(weights) == {}
    assert kernels.plan_for(weights[0]) is None


def test_a_tuned_engine_reports_its_plan_and_its_logits_match_transformers(tiny_model, tiny_reference):
    engine = Engine(str(tiny_model))
    plan = engine.op_ping(b"peer", None, {})[0]["kernels"]
    c = engine.config
    assert f"{c.vocab_size}x{c.hidden_size}" in plan and f"{2 * c.intermediate_size}x{c.hidden_size}" in plan
    assert all(set(rows) == {str(r) for r in kernels.PLAN_ROWS} for rows in plan.values())
    assert all(name in kernels.KERNELS for rows in plan.values() for name in rows.values())
    ids = token_ids(12)
    logits = split_logits(tiny_model, InProcess(engine), ids)
    torch.testing.assert_close(logits, reference_logits(tiny_reference, ids), rtol=1e-4, atol=1e-4)


# -- the plan kept per host (kernel_plans.py): measured once, the same kernels at every start ---------------


def test_a_kept_plan_is_reused_and_not_measured_again(monkeypatch, tmp_path):
    from tsqp.server.kernel_plans import PlanStore

    store = PlanStore(tmp_path, "auto")
    first = {"mkl": lambda rows: 1.0, "left": lambda rows: 2.0, "packed": lambda rows: 3.0, "onednn": lambda rows: 4.0}
    weights = _weights(3)
    measured = kernel_tuning.tune(weights, clock=FakeClock(monkeypatch, first), store=store)
    assert store.path.is_file() and store.load() == measured
    plan = kernels.plan_for(weights[0])
    assert plan[1][0] == "mkl"

    # a restart on a host whose timings now say otherwise: the kept figures decide, nothing is timed
    monkeypatch.setattr(kernels, "_PLAN", {})
    flipped = {
        "mkl": lambda rows: 9.0,
        "left": lambda rows: 8.0,
        "packed": lambda rows: 7.0,
        "onednn": lambda rows: 1.0,
    }
    clock = FakeClock(monkeypatch, flipped)
    again = kernel_tuning.tune(_weights(3, seed=5), clock=clock, store=store)
    assert again == measured and clock.runs == []
    assert kernels.plan_for(weights[0]) == plan

    # another shape is measured and added beside the first
    kernel_tuning.tune(_weights(2, out=40), clock=clock, store=store)
    assert set(store.load()) == {"80x96", "40x96"} and clock.runs


def test_a_kept_plan_belongs_to_one_host_identity_and_a_broken_file_is_measured_again(monkeypatch, tmp_path):
    from tsqp.server import kernel_plans

    store = kernel_plans.PlanStore(tmp_path, "auto")
    assert kernel_plans.PlanStore(tmp_path, "unpacked").path != store.path, "another kernel choice, another file"
    monkeypatch.setattr(kernel_plans, "cpu_model", lambda: "another processor")
    assert kernel_plans.PlanStore(tmp_path, "auto").path != store.path
    monkeypatch.undo()
    store.path.write_text("{not json")
    assert store.load() == {}
    cost = {name: (lambda rows: 1.0) for name in kernels.KERNELS}
    monkeypatch.setattr(kernel_tuning, "TUNE_MIN_WEIGHTS", 0)
    monkeypatch.setattr(kernels, "_PLAN", {})
    clock = FakeClock(monkeypatch, cost)
    kernel_tuning.tune(_weights(2), clock=clock, store=store)
    assert clock.runs and set(store.load()) == {"80x96"}


@pytest.mark.subprocess
def test_the_same_request_gives_the_same_logits_across_server_restarts(checkpoints, tmp_path):
    """Three `tsqp logits` runs, each with its own server start, share a cache: the first measures the kernels of
    every weight shape (all tunable here), the others plan from its figures; the logits are equal bit for bit."""
    import numpy as np
    from conftest import run_tsqp

    model = checkpoints("tunable", seed=3, vocab_size=512, hidden_size=256, intermediate_size=512)
    env = {"TSQP_CACHE": str(tmp_path / "cache")}
    outputs = []
    for start in range(3):
        out = tmp_path / f"logits-{start}.npy"
        ids = ",".join(str(i) for i in token_ids(9).tolist())
        result = run_tsqp("logits", "--model", model, "--token-ids", ids, "--out", out, env=env)
        assert result.returncode == 0, result.stderr
        outputs.append(np.load(out))
    kept = list((tmp_path / "cache" / "kernels").glob("*.json"))
    shapes = set(json.loads(kept[0].read_text())["shapes"]) if len(kept) == 1 else set()
    assert {"512x256", "256x256", "1024x256", "256x512"} <= shapes, kept
    assert np.array_equal(outputs[0], outputs[1]) and np.array_equal(outputs[0], outputs[2])
