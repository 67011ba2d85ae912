"""Sliding-window layers in plain mode: the server scores and reads only the keys inside the window the
TEE asks for (the scores and attn_out args' `window`), so a decode step's attention traffic stops growing
past the window; a server given no window scores every earlier key, as before; a malformed window is
refused; and a server that lies about a windowed layer is caught.
"""

from __future__ import annotations

import pytest
import torch
from conftest import reference_logits
from lying_server import TAMPER_LAYER, CacheTamper, LyingEngine, Tamper
from support import GEMMA3_ROPES

from tsqp.errors import IntegrityError, ProtocolError
from tsqp.server.engine import Engine
from tsqp.tee.compose import tee_model
from tsqp.tee.remote import InProcess
from tsqp.wire.protocol import Message

WINDOW = 4
PROMPT = torch.tensor([3, 17, 42, 7, 99, 150, 11])  # past the window
DECODE = [77, 5, 23, 61, 88]  # decode steps at positions 7..11


@pytest.fixture(scope="module")
def model(checkpoints):
    """Gemma 3: layer 0 global, layer 1 (lying_server.TAMPER_LAYER) in a window of 4 keys."""
    return checkpoints(
        "window-gemma3",
        seed=41,
        family="gemma3",
        num_key_value_heads=1,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=WINDOW,
        layer_types=["full_attention", "sliding_attention"],
        rope_parameters=GEMMA3_ROPES,
    )


class Recording(Engine):
    """An honest engine that notes the size of each scores reply and attn_out input, per layer."""

    def __init__(self, model_dir):
        super().__init__(str(model_dir))
        self.sizes: list[tuple[str, int, int, int]] = []  # (method, layer, pos, elements)

    def handle(self, peer, request, *rest, **options):
        reply_args, results = super().handle(peer, request, *rest, **options)
        method, args = request.header["method"], request.args
        if method in ("scores", "attn_out"):
            packed = results[0] if method == "scores" else request.tensors[0]
            self.sizes.append((method, args["layer"], args["pos"], packed.numel()))
        return reply_args, results


def test_decode_traffic_stops_growing_past_the_window(model, checkpoints):
    engine = Recording(model)
    tee = tee_model(model, InProcess(engine))
    tee.attach()
    windows, heads = tee.config.family.windows, tee.config.num_heads
    assert windows == (None, WINDOW)
    ids = torch.cat([PROMPT, torch.tensor(DECODE)])
    tee.ops.open_session(len(ids))
    logits = [tee.forward(PROMPT)]
    for i, token in enumerate(DECODE):
        logits.append(tee.forward(torch.tensor([token]), pos=len(PROMPT) + i))
    tee.ops.close_session()
    reference = reference_logits(checkpoints.reference("window-gemma3"), ids)
    torch.testing.assert_close(torch.cat(logits), reference, atol=1e-4, rtol=0)
    assert set(tee.ops.checker.checks) >= {"scores", "attn_out"}

    decode = [(method, layer, pos, n) for method, layer, pos, n in engine.sizes if pos >= len(PROMPT)]
    assert len(decode) == 2 * len(windows) * len(DECODE)
    for method, layer, pos, n in decode:
        seen = pos + 1 if windows[layer] is None else WINDOW  # keys a decode query sees
        assert n == heads * seen, (method, layer, pos)
    windowed = {n for _, layer, _, n in decode if windows[layer]}
    assert len(windowed) == 1  # the same size at every position past the window


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("tile", [1, 3])
def test_tiles_past_the_window_in_chunks_equal_transformers(model, checkpoints, tile, pipelined):
    """A prefill of many small query tiles (each later one starting at its window), in pipelined chunks
    or at once, then an append that straddles the window: transformers' logits, every tile verified."""
    tee = tee_model(model, InProcess(Engine(str(model))))
    tee.attach()
    attention = tee.ops.attention
    attention.tile, attention.pipeline, attention.pipelined, attention.min_chunk_scores = tile, "on", pipelined, 0
    ids = torch.cat([PROMPT, torch.tensor(DECODE)])
    tee.ops.open_session(len(ids))
    logits = torch.cat([tee.forward(ids[:9]), tee.forward(ids[9:], pos=9)])
    tee.ops.close_session()
    torch.testing.assert_close(logits, reference_logits(checkpoints.reference("window-gemma3"), ids), atol=1e-4, rtol=0)
    calls = [(9, 0), (len(ids) - 9, 9)]  # (T, pos) of each forward
    chunks = [len(attention.chunks(T, pos, w)) for T, pos in calls for w in tee.config.family.windows]
    assert tee.ops.checker.checks["scores"] == sum(chunks)  # one check per chunk, each over all its tiles
    assert (max(chunks) > 1) == pipelined


