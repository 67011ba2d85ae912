"""A lying server against verified mode: every kind of tampering with every op is caught.

The matrix: each op's result (the q and k parts of qkv and the gate and up parts of gate_up apart)
tampered in each way of `lying_server.KINDS`, and a server that caches other keys or values than it
should, for float32, bfloat16 and float16 servers. Every case must raise IntegrityError naming the op
and layer in verified mode, and must run through unverified with other outputs than the honest
server's: so each case is an attack that verification stops, not a no-op.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_tsqp, wait_for
from lying_server import KINDS, OPS, PROMPTS, TAMPER_LAYER, CacheTamper, LyingEngine, Tamper, two_prefills_and_a_step

from tsqp.errors import IntegrityError
from tsqp.tee.compose import tee_model
from tsqp.tee.remote import InProcess

DTYPES = ["float32", "bfloat16", "float16"]
PLANS = [Tamper(op, part, kind) for op, part in OPS for kind in KINDS] + [
    CacheTamper(kind, past) for kind in ("k", "v") for past in (False, True)
]
SEED = 20240601


@pytest.fixture(scope="module")
def model(checkpoints) -> Path:
    return checkpoints("lying-gqa-bias", seed=5, num_key_value_heads=2, attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def engines(model) -> dict[str, LyingEngine]:
    return {dtype: LyingEngine(model, dtype) for dtype in DTYPES}


def run(model: Path, engine: LyingEngine, verify: bool, checked: str = "at-step-end") -> list[torch.Tensor]:
    """Two prefills of the same length in two sessions (so embedding and lm_head have a reply to replay),
    then one decode step (so there is a past position in the cache). checked: at-step-end (steps this short
    are checked at their end, step_checks.py), call-by-call, or overlapped (call by call, each result while
    the server computes the next call: checks.Overlapped)."""
    engine.sessions.clear()
    engine.previous.clear()
    engine.tampered = 0
    tee = tee_model(model, InProcess(engine), verify=verify, pipeline="on" if checked == "overlapped" else "off")
    if verify:
        tee.ops.checker.generator.manual_seed(SEED)
        tee.ops.checker.defer_rows = tee.ops.checker.defer_rows if checked == "at-step-end" else 0
    tee.attach()
    return two_prefills_and_a_step(tee)


def expected_message(plan) -> str:
    if isinstance(plan, CacheTamper):
        op = "scores" if plan.kind == "k" else "attn_out"
    else:
        op = {"qkv": f"qkv \\({plan.part}\\)", "gate_up": f"gate_up \\({plan.part}\\)"}.get(plan.op, plan.op)
    layer = "" if isinstance(plan, Tamper) and plan.op in ("embedding", "lm_head") else f" of layer {TAMPER_LAYER}"
    return f"integrity check failed: the server's {op}{layer} result is wrong"


@pytest.fixture(scope="module")
def honest(model, engines) -> dict[str, list[torch.Tensor]]:
    outputs = {}
    for dtype, engine in engines.items():
        engine.plan = None
        outputs[dtype] = run(model, engine, verify=True)
    return outputs


@pytest.mark.parametrize("checked", ["at-step-end", "call-by-call", "overlapped"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("plan", PLANS, ids=str)
def test_tampering_is_caught(model, engines, honest, dtype, plan, checked):
    engine = engines[dtype]
    engine.plan = plan
    try:
        with pytest.raises(IntegrityError, match=expected_message(plan)):
            run(model, engine, verify=True, checked=checked)
        assert engine.tampered >= 1
        unverified = run(model, engine, verify=False)  # the same lie, unchecked: it goes through
        assert engine.tampered >= 1
    finally:
        engine.plan = None
    changed = [not torch.allclose(out, ref, atol=1e-3) for out, ref in zip(unverified, honest[dtype], strict=True)]
    assert any(changed), f"{plan} left every output as the honest server's: the case tests nothing"


def test_a_failed_check_stops_every_later_call(model, engines):
    engine = engines["float32"]
    engine.plan = Tamper("down", None, "flip")
    tee = tee_model(model, InProcess(engine))
    tee.attach()
    tee.ops.open_session(8)
    with pytest.raises(IntegrityError, match="down of layer 1"):
        tee.forward(PROMPTS[0])
    engine.plan = None  # honest from now on: the TEE must not give it another try
    with pytest.raises(IntegrityError, match="an earlier integrity check failed"):
        tee.forward(PROMPTS[0])
    tee.ops.close_session()  # control calls still go through


LYING_SERVER = """
import sys
sys.path.insert(0, {tests!r})
from lying_server import LyingEngine, Tamper
from tsqp.server.loop import Server
engine = LyingEngine({model!r}, "float32", Tamper("attn_out", None, "scale"))
print("ready", flush=True)
Server(engine, {endpoint!r}).serve_forever()
"""


def test_cli_stops_with_one_line_against_a_lying_server(model, tmp_path):
    endpoint = f"ipc://{tmp_path}/lying.sock"
    script = LYING_SERVER.format(tests=str(Path(__file__).parent), model=str(model), endpoint=endpoint)
    server = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: (tmp_path / "lying.sock").exists() or server.poll() is not None, 60)
        assert server.poll() is None, server.stderr.read()
        lied = run_tsqp(
            *("logits", "--model", model, "--connect", endpoint, "--token-ids", "1,2,3,4"),
            *("--attention", "server", "--out", tmp_path / "lied.npy"),  # the lie is about attn_out
        )
        assert_one_line_error(lied, "integrity check failed", "attn_out of layer 1")
        assert not (tmp_path / "lied.npy").exists()
        unchecked = run_tsqp(
            "logits",
            "--model",
            model,
            "--connect",
            endpoint,
            "--token-ids",
            "1,2,3,4",
            "--out",
            tmp_path / "unchecked.npy",
            "--no-verify",
            "--attention",
            "server",
        )
        assert unchecked.returncode == 0, unchecked.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)
