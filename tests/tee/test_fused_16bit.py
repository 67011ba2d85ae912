"""Fused calls over a 16-bit wire (server/fused_calls.py, tee/calls.py): the server returns each later product's
input as it rounded it, and the TEE checks the product against that input and that input against its own, row
by row: ||server's - TEE's|| at most 2u ||TEE's|| (u the wire dtype's unit roundoff).

On one processor the two sides round alike: the separate calls' logits bit for bit, in a quarter of the round
trips. Only a short step fuses over a 16-bit wire (tuning.SHORT_STEP_ROWS): a long prefill's calls go apart.
A server whose float32 inputs differ from the TEE's in their last bits (another processor: a GPU's norms) can
round an element to the neighbouring 16-bit value: that passes. A server that computes a product from another
input is caught, whether it returns the input it used (the input check) or the TEE's rounding (the product's
check), call by call, at a decode step's end, or overlapped with the next call.
"""

from __future__ import annotations

import pytest
import torch
from conftest import token_ids
from support import FAMILY_MODELS, Counting

from tsqp.errors import IntegrityError
from tsqp.server.engine import Engine
from tsqp.tee.compose import tee_model
from tsqp.tee.remote import InProcess
from tsqp.tuning import SHORT_STEP_ROWS

CHECKED = ("at-step-end", "call-by-call", "overlapped")


def run(path, engine: Engine, fuse: bool = True, checked: str = "at-step-end", verify: bool = True, prompt: int = 9):
    """A prefill of `prompt` tokens and three decode steps, attention in the TEE: each one's logits, the last
    step's methods, and the TEE model (its link's methods in `tee.link`)."""
    link = Counting(engine)
    tee = tee_model(path, link, attention="tee", fuse=fuse, verify=verify)
    tee.attach()
    tee.link = link
    if verify:
        tee.ops.checker.defer_rows = 0 if checked != "at-step-end" else tee.ops.checker.defer_rows
        tee.ops.checker.overlap = checked == "overlapped"
    tee.ops.open_session(prompt + 3)
    logits = [tee.forward(token_ids(prompt, seed=3))]
    for pos, token in zip(range(prompt, prompt + 3), (5, 17, 42), strict=True):
        before = len(link.methods)
        logits.append(tee.forward(torch.tensor([token]), pos=pos))
        step = link.methods[before:]
    tee.ops.close_session()
    return logits, step, tee


class Nudged(Engine):
    """A 16-bit server whose later products' inputs are `nudge(h, layer, after)` of the honest float32 ones
    (fused calls only: it computes the product from what it returns); `lied` counts the nudges."""

    def __init__(self, path, dtype: str, nudge):
        super().__init__(str(path), dtype=dtype)
        self.lied = 0
        honest = self.norms.next_input

        def next_input(x, layer, after):
            h = nudge(honest(x, layer, after), layer, after)
            self.lied += 1
            return h

        self.norms.next_input = next_input


def one_unit_up(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """h with every fourth element moved to the next 16-bit value above its own rounding: what a last-bit
    difference across a rounding boundary does, at a rate no honest server reaches."""
    rounded = h.to(dtype)
    bits = rounded.view(torch.int16).clone()
    step = torch.where(rounded.float() >= 0, 1, -1).to(torch.int16)  # away from zero on the positive side
    bits.view(-1)[::4] += step.view(-1)[::4]
    return bits.view(dtype).float()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["llama", "gemma3-gqa"])
def test_a_16_bit_server_fuses_with_the_separate_calls_logits(checkpoints, name, dtype):
    path = checkpoints("fused16-" + name, seed=810, **FAMILY_MODELS.get(name, {}))
    engine = Engine(str(path), dtype=dtype)
    fused, fused_step, tee = run(path, engine)
    apart, apart_step, _ = run(path, engine, fuse=False)
    assert all(torch.equal(one, two) for one, two in zip(fused, apart, strict=True))
    L = tee.config.num_layers
    assert tee.ops.fused and len(fused_step) == L + 3 and len(apart_step) == 4 * L + 2
    checker = tee.ops.checker
    assert checker.checks["input"] == 4 * (3 * L - 1)  # gate_up's, down's and the next qkv's a layer, 4 steps
    margin = max(m for op, m in checker.margin.items() if op.startswith("input"))
    assert 0 < margin <= 0.5  # rounding alone: at most u ||h||, half the tolerance


@pytest.mark.parametrize("checked", CHECKED)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_inputs_one_unit_off_pass(checkpoints, dtype, checked):
    path = checkpoints("fused16-llama", seed=810)
    wire = getattr(torch, dtype)
    engine = Nudged(path, dtype, lambda h, layer, after: one_unit_up(h, wire))
    nudged, _, tee = run(path, engine, checked=checked)
    honest, _, _ = run(path, Engine(str(path), dtype=dtype), checked=checked)
    margin = max(m for op, m in tee.ops.checker.margin.items() if op.startswith("input"))
    assert engine.lied > 0 and 0.5 < margin <= 1.0
    assert any(not torch.equal(one, two) for one, two in zip(nudged, honest, strict=True))  # other products
    for one, two in zip(nudged, honest, strict=True):
        assert torch.allclose(one, two, atol=0.1, rtol=0.1)


