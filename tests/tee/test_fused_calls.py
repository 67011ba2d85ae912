"""The plain split's fused calls (server/fused_calls.py): o_proj with the layer's gate_up and down and the next
layer's qkv, or down with the next qkv, each later product computed by the server from the residual stream
the TEE sends.

They give the unfused calls' logits bit for bit (the server's norms, residual adds and gated activation are
the TEE's own float32 operations), in every family and attention mode, in a quarter of the round trips of a
step with attention in the TEE; a server that computes a later product from anything but the TEE's stream
fails the check of that product; a server that does not fuse (a tensor-parallel one says so in its init
reply) gets the calls apart.
"""

from __future__ import annotations

import pytest
import torch
from conftest import token_ids
from support import FAMILY_MODELS, Counting

from tsqp.errors import IntegrityError, ProtocolError, ServerError, TsqpError
from tsqp.server.engine import Engine
from tsqp.server.fused_calls import THROUGH
from tsqp.tee.compose import tee_model
from tsqp.tee.remote import InProcess
from tsqp.wire.protocol import Message


def prefill_and_steps(path, engine: Engine, fuse: bool, attention: str, verify: bool = True):
    """A 9-token prefill and three decode steps: the logits of each, and the link's methods of the last step."""
    link = Counting(engine)
    tee = tee_model(path, link, attention=attention, fuse=fuse, verify=verify)
    tee.attach()
    tee.ops.open_session(12)
    logits = [tee.forward(token_ids(9, seed=3))]
    for pos, token in zip(range(9, 12), (5, 17, 42), strict=True):
        before = len(link.methods)
        logits.append(tee.forward(torch.tensor([token]), pos=pos))
        step = link.methods[before:]
    tee.ops.close_session()
    return logits, step, tee


@pytest.mark.parametrize("attention", ["tee", "decode", "server"])
@pytest.mark.parametrize("name", ["llama", "qwen2-gqa", "qwen3-gqa", "mistral-window-gqa", "gemma3-gqa"])
def test_fused_calls_give_the_unfused_logits_in_fewer_calls(checkpoints, name, attention):
    path = checkpoints("fused-" + name, seed=800, **FAMILY_MODELS.get(name, {}))
    engine = Engine(str(path))
    fused, fused_step, tee = prefill_and_steps(path, engine, True, attention)
    apart, apart_step, _ = prefill_and_steps(path, engine, False, attention)
    for one, two in zip(fused, apart, strict=True):
        assert torch.equal(one, two)
    L = tee.config.num_layers
    if attention == "server":  # attn_out is not fused: down_qkv only
        assert fused_step.count("down_qkv") == L - 1 and len(fused_step) == len(apart_step) - (L - 1)
    else:  # embedding, qkv of layer 0, one a layer (through the next qkv, the last through down), lm_head
        assert fused_step.count("o_proj_gate_up") == L and len(fused_step) == L + 3 and len(apart_step) == 4 * L + 2
    assert tee.ops.checker.checks["gate_up"] > 0 and max(tee.ops.checker.margin.values()) < 0.5


def test_a_bfloat16_server_computes_fused_calls_as_the_separate_ones(checkpoints):
    """The server's fused call rounds each input to bfloat16 as the TEE rounds what it sends: on one processor,
    the separate calls' results bit for bit (what the TEE then does with them: tests/tee/test_fused_16bit.py)."""
    path = checkpoints("fused-gemma3-gqa", seed=800, **FAMILY_MODELS["gemma3-gqa"])
    assert separate_and_fused(path, Engine(str(path), dtype="bfloat16"))


class OtherStream(Engine):
    """Computes a fused call's second product from a residual stream off by `delta` in one element."""

    def __init__(self, path, delta: float, after: str):
        super().__init__(str(path))
        self.delta, self.after, self.lied = delta, after, 0
        honest = self.norms.after

        def after(x, y, layer, product):
            stream = honest(x, y, layer, product)
            if product == self.after and layer == 1:
                stream[-1, 3] += self.delta
                self.lied += 1
            return stream

        self.norms.after = after


@pytest.mark.parametrize(
    "after, named", [("o_proj", "gate_up \\(gate\\) of layer 1"), ("down", "qkv \\(q\\) of layer 2")]
)
@pytest.mark.parametrize("delta", [1e-2, 1.0])
def test_a_product_of_another_stream_is_caught(checkpoints, after, named, delta):
    path = checkpoints("fused-llama-3", seed=801, num_hidden_layers=3)
    honest, _, _ = prefill_and_steps(path, Engine(str(path)), True, "tee")
    liar = OtherStream(path, delta, after)
    with pytest.raises(IntegrityError, match=f"the server's {named} result is wrong"):
        prefill_and_steps(path, liar, True, "tee")
    assert liar.lied >= 1
    unchecked, _, _ = prefill_and_steps(path, OtherStream(path, delta, after), True, "tee", verify=False)
    assert any(not torch.equal(one, two) for one, two in zip(unchecked, honest, strict=True))  # the lie tells


class Unfused(Engine):
    fuses = False  # as a tensor-parallel server's init reply says


