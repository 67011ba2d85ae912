"""Decode steps checked at their end (step_checks.py) against the same steps checked call by call.

Deferring must change nothing a user can see: the same logits, the same number of checks, the same op
and layer named when a result is wrong (the first one in forward order), and a step that fails half-way
must leave the attention checks' running state as it was. tests/tee/test_lying_server.py runs its whole
tampering matrix both ways.
"""

from __future__ import annotations

import pytest
import torch
from conftest import token_ids
from lying_server import products

from tsqp.errors import IntegrityError
from tsqp.server.engine import Engine
from tsqp.tee.compose import tee_model
from tsqp.tee.forward import TeeModel
from tsqp.tee.remote import InProcess
from tsqp.tee.step_checks import StepChecks
from tsqp.tuning import SHORT_STEP_ROWS

SEED = 99


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("step-gqa-bias", seed=21, num_key_value_heads=2, attention_bias=True, mlp_bias=True)


def tee_for(model, engine=None, deferred: bool = True, dtype: str = "float32") -> TeeModel:
    tee = tee_model(model, InProcess(engine or Engine(str(model), dtype=dtype)))
    tee.ops.checker.generator.manual_seed(SEED)
    tee.ops.checker.defer_rows = tee.ops.checker.defer_rows if deferred else 0
    tee.attach()
    return tee


def decode(tee: TeeModel, steps: int = 5, prompt: int = SHORT_STEP_ROWS + 20) -> list[torch.Tensor]:
    tee.ops.open_session(prompt + steps)
    out = [tee.forward(token_ids(prompt, seed=3))]  # longer than defer_rows: checked call by call
    out += [tee.forward(token_ids(1, seed=pos), pos=pos) for pos in range(prompt, prompt + steps)]
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_steps_are_checked_once_each_with_the_same_results(model, monkeypatch, dtype):
    settled = []
    real = StepChecks.settle
    monkeypatch.setattr(StepChecks, "settle", lambda step: settled.append(step.pos) or real(step))
    deferred, immediate = tee_for(model, dtype=dtype), tee_for(model, deferred=False, dtype=dtype)
    got, expected = decode(deferred), decode(immediate)
    first = SHORT_STEP_ROWS + 20
    assert settled == list(range(first, first + 5))  # each decode step once; the prefill is checked as it goes
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)  # the checks do not touch what the forward pass computes
    assert deferred.ops.checker.checks == immediate.ops.checker.checks
    assert deferred.ops.checker.comparisons == immediate.ops.checker.comparisons
    assert set(deferred.ops.checker.margin) == set(immediate.ops.checker.margin)
    assert max(deferred.ops.checker.margin.values()) < 0.6  # honest results stay well inside the tolerance


def test_a_step_abandoned_half_way_leaves_the_attention_state(model):
    tee = tee_for(model)
    tee.ops.open_session(16)
    tee.forward(token_ids(12, seed=4))
    tee.forward(token_ids(1, seed=5), pos=12)
    state = tee.ops.checker.state
    before = (state.c.clone(), state.kr.clone(), state.k_sq.clone(), list(state.c_filled), list(state.k_filled))
    real, calls = tee.softmax_, []

    def failing_in_layer_1(block):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the TEE failed")
        return real(block)

    tee.softmax_ = failing_in_layer_1
    with pytest.raises(RuntimeError):
        tee.forward(token_ids(1, seed=6), pos=13)
    tee.softmax_ = real
    after = (state.c, state.kr, state.k_sq, state.c_filled, state.k_filled)
    for was, now in zip(before, after, strict=True):
        assert torch.equal(was, now) if isinstance(was, torch.Tensor) else was == now
    logits = tee.forward(token_ids(1, seed=6), pos=13)  # the same step again: its checks pass
    reference = tee_for(model)
    reference.ops.open_session(16)
    reference.forward(token_ids(12, seed=4))
    reference.forward(token_ids(1, seed=5), pos=12)
    assert torch.equal(logits, reference.forward(token_ids(1, seed=6), pos=13))


class ZeroingEngine(Engine):
    """Zeros the results of (method, layer) pairs from a given position on (decode steps only)."""

    def __init__(self, model, lies: set[tuple[str, int]], from_pos: int):
        super().__init__(str(model))
        self.lies, self.from_pos, self.pos = lies, from_pos, 0

    def handle(self, peer, request, *rest, **options):
        reply_args, results = super().handle(peer, request, *rest, **options)
        args = request.args
        if "pos" in args:
            self.pos = args["pos"]
        for method, layer, part in products(request, results):  # a fused call's two (lying_server.products)
            if (method, layer) in self.lies and self.pos >= self.from_pos:
                for t in part:
                    t.zero_()
        return reply_args, results


@pytest.mark.parametrize(
    "lies, named",
    [
        ({("down", 0), ("down", 1)}, "down of layer 0"),  # the earlier layer
        ({("down", 1), ("gate_up", 1)}, "gate_up \\(gate\\) of layer 1"),  # the earlier op of the layer
        ({("attn_out", 1), ("qkv", 1)}, "qkv \\(q\\) of layer 1"),
        ({("scores", 0), ("down", 0)}, "scores of layer 0"),
    ],
)
def test_the_first_wrong_result_in_forward_order_is_named(model, lies, named):
    messages = []
    for deferred in (True, False):
        tee = tee_for(model, ZeroingEngine(model, lies, from_pos=8), deferred=deferred)
        tee.ops.open_session(10)
        tee.forward(token_ids(8, seed=7))
        with pytest.raises(IntegrityError, match=f"the server's {named} result is wrong") as failure:
            tee.forward(token_ids(1, seed=8), pos=8)
        messages.append(str(failure.value))
        with pytest.raises(IntegrityError, match="an earlier integrity check failed"):
            tee.forward(token_ids(1, seed=8), pos=8)
    assert len({message.split(": off by")[0] for message in messages}) == 1  # the same index, too
