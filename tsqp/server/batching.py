"""Continuous batching at the op level: requests of one op and layer from different clients, one product.

Decode is memory-bound: a step reads every weight once for one row per client. When several clients'
requests for the same linear (qkv, the o_proj of attn_out, gate_up, down, lm_head, a private mode's
masked_linear) are waiting together, their rows are concatenated and multiplied by the weight once,
and each client's rows are copied back into its own reply (its arena slot). The loop (loop.py) batches
what is queued when it looks, and what arrives while a product runs joins the next one, as vLLM's
scheduler does for whole models. There is no fixed batching window: a lone client never waits, and a
request waits (at most `tsqp serve --batch-hold-ms`, 10 ms) only when another client is known to be a
few ops behind it on the same path (rendezvous.py). Per-session state (KV caches, P V) stays per session.

Each request is checked exactly as when it runs alone (the engine's `op_` method, with the step it
would run recorded instead of run); a refused request gets its own error and leaves the others be.
Row-batched products are the same sums as solo ones, but the GEMM kernel may block a many-row product
differently from a one-row one, so a result can differ from its solo value in the last bits (measured
in tests/test_batching.py; the Freivalds tolerance is orders of magnitude wider).

Only a single-rank server batches; a tensor-parallel one runs requests one at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from tsqp.server.kernels import linear, linear_into
from tsqp.server.weights import VALUE_DTYPE
from tsqp.wire.protocol import CONTROL_METHODS, MASKED_DTYPE, SESSION_METHODS, Message

BATCHED = ("qkv", "attn_out", "gate_up", "down", "lm_head", "masked_linear")

Item = tuple[bytes, Message, Callable | None]  # (peer, request, reply slot allocator or None)


def batch_key(engine, request) -> tuple | None:
    """Requests with one key may share a product; None: this one runs alone."""
    if not isinstance(request, Message) or engine.ranks.world != 1:
        return None
    method, args = request.header.get("method"), request.args
    if method not in BATCHED or len(request.tensors) != 1:
        return None
    layer, op = args.get("layer"), args.get("op")
    if not isinstance(layer, (int, type(None))) or not isinstance(op, (str, type(None))):
        return None  # a malformed request runs alone, and is refused there
    return method, layer, op


def handle_batch(engine, items: list[Item]) -> list[tuple[dict, list[torch.Tensor]] | Exception]:
    """Every item's (reply args, result tensors) or the exception it raised, in order."""
    if len(items) == 1:
        try:
            return [engine.handle(*items[0])]
        except Exception as exc:
            return [exc]
    try:
        return _shared_product(engine, items)
    finally:
        engine.budget.release()  # what the group's requests reserved in turn (record: their op_ methods)


def _shared_product(engine, items: list[Item]) -> list[tuple[dict, list[torch.Tensor]] | Exception]:
    engine.tick()
    start = time.perf_counter()
    outcomes: list = [None] * len(items)
    calls = []  # (index, step, args, input, alloc)
    for i, (peer, request, alloc) in enumerate(items):
        try:
            step, args, tensors = record(engine, peer, request)
            calls.append((i, step, args, tensors[0], alloc))
        except Exception as exc:
            outcomes[i] = exc
    if not calls:
        return outcomes
    step = calls[0][1]
    try:
        results = STEPS[step](engine, [c[2] for c in calls], [c[3] for c in calls])
        placed = [place(engine, y, c[4]) for c, y in zip(calls, results, strict=True)]
    except Exception as exc:  # a failure of the shared product fails every request in it
        for c in calls:
            outcomes[c[0]] = exc
        return outcomes
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    engine.batched += len(calls)
    reply = {"compute_start": start, "compute_s": time.perf_counter() - start, "batch": len(calls)}
    for c, y in zip(calls, placed, strict=True):
        outcomes[c[0]] = (dict(reply), [y])
    return outcomes


def record(engine, peer: bytes, request: Message) -> tuple[str, dict, tuple]:
    """Checks the request as Engine.handle does and returns the step it would run, not running it."""
    method = engine.check_method(request)
    inputs = [t.to(engine.device) for t in request.tensors]
    recorded = []
    engine._record = recorded.append
    try:
        handler = getattr(engine, "op_" + method)
        if method in SESSION_METHODS:
            handler(engine._session(peer, request.header.get("session")), request.args, *inputs)
        elif method not in CONTROL_METHODS:
            handler(request.args, *inputs)
    finally:
        engine._record = None
    (call,) = recorded
    return call


def place(engine, y: torch.Tensor, alloc) -> torch.Tensor:
    """A request's rows of the shared result, in its own arena slot (CPU server) or a CPU tensor."""
    if alloc is not None and engine.device.type == "cpu":
        return alloc(tuple(y.shape), y.dtype).copy_(y)
    return y.to("cpu")


def _shared(
    xs: list[torch.Tensor],
    weight,
    bias,
    dtype: torch.dtype,
    out_dtype: torch.dtype | None = None,
    x: torch.Tensor | None = None,
) -> list:
    """x_i W^T + b for every i as one product over the concatenated rows (x, when the caller has them
    already); the rows split back."""
    x = torch.cat(xs) if x is None else x
    y = linear_into(torch.empty((x.shape[0], weight.shape[0]), dtype=dtype, device=x.device), x, weight, bias)
    if out_dtype is not None and out_dtype != dtype:
        y = y.to(out_dtype)
    return list(torch.split(y, [t.shape[0] for t in xs]))


def _qkv(engine, args: list[dict], xs: list[torch.Tensor]) -> list:
    c, w = engine.config, engine.layers[args[0]["layer"]]
    x = torch.cat(xs)
    v = linear(x.to(VALUE_DTYPE), w.v, w.v_bias)
    row = 0
    for a, xi in zip(args, xs, strict=True):
        session, layer, pos = engine._where(a)
        T = xi.shape[0]
        session.values[layer, :, pos : pos + T] = v[row : row + T].view(T, c.num_kv_heads, c.head_dim).transpose(0, 1)
        row += T
    return _shared(xs, w.qk, w.qk_bias, engine.dtype, x=x)  # the rows concatenated once, for v and qk


def _attn_out(engine, args: list[dict], probs: list[torch.Tensor]) -> list:
    w = engine.layers[args[0]["layer"]]
    attended = [engine.attend(a, p) for a, p in zip(args, probs, strict=True)]  # per session: P V
    return _shared(attended, w.o, w.o_bias, VALUE_DTYPE, engine.dtype)


def _layer_linear(name: str):
    def run(engine, args: list[dict], xs: list[torch.Tensor]) -> list:
        w = engine.layers[args[0]["layer"]]
        return _shared(xs, getattr(w, name), getattr(w, name + "_bias"), engine.dtype)

    return run


def _lm_head(engine, args: list[dict], xs: list[torch.Tensor]) -> list:
    return _shared(xs, engine.head, None, engine.dtype)


def _masked_linear(engine, args: list[dict], xs: list[torch.Tensor]) -> list:
    weight, bias = engine._masked_weight(args[0]["op"], args[0]["layer"])
    return _shared(xs, weight, bias, MASKED_DTYPE)


STEPS = {
    "qkv": _qkv,
    "attn_out": _attn_out,
    "gate_up": _layer_linear("gate_up"),
    "down": _layer_linear("down"),
    "lm_head": _lm_head,
    "masked_linear": _masked_linear,
}
