"""The plain split with attention in the TEE (`--attention tee`): four calls a layer, every result checked.

qkv returns v too (args values), the TEE attends over its own KV cache (attention.TeeAttention) and o_proj
is a call of its own. The logits equal the server-side attention's and transformers' (the families'
tests run the mode on every family: test_families.py); here: a lying server caught on every part the mode
receives (q, k, v, o_proj), in float32 and bfloat16, call by call and at a decode step's end; the
protocol's validation of the new argument and call; the CLI flag end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reference_logits, run_tsqp, token_ids
from lying_server import KINDS, TAMPER_LAYER, LyingEngine, Tamper, two_prefills_and_a_step

from tsqp.errors import IntegrityError, ProtocolError, ServerError
from tsqp.options import RunOptions
from tsqp.server.engine import Engine
from tsqp.tee.compose import run_attention, tee_model
from tsqp.tee.decode_attention import DecodeAttention
from tsqp.tee.generate import generate
from tsqp.tee.remote import InProcess
from tsqp.tee.runner import open_model
from tsqp.tee.server_attention import ServerAttention
from tsqp.wire.protocol import Message

PARTS = [("qkv", "q"), ("qkv", "k"), ("qkv", "v"), ("o_proj", None)]
PLANS = [Tamper(op, part, kind) for op, part in PARTS for kind in KINDS]


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("lying-gqa-bias", seed=5, num_key_value_heads=2, attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def engines(model) -> dict[str, LyingEngine]:
    return {dtype: LyingEngine(model, dtype) for dtype in ("float32", "bfloat16")}


def run(model, engine: LyingEngine, verify: bool, deferred: bool = True, attention: str = "tee") -> list:
    """Two prefills in two sessions, then a decode step (a deferred check, unless deferred is False); with
    attention "decode", the prefills attend on the server."""
    engine.sessions.clear()
    engine.previous.clear()
    engine.tampered = 0
    tee = tee_model(model, InProcess(engine), verify=verify, attention=attention)
    if attention == "decode":
        tee.ops.attention.rows = 2  # these 6-token prompts are prefills on the server
    if verify and not deferred:
        tee.ops.checker.defer_rows = 0
    tee.attach()
    return two_prefills_and_a_step(tee)


@pytest.fixture(scope="module")
def honest(model, engines) -> dict[str, list[torch.Tensor]]:
    outputs = {}
    for dtype, engine in engines.items():
        engine.plan = None
        outputs[dtype] = run(model, engine, verify=True)
        server_side = run(model, engine, verify=True, attention="server")
        for here, there in zip(outputs[dtype], server_side, strict=True):
            torch.testing.assert_close(here, there, atol=1e-4 if dtype == "float32" else 0.1, rtol=0)
    return outputs


def assert_caught(model, engine: LyingEngine, honest: list[torch.Tensor], plan: Tamper, **modes) -> None:
    """The lie fails verification naming its op and layer, and changes the outputs when unchecked."""
    engine.plan = plan
    op = {"q": "qkv \\(q\\)", "k": "qkv \\(k\\)", "v": "qkv \\(v\\)"}.get(plan.part, plan.op)
    try:
        with pytest.raises(IntegrityError, match=f"the server's {op} of layer {TAMPER_LAYER} result is wrong"):
            run(model, engine, verify=True, **modes)
        assert engine.tampered >= 1
        modes.pop("deferred", None)
        unverified = run(model, engine, verify=False, **modes)  # the same lie, unchecked: it goes through
    finally:
        engine.plan = None
    changed = [not torch.allclose(out, ref, atol=1e-3) for out, ref in zip(unverified, honest, strict=True)]
    assert any(changed), f"{plan} left every output as the honest server's: the case tests nothing"


@pytest.mark.parametrize("checked", ["at-step-end", "call-by-call"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("plan", PLANS, ids=str)
def test_tampering_is_caught(model, engines, honest, dtype, plan, checked):
    assert_caught(model, engines[dtype], honest[dtype], plan, deferred=checked == "at-step-end")


# Left out: o_proj swap (o_proj runs in the decode step alone: one row, nothing to swap) and scores scale, swap
# and delta (in a prefill they change query position 0, which sees one key: its probability is 1 whatever
# the score, so the lie changes nothing; the server-side tests cover them at a decode step).
IDLE = {("o_proj", "swap"), ("scores", "scale"), ("scores", "swap"), ("scores", "delta")}
DECODE_PLANS = [
    Tamper(op, part, kind)
    for op, part in [*PARTS, ("scores", None), ("attn_out", None)]
    for kind in KINDS
    if (op, kind) not in IDLE
]


@pytest.mark.parametrize("plan", DECODE_PLANS, ids=str)
def test_tampering_is_caught_with_the_prefill_on_the_server(model, engines, honest, plan):
    """--attention decode: the prefill's scores and attn_out on the server, the decode step's o_proj, and the
    v the TEE keeps from both, each checked."""
    assert_caught(model, engines["float32"], honest["float32"], plan, attention="decode")


@pytest.mark.parametrize("name", ["mistral-window-gqa", "gemma3-gqa", "qwen2-window"])
def test_decode_mode_prefill_then_pieces_equal_transformers(checkpoints, name):
    """--attention decode on windowed families: a 20-token prefill on the server, then single tokens and a
    chunk past the window in the TEE (its cache holds the prefill's keys and values)."""
    from support import FAMILY_MODELS

    from tsqp.tee.decode_attention import DecodeAttention

    path = checkpoints("family-" + name, seed=700 + list(FAMILY_MODELS).index(name), **FAMILY_MODELS[name])
    reference = checkpoints.reference("family-" + name)
    ids = token_ids(40, seed=9)
    tee = tee_model(path, InProcess(Engine(str(path))), attention="decode")
    tee.attach()
    assert isinstance(tee.ops.attention, DecodeAttention)
    tee.ops.attention.rows = 8  # a 20-token prompt is a prefill on the server (by default it attends here)
    tee.ops.open_session(ids.shape[0])
    pieces, pos = [], 0
    for size in (20, 1, 1, 12, 1, 5):
        pieces.append(tee.forward(ids[pos : pos + size], pos=pos))
        pos += size
    torch.testing.assert_close(torch.cat(pieces), reference_logits(reference, ids), atol=1e-4, rtol=0)
    checks = tee.ops.checker.checks
    layers = tee.config.num_layers
    assert checks["scores"] == checks["attn_out"] == layers and checks["o_proj"] == 5 * layers


def test_decode_steps_and_pieces_equal_one_prefill(model, engines):
    """A prompt fed in pieces (a prefill, single tokens, a block) equals its prefill, checked at step ends."""
    ids = token_ids(20, seed=4)
    tee = tee_model(model, InProcess(engines["float32"]), attention="tee")
    tee.attach()
    tee.ops.open_session(ids.shape[0])
    pieces, pos = [], 0
    for size in (6, 1, 1, 9, 1, 2):
        pieces.append(tee.forward(ids[pos : pos + size], pos=pos))
        pos += size
    tee.ops.close_session()
    tee.ops.open_session(ids.shape[0])
    whole = tee.forward(ids)
    torch.testing.assert_close(torch.cat(pieces), whole, atol=1e-4, rtol=0)
    assert tee.ops.checker.checks["o_proj"] == tee.config.num_layers * 7  # each layer of 7 forwards: no scores
    assert "scores" not in tee.ops.checker.checks


def qkv_request(session: bytes, args: dict, x: torch.Tensor) -> Message:
    return Message({"id": 1, "method": "qkv", "session": session, "args": args}, [x])


def test_qkv_returns_the_values_it_caches_when_asked(tiny_model):
    engine = Engine(str(tiny_model))
    call = InProcess(engine)
    session = call("open_session", {"capacity": 8}).args["session"]
    c, x = engine.config, torch.randn(3, engine.config.hidden_size)
    plain = call("qkv", {"layer": 0, "pos": 0}, [x], session=session).tensors
    asked = call("qkv", {"layer": 0, "pos": 0, "values": True}, [x], session=session).tensors
    assert [tuple(t.shape) for t in plain] == [(3, c.q_dim + c.kv_dim)]
    assert [tuple(t.shape) for t in asked] == [(3, c.q_dim + c.kv_dim), (3, c.kv_dim)]
    torch.testing.assert_close(asked[0], plain[0])
    cached = engine.sessions[session].values[0, :, :3].transpose(0, 1).reshape(3, c.kv_dim)
    torch.testing.assert_close(asked[1], cached)
    # the values' positions count as cached: the next qkv may append after them
    call("qkv", {"layer": 0, "pos": 3, "values": True}, [x[:1]], session=session)


@pytest.mark.parametrize("values", ["yes", 1, None, [True]])
def test_a_malformed_values_argument_is_refused(tiny_model, values):
    engine = Engine(str(tiny_model))
    session = InProcess(engine)("open_session", {"capacity": 8}).args["session"]
    x = torch.randn(2, engine.config.hidden_size)
    with pytest.raises(ProtocolError, match="'values' must be true or false"):
        engine.handle(b"in-process", qkv_request(session, {"layer": 0, "pos": 0, "values": values}, x))


def test_o_proj_is_validated_and_needs_a_session(tiny_model):
    engine = Engine(str(tiny_model))
    call = InProcess(engine)
    c = engine.config
    with pytest.raises(ServerError, match="session"):
        call("o_proj", {"layer": 0}, [torch.randn(2, c.q_dim)])
    session = call("open_session", {"capacity": 8}).args["session"]
    with pytest.raises(ServerError, match=f"expected a \\(T, {c.q_dim}\\) activation"):
        call("o_proj", {"layer": 0}, [torch.randn(2, c.hidden_size + 1)], session=session)
    with pytest.raises(ServerError, match="'layer' must be an integer"):
        call("o_proj", {"layer": c.num_layers}, [torch.randn(2, c.q_dim)], session=session)
    (y,) = call("o_proj", {"layer": 0}, [torch.randn(2, c.q_dim)], session=session).tensors
    assert tuple(y.shape) == (2, c.hidden_size)


def test_cli_attention_tee_matches_transformers(tiny_model, tiny_reference, tmp_path):
    ids = token_ids(9, seed=3)
    args = ["--model", tiny_model, "--token-ids", ",".join(map(str, ids.tolist()))]
    result = run_tsqp("logits", *args, "--attention", "tee", "--out", tmp_path / "tee.npy")
    assert result.returncode == 0, result.stderr
    logits = torch.from_numpy(np.load(tmp_path / "tee.npy"))
    assert float((logits - reference_logits(tiny_reference, ids)).abs().max()) < 1e-4
    generate = ["generate", *args, "--max-new-tokens", "6", "--json"]
    here, there = run_tsqp(*generate, "--attention", "tee"), run_tsqp(*generate, "--attention", "server")
    assert here.returncode == 0 and there.returncode == 0, here.stderr
    assert json.loads(here.stdout)["generated_ids"] == json.loads(there.stdout)["generated_ids"]
    refused = run_tsqp("logits", *args, "--attention", "elsewhere")
    assert refused.returncode != 0 and "--attention" in refused.stderr


def test_auto_attends_decode_steps_in_the_tee(tiny_model, tiny_reference):
    """`--attention auto`, the command line's default: the plain split's decode steps attend in the TEE (one
    fused call a layer, no scores round trip), a long prompt on the server; private mode always in the TEE; the
    library's own default (None) stays the server path."""
    assert run_attention("auto", private=False) == "decode"
    assert run_attention("auto", private=True) == "tee"
    assert [run_attention(a, private=False) for a in ("server", "tee", "decode")] == ["server", "tee", "decode"]
    assert isinstance(tee_model(tiny_model, InProcess(Engine(tiny_model))).ops.attention, ServerAttention)
    with open_model(RunOptions(model_dir=Path(tiny_model), start_timeout_s=60)) as tee:
        assert isinstance(tee.ops.attention, DecodeAttention)
        layers, ids = tee.config.num_layers, token_ids(9, seed=4)
        generation = generate(tee, ids.tolist(), 4)
        # embedding, qkv of layer 0, one o_proj_gate_up a layer (through the next qkv), lm_head; a step each
        assert generation.decode_rpc_calls == 3 * (layers + 3)
        tee.ops.open_session(ids.shape[0])
        logits = tee.forward(ids)
        tee.ops.close_session()
    assert float((logits - reference_logits(tiny_reference, ids)).abs().max()) < 1e-4