def test_a_server_that_does_not_fuse_gets_the_calls_apart_and_refuses_fused_ones(checkpoints):
    path = checkpoints("fused-llama", seed=800, **FAMILY_MODELS.get("llama", {}))
    engine = Unfused(str(path))
    assert InProcess(engine)("init").args["fused"] is False
    logits, step, tee = prefill_and_steps(path, engine, True, "tee")
    assert "o_proj_gate_up" not in step and len(step) == 4 * tee.config.num_layers + 2
    fused, _, _ = prefill_and_steps(path, Engine(str(path)), True, "tee")
    assert all(torch.equal(one, two) for one, two in zip(logits, fused, strict=True))
    c = engine.config
    session = InProcess(engine)("open_session", {"capacity": 4}).args["session"]
    args = {"layer": 0, "pos": 0, "values": True}
    with pytest.raises(ServerError, match="does not compute fused calls"):
        InProcess(engine)(
            "down_qkv", args, [torch.randn(1, c.intermediate_size), torch.randn(1, c.hidden_size)], session
        )


@pytest.mark.parametrize(
    "method, layer, residual, message",
    [
        ("down_qkv", 0, lambda h: torch.randn(1, h, dtype=torch.float64), "residual stream is float32"),
        ("down_qkv", 0, lambda h: torch.randn(2, h), "residual stream is float32"),
        ("down_qkv", 1, lambda h: torch.randn(1, h), "argument 'layer'"),  # the last layer's down has no next qkv
        ("o_proj_gate_up", 0, lambda h: torch.randn(1, h - 1), "residual stream is float32"),
    ],
)
def test_fused_calls_are_validated(tiny_model, method, layer, residual, message):
    engine = Engine(str(tiny_model))
    c = engine.config
    assert c.num_layers == 2
    session = InProcess(engine)("open_session", {"capacity": 4}).args["session"]
    first = torch.randn(1, c.intermediate_size if method == "down_qkv" else c.q_dim)
    args = {"layer": layer, "pos": 0}
    request = Message({"id": 1, "method": method, "session": session, "args": args}, [first, residual(c.hidden_size)])
    with pytest.raises((ProtocolError, TsqpError), match=message):
        engine.handle(b"in-process", request)


def separate_and_fused(path, engine: Engine) -> bool:
    """o_proj_gate_up through gate_up, down and qkv against the separate calls on the inputs the TEE computes
    (model/elementwise.py, each rounded to the server dtype as the TEE sends it): True when every product is
    the same bit for bit."""
    c, link = engine.config, InProcess(engine)
    tee = tee_model(path, link, fuse=False)
    tee.attach()
    wire = tee.ops.calls.to_wire
    session = link("open_session", {"capacity": 4}).args["session"]
    torch.manual_seed(5)
    a, x = wire(torch.randn(2, c.q_dim)), torch.randn(2, c.hidden_size)
    norms, activation = tee.norms, tee.activation
    (y,) = link("o_proj", {"layer": 0}, [a], session).tensors
    x_mid = norms.after(x, y, 0, "o_proj")
    h_mlp = wire(norms.next_input(x_mid, 0, "o_proj"))
    (gate_up,) = link("gate_up", {"layer": 0}, [h_mlp], session).tensors
    gate_up = gate_up.float()
    act = activation(gate_up[:, : c.intermediate_size]).mul_(gate_up[:, c.intermediate_size :])
    (down,) = link("down", {"layer": 0}, [wire(act)], session).tensors
    h = norms.next_input(norms.after(x_mid, down, 0, "down"), 0, "down")
    qk, v = link("qkv", {"layer": 1, "pos": 0, "values": True}, [wire(h)], session).tensors
    separate, inputs = [y, gate_up.to(y.dtype), down, qk, v], [h_mlp, wire(act), wire(h)]
    same = True
    for through, count, echoes in (("gate_up", 2, 1), ("down", 3, 2), ("qkv", 5, 3)):
        args = {"layer": 0, "through": through, "pos": 0, "values": True}
        fused = link("o_proj_gate_up", args, [a, x], session).tensors
        echoes *= engine.dtype.itemsize == 2  # a 16-bit server returns the later products' inputs after them
        same &= len(fused) == count + echoes
        same &= all(torch.equal(f, s) for f, s in zip(fused, separate[:count] + inputs[:echoes], strict=True))
    return same


def test_each_through_returns_the_separate_calls_results(tiny_model):
    """o_proj_gate_up through gate_up, down and qkv: each product equals its own call's, bit for bit on this
    server; qkv at the last layer and unknown values are refused."""
    engine = Engine(str(tiny_model))
    assert separate_and_fused(tiny_model, engine)
    c, link = engine.config, InProcess(engine)
    session = link("open_session", {"capacity": 4}).args["session"]
    a, x = torch.randn(2, c.q_dim), torch.randn(2, c.hidden_size)
    requests = [
        Message({"id": 1, "method": "o_proj_gate_up", "args": {"layer": 0, "through": t}}, [a, x]) for t in THROUGH
    ]
    assert len({engine.batch_key(request) for request in requests}) == 3  # two clients' differ: never one step
    for args in ({"layer": 1, "through": "qkv", "pos": 0}, {"layer": 0, "through": "lm_head"}):
        with pytest.raises(ServerError, match="argument 'through'"):
            link("o_proj_gate_up", args, [a, x], session)
