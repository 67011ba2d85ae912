"""A prefill's checks while the server computes the next call (checks.Overlapped, `--pipeline on`).

Each result is checked after the next request has gone out and before its reply is read, in the forward
order; the logits are those of the checks made in between; a lie is caught and named as before (the whole
matrix: test_lying_server.py, "overlapped"), and the request in flight when a check fails is given up;
`--pipeline auto` overlaps only for a server that computes apart from the TEE's cores (wire/cores.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import token_ids
from support import FAMILY_MODELS

from tsqp.errors import IntegrityError
from tsqp.server.engine import Engine
from tsqp.tee import verify
from tsqp.tee.checks import Overlapped
from tsqp.tee.compose import tee_model
from tsqp.tee.remote import InProcess
from tsqp.wire.protocol import Message

HOOKS = ("embedding", "qkv", "gate_up", "down", "lm_head")


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("overlap-gqa", seed=31, num_attention_heads=4, num_key_value_heads=2)


class Events(InProcess):
    """An in-process link that records each call's method and layer as it is submitted."""

    def __init__(self, engine: Engine, events: list):
        super().__init__(engine)
        self.events = events

    def __call__(self, method, args=None, tensors=(), session=None, reply_bytes=0) -> Message:
        self.events.append(("call", method, (args or {}).get("layer")))
        return super().__call__(method, args, tensors, session=session, reply_bytes=reply_bytes)


def prefill(model, pipeline: str, monkeypatch):
    """A 24-token prefill through the server's attention, the checks' hooks recorded as they run."""
    events = []
    monkeypatch.undo()  # an earlier run's recorders
    for hook in HOOKS:
        original = getattr(verify.Immediate, hook)

        def recorded(self, *args, _original=original, _hook=hook):
            layer = args[0] if _hook not in ("embedding", "lm_head") else None
            events.append(("check", _hook, layer))
            return _original(self, *args)

        monkeypatch.setattr(verify.Immediate, hook, recorded)
    tee = tee_model(model, Events(Engine(str(model)), events), pipeline=pipeline, attention="server")
    tee.attach()
    tee.ops.checker.defer_rows = 0  # every step call by call
    tee.ops.open_session(24)
    logits = tee.forward(token_ids(24, seed=8))
    return logits, events, tee


def test_each_result_is_checked_while_the_server_computes_the_next_call(model, monkeypatch):
    apart, before, _ = prefill(model, "off", monkeypatch)
    overlapped, during, tee = prefill(model, "on", monkeypatch)
    assert isinstance(tee.ops.calls.step, verify.Immediate)  # the step ended with lm_head
    torch.testing.assert_close(overlapped, apart, rtol=0, atol=0)  # the same computation, checked elsewhere
    assert [e for e in during if e[0] == "check"] == [e for e in before if e[0] == "check"]  # each, in order

    def next_call(events, check):
        """The call submitted last before the check ran."""
        return [e for e in events[: events.index(check)] if e[0] == "call"][-1][1:]

    # down_qkv computes down and the next layer's qkv: their checks run during layer + 1's scores
    assert next_call(before, ("check", "gate_up", 0)) == ("gate_up", 0)
    assert next_call(during, ("check", "gate_up", 0)) == ("down_qkv", 0)
    assert next_call(before, ("check", "down", 0)) == ("down_qkv", 0)
    assert next_call(during, ("check", "down", 0)) == ("scores", 1)
    assert next_call(during, ("check", "qkv", 1)) == ("scores", 1)
    assert next_call(during, ("check", "embedding", None)) == ("qkv", 0)
    last = tee.config.num_layers - 1
    assert next_call(during, ("check", "down", last)) == ("lm_head", None)  # before the logits are read


@pytest.mark.parametrize("attention", ["server", "tee", "decode"])
@pytest.mark.parametrize("name", ["llama", *FAMILY_MODELS])
def test_every_family_passes_its_held_checks_with_the_same_logits(checkpoints, name, attention):
    """A held check reads its result after the forward pass went on from it: no family's step may have
    written a result in place by then (an honest server would fail), and the logits are bit for bit those
    of the checks made in between. Short steps too (a decode step checked at its end)."""
    path = checkpoints("overlap-" + name, seed=41, **FAMILY_MODELS.get(name, {}))
    engine = Engine(str(path))
    logits = {}
    for pipeline in ("off", "on"):
        tee = tee_model(path, InProcess(engine), pipeline=pipeline, attention=attention)
        tee.attach()
        tee.ops.checker.defer_rows = 4  # a 20-token prefill is call by call, the decode steps at their end
        tee.ops.open_session(22)
        logits[pipeline] = [tee.forward(token_ids(20, seed=6)), tee.forward(torch.tensor([7]), pos=20)]
        logits[pipeline].append(tee.forward(torch.tensor([9]), pos=21))
        assert tee.ops.checker.checks["gate_up"] > 0 and tee.ops.checker.failure is None
        tee.ops.close_session()
    for on, off in zip(logits["on"], logits["off"], strict=True):
        torch.testing.assert_close(on, off, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("op", "layer", "named"),
    [
        ("gate_up", 1, "gate_up \\(gate\\)"),
        ("attn_out", 1, "attn_out"),
        ("down_qkv", 0, "down"),
        ("lm_head", None, "lm_head"),
    ],
)
def test_a_lie_is_named_and_the_call_in_flight_given_up(model, op, layer, named):
    engine = Engine(str(model))
    honest = InProcess(engine)

    def lying(method, args=None, tensors=(), session=None, reply_bytes=0):
        reply = honest(method, args, tensors, session=session, reply_bytes=reply_bytes)
        if method == op and (args or {}).get("layer") == layer:
            first = reply.tensors[0].clone()
            first[3, 5] += 0.5
            return Message(reply.header, [first, *reply.tensors[1:]])
        return reply

    tee = tee_model(model, lying, pipeline="on", attention="server")
    tee.attach()
    tee.ops.checker.defer_rows = 0
    tee.ops.open_session(24)
    where = "" if layer is None else f" of layer {layer}"
    with pytest.raises(IntegrityError, match=f"the server's {named}{where} result is wrong"):
        tee.forward(token_ids(24, seed=8))
    assert tee.ops.link.replies == {}  # the request sent before the check failed was given up
    with pytest.raises(IntegrityError, match="an earlier integrity check failed"):
        tee.forward(token_ids(4, seed=9), pos=0)


@pytest.mark.parametrize(
    ("pipeline", "apart", "overlaps"),
    [("auto", False, False), ("auto", True, True), ("on", False, True), ("off", True, False)],
)
def test_auto_overlaps_only_a_server_apart_from_the_tees_cores(model, pipeline, apart, overlaps):
    tee = tee_model(model, InProcess(Engine(str(model))), pipeline=pipeline)
    checker = tee.ops.checker
    checker.init(torch.float32, apart)
    checker.open_session(24)
    step = checker.begin_step(0, 200, tee.ops.attention)
    assert isinstance(step, Overlapped) == overlaps
    assert checker.begin_step(0, 1, tee.ops.attention) is not step  # a decode step: checked at its end