def session_with_keys(engine: Engine, T: int) -> tuple[InProcess, bytes]:
    call, c = InProcess(engine), engine.config
    session = call("open_session", {"capacity": 32}).args["session"]
    call("qkv", {"layer": 1, "pos": 0}, [torch.randn(T, c.hidden_size)], session=session)
    return call, session


def test_a_server_given_no_window_scores_every_earlier_key(model):
    engine, T = Engine(str(model)), 10
    c = engine.config
    q, k = torch.randn(T, c.num_heads, c.head_dim), torch.randn(T, c.num_kv_heads, c.head_dim)
    sizes = {}
    for window in (None, WINDOW):
        call, session = session_with_keys(engine, T)
        args = {"layer": 1, "pos": 0, "tile": 1} | ({} if window is None else {"window": window})
        scores = call("scores", args, [q, k], session=session).tensors[0]
        sizes[window] = scores.numel()
        out = call("attn_out", args, [torch.rand_like(scores)], session=session).tensors[0]
        assert out.shape == (T, c.hidden_size)
    assert sizes[None] == c.num_heads * sum(range(1, T + 1))  # row i: keys 0..i
    assert sizes[WINDOW] == c.num_heads * sum(min(i, WINDOW) for i in range(1, T + 1))  # row i: its window


@pytest.mark.parametrize("method", ["scores", "attn_out"])
@pytest.mark.parametrize("window", [0, -3, 1.5, "4", True, [4], 1 << 40])
def test_a_malformed_window_is_refused(model, method, window):
    engine, T = Engine(str(model)), 4
    c = engine.config
    call, session = session_with_keys(engine, T)
    q, k = torch.randn(T, c.num_heads, c.head_dim), torch.randn(T, c.num_kv_heads, c.head_dim)
    scores = call("scores", {"layer": 1, "pos": 0, "tile": T}, [q, k], session=session).tensors[0]
    tensors = [q, k] if method == "scores" else [scores]
    args = {"layer": 1, "pos": 0, "tile": T, "window": window}
    request = Message({"id": 1, "method": method, "session": session, "args": args}, tensors)
    with pytest.raises(ProtocolError, match="window"):
        engine.handle(call.peer, request)


PLANS = [Tamper("scores", None, kind) for kind in ("flip", "delta", "scale", "zeros")] + [
    Tamper("attn_out", None, kind)
    for kind in ("flip", "delta", "zeros")  # Gemma's post-attention norm undoes a scale
]
PLANS += [CacheTamper("k", False), CacheTamper("v", False)]


def run(model, engine: LyingEngine, verify: bool, deferred: bool = True) -> list[torch.Tensor]:
    """A prefill past the window, then decode steps (checked at their end, or call by call)."""
    engine.sessions.clear()
    engine.previous.clear()
    tee = tee_model(model, InProcess(engine), verify=verify)
    if verify and not deferred:
        tee.ops.checker.defer_rows = 0
    tee.attach()
    tee.ops.open_session(len(PROMPT) + len(DECODE))
    outputs = [tee.forward(PROMPT)]
    for i, token in enumerate(DECODE):
        outputs.append(tee.forward(torch.tensor([token]), pos=len(PROMPT) + i))
    tee.ops.close_session()
    return outputs


@pytest.mark.parametrize("checked", ["at-step-end", "call-by-call"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("plan", PLANS, ids=str)
def test_a_lie_about_a_windowed_layer_is_caught(model, dtype, plan, checked):
    engine = LyingEngine(model, dtype)
    assert engine.config.family.windows[TAMPER_LAYER] == WINDOW
    honest = run(model, engine, verify=True)
    engine.plan = plan
    op = plan.op if isinstance(plan, Tamper) else {"k": "scores", "v": "attn_out"}[plan.kind]
    with pytest.raises(IntegrityError, match=f"server's {op} of layer {TAMPER_LAYER} result is wrong"):
        run(model, engine, verify=True, deferred=checked == "at-step-end")
    assert engine.tampered >= 1
    unverified = run(model, engine, verify=False)  # the same lie unchecked changes what the TEE computes
    changed = [not torch.allclose(out, ref, atol=1e-3) for out, ref in zip(unverified, honest, strict=True)]
    assert any(changed), f"{plan} left every output as the honest server's: the case tests nothing"