def scaled(factor: float, at: tuple[int, str]):
    """A nudge that multiplies the input of layer `at[0]`'s product after `at[1]` by factor."""
    return lambda h, layer, after: h * factor if (layer, after) == at else h


@pytest.mark.parametrize("checked", CHECKED)
@pytest.mark.parametrize(
    "at, named", [((1, "o_proj"), "input \\(gate_up\\) of layer 1"), ((0, "down"), "input \\(qkv\\) of layer 1")]
)
def test_a_product_of_another_input_is_caught(checkpoints, checked, at, named):
    """The input 3% off (the tolerance: 2^-7 in bfloat16): the server returns what it used, and the input
    check names it; unverified, the lie changes the logits."""
    path = checkpoints("fused16-llama", seed=810)
    liar = Nudged(path, "bfloat16", scaled(1.03, at))
    with pytest.raises(IntegrityError, match=f"the server's {named} result is wrong"):
        run(path, liar, checked=checked)
    honest, _, _ = run(path, Engine(str(path), dtype="bfloat16"), verify=False)
    unchecked, _, _ = run(path, Nudged(path, "bfloat16", scaled(1.03, at)), verify=False)
    assert any(not torch.equal(one, two) for one, two in zip(unchecked, honest, strict=True))


class HidesItsInput(Engine):
    """Computes layer 1's gate_up from an input 3% off, and returns the honest rounding as the input it used."""

    def __init__(self, path):
        super().__init__(str(path), dtype="bfloat16")
        self.hidden = 0

    def step_o_proj_gate_up(self, calls):
        results = super().step_o_proj_gate_up(calls)
        if calls[0].args["layer"] == 1:
            weights = self.layers[1]
            echoed = {"gate_up": 1, "down": 2, "qkv": 3}[calls[0].args["through"]]
            for result in results:  # y, gate_up, ..., then the inputs: gate_up's first
                h = result[len(result) - echoed]
                result[1] = self.linears.columns(h * 1.03, weights.gate_up, weights.gate_up_bias, "gate_up")
                self.hidden += 1
        return results


@pytest.mark.parametrize("checked", CHECKED)
def test_a_product_of_another_input_is_caught_when_the_input_returned_is_the_honest_one(checkpoints, checked):
    path = checkpoints("fused16-llama", seed=810)
    liar = HidesItsInput(path)
    named = "gate_up \\(gate\\) of layer 1"  # its check comes before down's input's (the TEE's act is the lie's)
    with pytest.raises(IntegrityError, match=f"the server's {named} result is wrong"):
        run(path, liar, checked=checked)
    assert liar.hidden > 0


def test_a_long_prefill_sends_its_calls_apart_over_a_16_bit_wire(checkpoints):
    path = checkpoints("fused16-llama", seed=810)
    engine = Engine(str(path), dtype="bfloat16")
    _, step, tee = run(path, engine, prompt=SHORT_STEP_ROWS + 1)
    L = tee.config.num_layers
    prefill = tee.link.methods[: len(tee.link.methods) - 3 * len(step)]
    assert "o_proj_gate_up" not in prefill and prefill.count("gate_up") == L
    assert step.count("o_proj_gate_up") == L and len(step) == L + 3
    float32, _, tee = run(path, Engine(str(path)), prompt=SHORT_STEP_ROWS + 1)
    assert "gate_up" not in tee.link.methods  # a float32 wire fuses every step


class Older(Engine):
    """A 16-bit server that fuses but does not say it returns the later products' inputs (one from before)."""

    def op_init(self, peer, session_id, args):
        info, tensors = super().op_init(peer, session_id, args)
        del info["fused_inputs"]
        return info, tensors


def test_a_16_bit_server_that_returns_no_inputs_gets_the_calls_apart(checkpoints):
    path = checkpoints("fused16-llama", seed=810)
    engine = Engine(str(path), dtype="bfloat16")
    assert InProcess(engine)("init").args["fused_inputs"] is True
    assert InProcess(Engine(str(path)))("init").args["fused_inputs"] is False  # float32: nothing to return
    logits, step, tee = run(path, Older(str(path), dtype="bfloat16"))
    assert not tee.ops.fused and "o_proj_gate_up" not in step and len(step) == 4 * tee.config.num_layers + 2
    fused, _, _ = run(path, engine)
    assert all(torch.equal(one, two) for one, two in zip(logits, fused, strict=True))
