"""Pipelined attention: the TEE's softmax of one query chunk overlaps the server's scores of the next.

Same logits as one chunk and as transformers, in process and through a real server (arena and zmq),
verified and not; the schedule really overlaps; several requests in flight share the arena without
overlapping; a lie in a later chunk is caught; the statistics count the overlap.
"""

from __future__ import annotations

import pytest
import torch
from conftest import reference_logits, split_logits, token_ids

from tsqp.errors import ConnectionLost, IntegrityError, TsqpError
from tsqp.model.checkpoint import Checkpoint
from tsqp.server.engine import Engine
from tsqp.stats import Stats
from tsqp.tee.compose import build_ops, tee_model
from tsqp.tee.forward import TeeModel
from tsqp.tee.launcher import ServerProcess
from tsqp.tee.remote import InProcess
from tsqp.wire.arena import ALIGN, Regions
from tsqp.wire.client import Client
from tsqp.wire.protocol import Message

ATOL = 1e-4


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("pipeline-gqa", seed=9, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def reference(checkpoints, model):
    return checkpoints.reference("pipeline-gqa")


def pipelined(tee: TeeModel, on: bool, tile: int = 8) -> TeeModel:
    """Small tiles and no minimum chunk size, so a short prompt splits into several chunks."""
    tee.ops.attention.pipeline, tee.ops.attention.pipelined = ("on" if on else "off"), on
    tee.ops.attention.tile, tee.ops.attention.min_chunk_scores = tile, 0
    return tee


def prefill(tee: TeeModel, ids: torch.Tensor, steps: list[int]) -> torch.Tensor:
    tee.ops.open_session(ids.shape[0])
    logits, pos = [], 0
    for length in steps:
        logits.append(tee.forward(ids[pos : pos + length], pos=pos))
        pos += length
    tee.ops.close_session()
    return torch.cat(logits)


def test_chunks_are_whole_tiles_covering_every_row(model):
    tee = pipelined(tee_model(model, InProcess(Engine(str(model))), verify=False), True, tile=8)
    tee.attach()
    tee.ops.attention.pipelined = True
    for T, pos in ((100, 0), (37, 5), (8, 0), (1, 40)):
        chunks = tee.ops.attention.chunks(T, pos)
        assert chunks[0][0] == 0 and chunks[-1][1] == T
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
        assert all(start % 8 == 0 for start, _ in chunks)
        assert len(chunks) <= 8 + 1
    assert len(tee.ops.attention.chunks(100, 0)) > 4
    tee.ops.attention.pipelined = False
    assert tee.ops.attention.chunks(100, 0) == [(0, 100)]


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("tile, steps", [(8, [60]), (5, [23, 1, 30]), (16, [40, 20])])
def test_pipelined_logits_equal_one_chunk_and_transformers(model, reference, verify, tile, steps):
    ids = token_ids(sum(steps), seed=tile)
    engine = Engine(str(model))
    results = {}
    for on in (False, True):
        tee = pipelined(tee_model(model, InProcess(engine), verify=verify), on, tile)
        tee.attach()
        results[on] = prefill(tee, ids, steps)
    torch.testing.assert_close(results[True], reference_logits(reference, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(results[True], results[False], atol=1e-5, rtol=0)


class Recorder:
    """A call function that records the order of requests; the model's softmax is recorded too."""

    def __init__(self, engine: Engine):
        self.inner = InProcess(engine)
        self.events: list[tuple[str, int]] = []

    def __call__(self, method, args=None, tensors=(), session=None, reply_bytes=0) -> Message:
        self.events.append((method, (args or {}).get("pos", -1)))
        return self.inner(method, args, tensors, session=session, reply_bytes=reply_bytes)


def test_server_scores_the_next_chunk_before_the_tee_softmaxes_this_one(model):
    recorder = Recorder(Engine(str(model)))
    tee = pipelined(tee_model(model, recorder, verify=True), True, tile=8)
    tee.attach()
    softmax = tee.softmax_

    def recorded_softmax(block):
        recorder.events.append(("softmax", -1))
        return softmax(block)

    tee.softmax_ = recorded_softmax
    tee.ops.open_session(64)
    tee.forward(token_ids(64, seed=2))
    layer0 = recorder.events[recorder.events.index(("qkv", 0)) + 1 :]
    layer0 = layer0[: layer0.index(("gate_up", -1))]
    scores = [pos for method, pos in layer0 if method == "scores"]
    outputs = [pos for method, pos in layer0 if method == "attn_out"]
    assert len(scores) > 2 and scores == outputs == sorted(scores), layer0
    # The softmaxes come in runs, one run (a softmax per query tile) per chunk.
    runs = [i for i, (method, _) in enumerate(layer0) if method == "softmax" and layer0[i - 1][0] != "softmax"]
    assert len(runs) == len(scores), layer0
    for i, at in enumerate(runs):
        # Before chunk i's first softmax, the next chunk is already being scored (two ahead at the start).
        submitted = [pos for method, pos in layer0[:at] if method == "scores"]
        assert len(submitted) >= min(i + 2, len(scores)), layer0
        # and chunk i's attn_out goes out right after its last softmax
        end = next(j for j in range(at, len(layer0)) if layer0[j][0] != "softmax")
        assert layer0[end] == ("attn_out", outputs[i]), layer0
    assert sum(method == "softmax" for method, _ in layer0) > len(runs)  # a softmax per tile, not per chunk


def test_a_lie_in_a_later_chunk_is_caught(model):
    engine = Engine(str(model))
    calls = {"scores": 0, "attn_out": 0}

    def lying(target):
        def call(method, args=None, tensors=(), session=None, reply_bytes=0):
            reply = InProcess(engine)(method, args, tensors, session=session, reply_bytes=reply_bytes)
            if method == target and args.get("layer") == 1:
                calls[method] += 1
                if calls[method] == 3:  # the third chunk of layer 1
                    result = reply.tensors[0].clone()
                    result[-1] += 1.0
                    return Message(reply.header, [result])
            return reply

        return call

    for target in ("scores", "attn_out"):
        tee = pipelined(tee_model(model, lying(target), verify=True), True, tile=8)
        tee.attach()
        tee.ops.open_session(64)
        with pytest.raises(IntegrityError, match=f"{target} of layer 1"):
            tee.forward(token_ids(64, seed=4))


def test_a_failed_chunk_leaves_no_request_behind(model):
    """An error in the middle of the pipeline: the requests still in flight are discarded."""
    engine = Engine(str(model))
    link = InProcess(engine)

    def failing(method, args=None, tensors=(), session=None, reply_bytes=0):
        if method == "scores" and args["pos"] > 0:
            raise TsqpError("no more scores")
        return link(method, args, tensors, session=session, reply_bytes=reply_bytes)

    tee = pipelined(tee_model(model, failing, verify=False), True, tile=8)
    tee.attach()
    tee.ops.open_session(64)
    with pytest.raises(TsqpError, match="no more scores"):
        tee.forward(token_ids(64, seed=5))
    assert tee.ops.link.replies == {}


def test_auto_pipelines_only_a_gpu_server(model):
    engine = Engine(str(model))
    for device, expected in (("cpu", False), ("cuda:0", True)):

        def init(method, args=None, tensors=(), session=None, reply_bytes=0, device=device):
            reply = InProcess(engine)(method, args, tensors, session=session, reply_bytes=reply_bytes)
            return Message(reply.header | {"args": reply.args | {"device": device}}, reply.tensors)

        ops = build_ops(Checkpoint(model), init, Stats(), verify=False)
        ops.init()
        assert ops.pipelined is expected
    with pytest.raises(TsqpError, match="pipeline must be one of"):
        tee_model(model, InProcess(engine), pipeline="sometimes")


def test_attn_out_refuses_more_tokens_than_scored(model):
    engine = Engine(str(model))
    call = InProcess(engine)
    c = engine.config
    session = call("open_session", {"capacity": 16}).args["session"]
    hidden = torch.randn(4, c.hidden_size)
    call("qkv", {"layer": 0, "pos": 0}, [hidden], session=session)
    q, k = torch.randn(4, c.num_heads, c.head_dim), torch.randn(4, c.num_kv_heads, c.head_dim)
    call("scores", {"layer": 0, "pos": 0, "tile": 4}, [q, k], session=session)
    probs = torch.rand(c.num_heads * 4 * 4)
    with pytest.raises(Exception, match="tokens"):
        call("attn_out", {"layer": 0, "pos": 0, "tile": 4, "tokens": 5}, [probs], session=session)
    out = call("attn_out", {"layer": 0, "pos": 0, "tile": 4, "tokens": 4}, [probs], session=session)
    assert out.tensors[0].shape == (4, c.hidden_size)


# -- the client with several requests in flight -------------------------------------------------------


def test_regions_first_fit_reuse_and_end():
    regions = Regions(base=0)
    size = 16 * ALIGN
    assert regions.allocate(1, 4 * ALIGN, size) == 0
    assert regions.allocate(2, 3 * ALIGN + 1, size) == 4 * ALIGN  # rounded up to 4 aligned units
    assert regions.allocate(3, 8 * ALIGN, size) == 8 * ALIGN
    assert regions.allocate(4, ALIGN, size) is None  # full
    regions.free(1)
    assert regions.allocate(5, 2 * ALIGN, size) == 0  # the first gap that fits
    assert regions.allocate(6, 3 * ALIGN, size) is None  # the gap left is 2 units
    assert regions.end() == 16 * ALIGN
    for key in (2, 3, 5):
        regions.free(key)
    assert regions.live == {} and regions.end() == 0
    assert Regions(base=3 * ALIGN).allocate(1, ALIGN, size) == 3 * ALIGN
    assert regions.allocate(7, 16 * ALIGN, size) == 0


@pytest.fixture(scope="module")
def server(model):
    with ServerProcess(str(model)) as process:
        yield process


@pytest.mark.parametrize("shm", [True, False])
def test_replies_waited_out_of_order_each_match_their_request(server, shm):
    """4 to 16 MB each, there and back: the arena grows while requests are in flight."""
    with Client(server.endpoint, shm=shm, timeout_s=30) as client:
        payloads = [torch.full(((i + 1) << 20,), float(i)) for i in range(4)]
        ids = [client.submit("echo", {}, [p], reply_bytes=p.nbytes) for p in payloads]
        if shm:
            spans = sorted(client.placement.regions.live.values())
            assert len(spans) == 4 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
            assert client.placement.retired, "the arena grew with requests in flight"
        for i in reversed(range(4)):
            reply = client.wait(ids[i])
            torch.testing.assert_close(reply.tensors[0].clone(), payloads[i], atol=0, rtol=0)
        assert client.in_flight == {} and client.replies == {} and client.placement.regions.live == {}


def test_a_discarded_request_keeps_its_region_until_its_reply(server):
    with Client(server.endpoint, shm=True, timeout_s=30) as client:
        first = torch.ones(4096)
        dropped = client.submit("echo", {}, [first], reply_bytes=first.nbytes)
        assert dropped in client.placement.regions.live
        client.discard(dropped)
        assert dropped in client.placement.regions.live, "the server may still write there"
        second = torch.full((4096,), 2.0)
        reply = client.call("echo", {}, [second], reply_bytes=second.nbytes)
        torch.testing.assert_close(reply.tensors[0].clone(), second, atol=0, rtol=0)
        assert client.placement.regions.live == {} and client.in_flight == {}


@pytest.mark.parametrize("shm", [True, False])
def test_a_draft_is_filled_in_place_and_sent(server, shm):
    """attn_out's inputs are written where they are sent from: in the arena when there is one."""
    with Client(server.endpoint, shm=shm, timeout_s=30) as client:
        pair = client.draft([(torch.bfloat16, (3, 5)), (torch.float32, (7,))], reply_bytes=64)
        if shm:  # each in its own aligned place, the reply's room after them
            assert pair.offsets[0] % ALIGN == 0 and pair.offsets[1] == pair.offsets[0] + ALIGN
            assert pair.reply_at == pair.offsets[1] + ALIGN
        client.drop(pair)
        draft = client.draft([(torch.float32, (4096,))], reply_bytes=4096 * 4)
        in_arena = client.arena is not None and client.arena.offset_of(draft.tensors[0]) is not None
        assert in_arena == shm
        draft.tensors[0].copy_(torch.arange(4096.0))
        reply = client.wait(client.submit("echo", {}, draft=draft))
        torch.testing.assert_close(reply.tensors[0].clone(), torch.arange(4096.0), atol=0, rtol=0)
        assert client.placement.drafts == set() and client.placement.regions.live == {}
        with pytest.raises(ValueError, match="submitted or dropped already"):
            client.submit("echo", {}, draft=draft)


def test_a_draft_outlives_the_arena_growing_under_it(server):
    """A later request grows the arena while a draft is being filled: the draft's old mapping stays
    until it is sent, and what was written there reaches the server (the same file)."""
    with Client(server.endpoint, shm=True, timeout_s=30) as client:
        draft = client.draft([(torch.float32, (1024,))], reply_bytes=4096)
        big = torch.full((8 << 20,), 3.0)  # 32 MB: more than the arena holds
        waited = client.submit("echo", {}, [big], reply_bytes=big.nbytes)
        assert client.placement.retired, "the arena grew"
        client.wait(waited)
        client.call("ping")  # nothing in flight: only the draft keeps the old mapping
        assert client.placement.retired
        draft.tensors[0].copy_(torch.arange(1024.0))  # through the retired mapping, still mapped
        reply = client.wait(client.submit("echo", {}, draft=draft))
        torch.testing.assert_close(reply.tensors[0].clone(), torch.arange(1024.0), atol=0, rtol=0)
        client.call("ping")
        assert client.placement.retired == [] and client.placement.regions.live == {}


def test_a_dropped_draft_frees_its_region(server):
    with Client(server.endpoint, shm=True, timeout_s=30) as client:
        draft = client.draft([(torch.float32, (1024,))])
        assert draft.id in client.placement.regions.live
        client.drop(draft)
        assert client.placement.regions.live == {} and client.placement.drafts == set()
        client.drop(draft)  # twice is harmless


def test_a_draft_that_cannot_attach_its_arena_leaves_no_region(server):
    with Client(server.endpoint, shm=True, timeout_s=30) as client:

        def gone(*args, **kwargs):
            raise ConnectionLost("the server went away")

        client.call = gone  # the arena's attach_arena round trip fails
        with pytest.raises(ConnectionLost, match="went away"):
            client.draft([(torch.float32, (16,))])
        assert client.placement.regions.live == {} and client.placement.drafts == set()


@pytest.mark.parametrize("shm", [True, False])
def test_pipelined_through_a_server_equals_transformers(model, reference, server, shm):
    ids = token_ids(90, seed=6)
    stats = Stats()
    with Client(server.endpoint, stats=stats, shm=shm, timeout_s=30) as client:
        tee = pipelined(tee_model(model, client, stats), True, tile=8)
        tee.attach()
        logits = prefill(tee, ids, [70, 20])
        assert client.in_flight == {} and client.placement.regions.live == {}
    torch.testing.assert_close(logits, reference_logits(reference, ids), atol=ATOL, rtol=0)
    layers = tee.config.num_layers
    assert stats.rpc_calls > 5 * layers * 2 + 2  # more than two round trips of attention per layer and step


@pytest.mark.parametrize("shm", [True, False])
def test_a_pipeline_failing_halfway_leaves_the_client_usable(model, server, shm):
    """The TEE fails on the third chunk: requests still in flight are discarded, their replies drained
    as they come, and the next forward pass gives the right logits."""
    with Client(server.endpoint, shm=shm, timeout_s=30) as client:
        tee = pipelined(tee_model(model, client, verify=True), True, tile=8)
        tee.attach()
        softmax, tiles = tee.softmax_, []

        def failing(block):
            tiles.append(block.shape)
            if len(tiles) == 5:  # chunks in: its attn_out drafted, the next chunks' scores in flight
                raise RuntimeError("the TEE failed")
            return softmax(block)

        tee.softmax_ = failing
        tee.ops.open_session(64)
        with pytest.raises(RuntimeError, match="the TEE failed"):
            tee.forward(token_ids(64, seed=3))
        assert any(r.discarded for r in client.in_flight.values()), "requests were in flight"
        assert client.placement.drafts == set()  # the failed chunk's attn_out inputs were given up, never sent
        tee.ops.close_session()  # waits behind the discarded ones, whose replies are drained meanwhile
        assert client.in_flight == {} and client.replies == {} and client.placement.regions.live == {}
        tee.softmax_ = softmax
        ids = token_ids(50, seed=12)
        tee.ops.open_session(50)
        logits = tee.forward(ids)
    torch.testing.assert_close(logits, split_logits(model, InProcess(Engine(str(model))), ids), atol=ATOL, rtol=0)


def test_a_failing_draft_leaves_no_request_behind(model, server):
    """Making a chunk's attn_out draft fails (the arena cannot grow, Ctrl-C): the chunk's scores request,
    already in flight, is given up on too; nothing stays in flight or keeps its region."""
    with Client(server.endpoint, shm=True, timeout_s=30) as client:
        tee = pipelined(tee_model(model, client, verify=True), True, tile=8)
        tee.attach()
        draft, drafts = client.draft, []

        def failing(*args, **kwargs):
            drafts.append(1)
            if len(drafts) == 2:
                raise KeyboardInterrupt
            return draft(*args, **kwargs)

        client.draft = failing
        tee.ops.open_session(64)
        with pytest.raises(KeyboardInterrupt):
            tee.forward(token_ids(64, seed=4))
        client.draft = draft
        tee.ops.close_session()
        assert client.in_flight == {} and client.replies == {} and client.placement.regions.live == {}
        ids = token_ids(40, seed=13)
        tee.ops.open_session(40)
        logits = tee.forward(ids)
    torch.testing.assert_close(logits, split_logits(model, InProcess(Engine(str(model))), ids), atol=ATOL, rtol=0)


def test_a_failed_restart_keeps_the_running_key_sums(model):
    """A prefill restarted at position 0 fails before its scores pass: the TEE's running sums over the
    cached keys (what later appends are checked against) must be those of the earlier prefill."""
    tee = pipelined(tee_model(model, InProcess(Engine(str(model))), verify=True), True, tile=8)
    tee.attach()
    tee.ops.open_session(64)
    tee.forward(token_ids(32, seed=5))
    state = tee.ops.checker.state
    kr, k_sq = state.kr[0].clone(), state.k_sq[0].clone()

    def failing(block):
        raise RuntimeError("the TEE failed")

    tee.softmax_ = failing
    with pytest.raises(RuntimeError):
        tee.forward(token_ids(8, seed=6), pos=0)
    assert state.k_filled[0] == 32
    assert torch.equal(state.kr[0], kr) and torch.equal(state.k_sq[0], k_sq)


def test_statistics_count_server_compute_behind_tee_work():
    stats = Stats()
    # A plain call: the TEE waits through the server's whole compute.
    stats.rpc("qkv", sent=1, received=1, serialize_s=0, deserialize_s=0, server_s=3.0,
              start=0.0, sent_at=0.5, waiting=0.5, done=5.0, server_start=1.0)  # fmt: skip
    assert stats.hidden_s == 0.0
    assert stats.communication_s == pytest.approx(5.0 - 3.0)
    # A pipelined call: out at 10, the server computes 11..14 while the TEE works until 13, then waits.
    stats.rpc("scores", sent=1, received=1, serialize_s=0, deserialize_s=0, server_s=3.0,
              start=10.0, sent_at=10.0, waiting=13.0, done=14.5, server_start=11.0)  # fmt: skip
    assert stats.hidden_s == pytest.approx(2.0)  # 11..13 ran behind the TEE's own work
    assert stats.communication_s == pytest.approx(2.0 + 0.5)  # 13..14 waited on compute, 14..14.5 not
    assert stats.rpc_s == pytest.approx(5.0 + 1.5)
    # A server on another host (its clock is not ours): its compute counts as waited for.
    stats.rpc("down", sent=1, received=1, serialize_s=0, deserialize_s=0, server_s=1.0,
              start=20.0, sent_at=20.0, waiting=20.0, done=22.0, server_start=12345.0)  # fmt: skip
    assert stats.communication_s == pytest.approx(2.5 + 1.0)
