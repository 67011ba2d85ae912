"""The batching hold (tsqp/server/rendezvous.py): a request waits for a companion only when another
active client is on its way to the same op; a lone client never waits; a hold ends by hold_s; and
clients on a server with a long hold still get their solo tokens."""

from __future__ import annotations

import time

import pytest
from conftest import token_ids
from support import FEATURES, decode_at_once

from tsqp.server.engine import Engine
from tsqp.server.loop import Server
from tsqp.server.rendezvous import Rendezvous
from tsqp.server.scheduler import Pending
from tsqp.wire.protocol import Message, unpack

LAYER = [("qkv", 0, None), ("attn_out", 0, None), ("gate_up", 0, None), ("down", 0, None)]
NEXT = [("qkv", 1, None), ("attn_out", 1, None)]
STEP = LAYER + NEXT


def learned(rendezvous: Rendezvous, peer: bytes, keys: list[tuple], now: float) -> None:
    for key in keys:
        rendezvous.answered(peer, key, now)


def test_a_lone_client_is_never_held():
    rendezvous = Rendezvous(hold_s=10.0)
    now = time.perf_counter()
    learned(rendezvous, b"a", STEP * 3, now)  # its order is known, but nobody else is about
    assert not any(rendezvous.coming(key, b"a", {b"a": key}, now) for key in STEP)


def test_a_request_waits_for_a_recent_client_whose_next_ops_lead_to_it():
    rendezvous = Rendezvous(hold_s=10.0, depth=4, recent_s=0.05)
    now = time.perf_counter()
    learned(rendezvous, b"a", STEP * 2, now)
    learned(rendezvous, b"b", LAYER[:1], now)  # b was last answered qkv 0 and has nothing queued
    assert rendezvous.coming(LAYER[1], b"a", {}, now)  # its next op
    assert rendezvous.coming(NEXT[0], b"a", {}, now)  # four ops ahead: within depth
    assert not rendezvous.coming(NEXT[1], b"a", {}, now)  # five ahead: not counted on
    assert not rendezvous.coming(LAYER[0], b"a", {}, now)  # behind it
    assert not rendezvous.coming(LAYER[1], b"a", {}, now + 0.06)  # b has gone quiet
    assert not Rendezvous(hold_s=0.0).coming(LAYER[1], b"a", {}, now)  # holding off


def test_a_queued_client_counts_from_its_queued_request():
    rendezvous = Rendezvous(hold_s=10.0, depth=4, recent_s=0.05)
    now = time.perf_counter()
    learned(rendezvous, b"a", STEP * 2, now)
    learned(rendezvous, b"b", STEP[:1], now - 1.0)  # answered long ago, but queued now: it is here
    assert rendezvous.coming(NEXT[0], b"a", {b"b": LAYER[1]}, now)  # three ops behind a's request
    assert not rendezvous.coming(LAYER[1], b"a", {b"b": LAYER[1]}, now)  # the same op: in a's product
    assert not rendezvous.coming(NEXT[0], b"a", {b"b": None}, now)  # b is held itself
    assert not rendezvous.coming(LAYER[2], b"a", {b"b": LAYER[3]}, now)  # b is ahead of a


def test_stale_clients_are_forgotten():
    rendezvous = Rendezvous(hold_s=0.01, recent_s=0.01)
    now = time.perf_counter()
    learned(rendezvous, b"a", STEP, now)
    learned(rendezvous, b"b", STEP, now + 5)
    rendezvous.forget(now + 5)
    assert set(rendezvous.last) == {b"b"}


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("rendezvous-gqa", seed=510, **FEATURES["gqa"])


def test_a_held_request_runs_by_hold_s(model, tmp_path):
    server = Server(Engine(str(model)), f"ipc://{tmp_path}/hold.sock", hold_s=0.05)
    try:
        now = time.perf_counter()
        learned(server.scheduler.rendezvous, b"a", STEP, now)
        learned(server.scheduler.rendezvous, b"b", LAYER[:1], now)
        item = Pending(b"a", b"", [])
        assert server.scheduler.hold(item, LAYER[1], {b"a": LAYER[1]})  # b is on its way
        first = item.held_until
        assert first > now
        server.scheduler.rendezvous.answered(b"b", LAYER[0], time.perf_counter())  # b still about: the hold goes on...
        assert server.scheduler.hold(item, LAYER[1], {}) and item.held_until == first  # ...from its first hold
        time.sleep(max(0.0, first - time.perf_counter()) + 0.001)
        server.scheduler.rendezvous.answered(b"b", LAYER[0], time.perf_counter())
        assert not server.scheduler.hold(item, LAYER[1], {}), "held past hold_s"
        server.scheduler.add(Pending(b"c", b"", []))  # c's request behind a held one of its own: no hold of its own
        server.scheduler.add(item)
        assert server.scheduler.hold_deadline() == first  # the loop polls until the hold ends, not sleeps
    finally:
        server.close()


def test_a_request_whose_arena_was_replaced_meanwhile_is_refused_not_read(model, tmp_path):
    """A held request's tensors view its client's arena: one unmapped since (the client reconnected with
    the same arena file) must not be read."""
    server = Server(Engine(str(model)), f"ipc://{tmp_path}/arena.sock")
    try:
        item = Pending(b"a", b"", [])
        item.arena = object()  # the arena it was parsed in; the peer has none now
        request = Message({"id": 7, "method": "ping", "session": None, "args": {}}, [])
        item.request = request
        (reply,) = server.run([item])
        answer = unpack(reply)
        assert answer.header["id"] == 7 and not answer.header["ok"] and "replaced" in answer.header["error"]
        item.arena = None  # the same as now: served
        (reply,) = server.run([item])
        assert unpack(reply).header["ok"]
    finally:
        server.close()


def test_clients_on_a_server_with_a_long_hold_get_their_solo_tokens(model):
    """A 5 s hold: a wrong guess would show as a stall (the client's 60 s timeout) or as other tokens."""
    prompts = [token_ids(3 + 2 * i, seed=60 + i).tolist() for i in range(3)]
    lengths = [12, 6, 9]  # they stop at different steps: the others' companions go away
    alone, together, stats = decode_at_once(model, prompts, lengths, ["--batch-hold-ms", "5000"])
    assert together == alone
    assert stats["batched"] > 0, "no request shared a product"
