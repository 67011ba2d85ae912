"""Property-based fuzzing of the server loop with malformed multipart requests (hypothesis).

One `server.Server` on an ipc endpoint, driven in-process: a DEALER sends one message, the test calls
`serve_one()` and reads the reply. For every message: `serve_one` returns (no exception) within
MAX_SERVE_S, exactly one reply comes back, that reply is itself a valid protocol message with the
request's id, and a refusal is a plain error (never "internal error", which would mean an input the
server did not foresee). After all strategies, a real client still gets the right logits.

FUZZ_CASES counts the messages; the total over all strategies is printed and must reach MIN_CASES.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsqp.server.engine import Engine
from tsqp.server.loop import Server
from tsqp.tee.compose import tee_model
from tsqp.tee.remote import InProcess
from tsqp.wire.arena import ALIGN, Arena, shm_available
from tsqp.wire.client import Client
from tsqp.wire.protocol import (
    DTYPES,
    MAX_NDIM,
    MAX_QUERY_TILE,
    MAX_TENSORS,
    METHODS,
    PROTOCOL_VERSION,
    query_tiles,
    unpack,
)
from tsqp.wire.transport import make_socket

ARENA_BYTES = 1 << 20
MAX_SERVE_S = 2.0  # one hostile message may not keep the server busy longer than this
POLL_MS = 2000
MIN_CASES = 3000
FUZZ_CASES = {"count": 0}
FUZZ_TESTS: set[str] = set()  # the strategies that ran (MIN_CASES applies when all of them did)
OUTCOMES: Counter = Counter()  # (method, ok or the error's first words): shows how deep the cases reach

# The brief's model: 1 layer, 4 heads of 8, 2 kv heads, MLP 64, vocab 64 (max_position_embeddings 2048).
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 32, 4, 2, 8, 64, 64
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def fuzz_model(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fuzz-model")
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


class Harness:
    """A server and a hostile peer in one thread: send, serve_one, receive, in lockstep."""

    def __init__(self, model_dir: Path, folder: Path):
        self.context = zmq.Context()
        self.endpoint = f"ipc://{folder}/fuzz.sock"
        self.server = Server(Engine(str(model_dir), max_cache_bytes=16 << 20), self.endpoint, context=self.context)
        self.peer = make_socket(self.context, zmq.DEALER)
        self.peer.connect(self.endpoint)
        self.arena_peer, self.arena = None, None
        reply = self.request(
            {"id": 1, "method": "open_session", "session": None, "args": {"capacity": 64}, "tensors": []}
        )
        assert reply.header["ok"], reply.header
        self.session = reply.args["session"]  # a real session of this peer, so session calls get deep

    def attach_arena(self) -> None:
        """A second peer with a shared-memory arena: its tensors lie in the arena, described by offsets."""
        self.arena = Arena.create(size=ARENA_BYTES)
        self.arena.bytes.copy_(torch.randint(0, 256, (ARENA_BYTES,), dtype=torch.uint8))
        self.arena_peer = make_socket(self.context, zmq.DEALER)
        self.arena_peer.connect(self.endpoint)
        header = {
            "id": 3,
            "method": "attach_arena",
            "session": None,
            "args": {"name": self.arena.name, "size": ARENA_BYTES},
            "tensors": [],
        }
        assert self.request(header, peer=self.arena_peer).header["ok"]
        header = {"id": 4, "method": "open_session", "session": None, "args": {"capacity": 64}, "tensors": []}
        self.arena_session = self.request(header, peer=self.arena_peer).args["session"]

    def reopen_session(self) -> None:
        """A fuzzed close_session may have closed it: session calls need a live one to reach the ops."""
        if self.session not in self.server.engine.sessions:
            reply = self.request(
                {"id": 2, "method": "open_session", "session": None, "args": {"capacity": 64}, "tensors": []}
            )
            self.session = reply.args["session"]

    def exchange(self, frames: list[bytes], peer: zmq.Socket | None = None) -> list[bytes]:
        peer = peer or self.peer
        peer.send_multipart(frames)
        assert self.server.sock.poll(POLL_MS), "the request did not reach the server"
        start = time.monotonic()
        self.server.serve_one()
        assert time.monotonic() - start < MAX_SERVE_S, "serve_one took too long"
        assert peer.poll(POLL_MS), "no reply"
        reply = peer.recv_multipart()
        assert not self.server.sock.poll(0), "one message became more than one request"
        FUZZ_CASES["count"] += 1
        return reply

    def check(self, frames: list[bytes], peer: zmq.Socket | None = None):
        """One message -> its validated reply; a refusal must be a plain error with the request's id."""
        arena = self.arena if peer is not None and peer is self.arena_peer else None
        reply = unpack(self.exchange(frames, peer), arena)  # the reply is a valid protocol message
        header = reply.header
        assert header["ok"] in (True, False), header
        if header["ok"] is False:
            assert isinstance(header.get("error"), str) and header["error"], header
            assert not header["error"].startswith("internal error"), header["error"]
            assert reply.tensors == []
        OUTCOMES[_outcome(frames[0], header)] += 1
        expected_id = _readable_id(frames[0])
        if expected_id is not None:
            assert header["id"] == expected_id, (header["id"], expected_id)
        return reply

    def request(self, header: dict, frames: list[bytes] = (), peer: zmq.Socket | None = None):
        return self.check([msgpack.packb({"v": PROTOCOL_VERSION, **header}, use_bin_type=True), *frames], peer)

    def close(self) -> None:
        if self.arena_peer is not None:
            self.arena_peer.close()
            self.arena.unlink()
        self.peer.close()
        self.server.close()
        self.context.term()


def _outcome(raw: bytes, header: dict) -> tuple[str, str]:
    try:
        method = msgpack.unpackb(raw, raw=False).get("method")
    except Exception:
        method = None
    method = method if isinstance(method, str) and method in METHODS else "-"
    return method, "ok" if header["ok"] else re.match(r"[A-Za-z_ ]*", header["error"]).group().strip()


def _readable_id(raw: bytes) -> int | None:
    """The id a reply must carry: that of a small header that is a map with a plain integer id."""
    if len(raw) > 4096:
        return None
    try:
        header = msgpack.unpackb(raw, raw=False)
    except Exception:
        return None
    if not isinstance(header, dict):
        return None
    value = header.get("id")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    return None


@pytest.fixture(scope="module")
def harness(fuzz_model):
    folder = Path(tempfile.mkdtemp(prefix="tsqpf-", dir="/tmp"))  # short: ipc paths are limited to ~107 bytes
    h = Harness(fuzz_model, folder)
    yield h
    h.close()
    shutil.rmtree(folder, ignore_errors=True)


# -- strategies ---------------------------------------------------------------------------------------

HUGE = [2**31, 2**31 - 1, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1, -1, -(2**31), -(2**63)]
ints = st.one_of(st.integers(-3, 70), st.sampled_from(HUGE), st.integers(-(2**63), 2**64 - 1))
scalars = st.one_of(
    st.none(), st.booleans(), ints, st.floats(allow_nan=True), st.text(max_size=12), st.binary(max_size=24)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
dtype_names = st.one_of(
    st.sampled_from(list(DTYPES)), st.sampled_from(["float128", "int32", "bool", "", "FLOAT32"]), values
)
methods = st.one_of(st.sampled_from(list(METHODS)), st.text(max_size=16), values)
# dimensions the model uses (so shapes are often nearly right) and hostile ones
model_dims = st.sampled_from(
    [0, 1, 2, 3, 5, 8, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTER, VOCAB, HIDDEN + 16, 2 * INTER]
)
dims = st.one_of(model_dims, model_dims, st.sampled_from(HUGE), st.booleans(), st.floats(), st.text(max_size=2))
arg_values = st.one_of(
    st.integers(-2, 70),
    st.sampled_from(HUGE + [0, 1, MAX_QUERY_TILE, MAX_QUERY_TILE + 1]),
    st.booleans(),
    st.floats(),
    st.none(),
    st.text(max_size=10),
    st.binary(max_size=8),
    st.lists(
        st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", ""]),
        max_size=10,
    ),
    st.sampled_from(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "x" * 200]
    ),
)
ARG_NAMES = ["layer", "pos", "tile", "window", "capacity", "name", "names", "reply_at", "size", "values"]
args_maps = st.dictionaries(st.one_of(st.sampled_from(ARG_NAMES), st.text(max_size=6)), arg_values, max_size=6)


@st.composite
def tensor_frames(draw, shapes=None):
    """(descriptor, frame) with a frame of exactly the declared size, contents from a seeded generator."""
    dtype = draw(st.sampled_from(["float32"] * 4 + list(DTYPES)))  # the server's dtype, mostly
    shape = draw(
        shapes
        if shapes is not None
        else st.lists(st.one_of(model_dims, st.integers(1, 9)), min_size=0, max_size=MAX_NDIM)
    )
    numel = math.prod(shape)
    if numel * DTYPES[dtype].itemsize > 1 << 20:
        shape, numel = [0, *shape[1:]], 0  # keep the fuzzer's own traffic small; the declared rank stays
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    fill = draw(st.sampled_from(["randn", "zeros", "nan", "inf", "huge", "ids"]))
    if DTYPES[dtype] == torch.int64 or fill == "ids":
        tensor = torch.randint(-3, VOCAB + 3, (numel,), generator=generator).to(DTYPES[dtype])
    else:
        tensor = {
            "randn": lambda: torch.randn(numel, generator=generator),
            "zeros": lambda: torch.zeros(numel),
            "nan": lambda: torch.full((numel,), math.nan),
            "inf": lambda: torch.full((numel,), math.inf),
            "huge": lambda: torch.full((numel,), 3e38),
        }[fill]().to(DTYPES[dtype])
    return [dtype, shape], tensor.view(torch.uint8).numpy().tobytes() if numel else b""


def session_field(harness):
    return st.one_of(st.just(harness.session), st.none(), st.binary(max_size=20), ints, st.text(max_size=4))


# -- properties ---------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=500)
@given(frames=st.lists(st.binary(max_size=300), min_size=1, max_size=MAX_TENSORS + 3))
def test_garbage_frames(harness, frames):
    FUZZ_TESTS.add("test_garbage_frames")
    harness.check(frames)


@settings(FUZZ, max_examples=400)
@given(header=values, extra=st.lists(st.binary(max_size=64), max_size=3))
def test_msgpack_values_as_header(harness, header, extra):
    FUZZ_TESTS.add("test_msgpack_values_as_header")
    harness.check([msgpack.packb(header, use_bin_type=True), *extra])


@st.composite
def headers(draw, harness):
    """A header map whose every field is valid, missing or hostile, with frames that may not match it."""
    header = {}
    for key, valid, hostile in [
        ("v", PROTOCOL_VERSION, st.sampled_from([0, 2, -1, 1.0, True, "1", None, b"\x01", [1], {"v": 1}])),
        ("id", draw(st.integers(0, 2**63 - 1)), st.one_of(values, st.integers(-(2**63), -1))),
        ("method", draw(st.sampled_from(list(METHODS))), methods),
        ("session", harness.session, session_field(harness)),
        ("args", {}, st.one_of(args_maps, values)),
    ]:
        choice = draw(st.sampled_from(["valid", "valid", "missing", "hostile"]))
        if choice == "valid":
            header[key] = valid
        elif choice == "hostile":
            header[key] = draw(hostile)
    pairs = draw(st.lists(tensor_frames(), max_size=MAX_TENSORS + 2))
    descriptors, frames = [d for d, _ in pairs], [f for _, f in pairs]
    mutation = draw(st.sampled_from(["none", "none", "drop_frame", "extra_frame", "resize", "descriptor", "list"]))
    if mutation == "drop_frame" and frames:
        frames.pop(draw(st.integers(0, len(frames) - 1)))
    elif mutation == "extra_frame":
        frames.append(draw(st.binary(max_size=64)))
    elif mutation == "resize" and frames:
        i = draw(st.integers(0, len(frames) - 1))
        frames[i] = frames[i][: draw(st.integers(0, max(0, len(frames[i]) - 1)))] if frames[i] else b"\0" * 4
    elif mutation == "descriptor" and descriptors:
        i = draw(st.integers(0, len(descriptors) - 1))
        descriptors[i] = draw(
            st.one_of(
                values,
                st.lists(values, min_size=2, max_size=3),
                st.tuples(dtype_names, st.lists(dims, max_size=MAX_NDIM + 2)).map(list),
            )
        )
    header["tensors"] = draw(values) if mutation == "list" else descriptors
    return header, frames


@settings(FUZZ, max_examples=900)
@given(data=st.data())
def test_header_fields(harness, data):
    FUZZ_TESTS.add("test_header_fields")
    header, frames = data.draw(headers(harness))
    harness.check([msgpack.packb(header, use_bin_type=True), *frames])


def exact_shapes(method: str, T: int, args: dict, filled: int) -> list[list[int]]:
    """The shapes a method takes for T tokens (attn_out: the packed length after `filled` cached keys)."""
    if method == "attn_out":
        pos, tile = args.get("pos"), args.get("tile")
        valid = all(isinstance(v, int) and not isinstance(v, bool) for v in (pos, tile))
        # a hostile pos (say -2**63) must not size the strategy's own work: query_tiles lists every tile
        if valid and 0 <= pos < filled and 0 < tile <= MAX_QUERY_TILE:
            return [[query_tiles(filled - pos, pos, HEADS, tile)[1]]]
        return [[T]]
    return {
        "embedding": [[T]],
        "echo": [[T, HIDDEN]],
        "qkv": [[T, HIDDEN]],
        "gate_up": [[T, HIDDEN]],
        "down": [[T, INTER]],
        "o_proj": [[T, HEADS * HEAD_DIM]],
        "lm_head": [[T, HIDDEN]],
        "linear": [[T, HIDDEN]],
        "batch_linear": [[T, HIDDEN]],
        "scores": [[T, HEADS, HEAD_DIM], [T, KV_HEADS, HEAD_DIM]],
        "matmul": [[HEADS, T, HEAD_DIM], [HEADS, HEAD_DIM, T]],
    }.get(method, [])


@st.composite
def near_shape(draw, shape: list[int] | None):
    """The exact shape, one dimension off by a little or a lot, or any shape."""
    anything = st.lists(st.one_of(model_dims, st.integers(1, 9)), max_size=MAX_NDIM)
    choice = draw(st.sampled_from(["exact", "exact", "exact", "off", "any"]))
    if shape is None or choice == "any":
        return draw(anything)
    shape = list(shape)
    if choice == "off" and shape:
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] = draw(st.one_of(st.integers(0, shape[i] + 2), model_dims, st.sampled_from([2048, 2049, 4096])))
    return shape


WEIGHT_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def valid_args(method: str):
    """Arguments of the right types and ranges for each method (pos may still skip past the cache)."""
    layer, tile = st.just(0), st.sampled_from([1, 2, 3, 64, MAX_QUERY_TILE])
    pos = st.one_of(st.just(0), st.integers(0, 6))
    return st.fixed_dictionaries(
        {
            "open_session": {"capacity": st.integers(1, 64)},
            "linear": {"layer": layer, "name": st.sampled_from(WEIGHT_NAMES)},
            "batch_linear": {"layer": layer, "names": st.lists(st.sampled_from(WEIGHT_NAMES), min_size=1, max_size=8)},
            "qkv": {"layer": layer, "pos": pos, "values": st.booleans()},
            "scores": {"layer": layer, "pos": pos, "tile": tile},
            "attn_out": {"layer": layer, "pos": pos, "tile": tile},
            "gate_up": {"layer": layer},
            "down": {"layer": layer},
            "o_proj": {"layer": layer},
        }.get(method, {})
    )


@st.composite
def method_calls(draw, harness):
    """A well-formed message to a real method: valid arguments with one or two made hostile, the peer's
    own session most of the time, and tensors of nearly the right shapes (exact frame sizes)."""
    method = draw(st.sampled_from(list(METHODS)))
    args = draw(valid_args(method))
    for _ in range(draw(st.integers(0, 2))):
        mutation = draw(st.sampled_from(["hostile", "hostile", "drop", "extra"]))
        if mutation == "hostile":
            args[draw(st.sampled_from(list(args) or ARG_NAMES))] = draw(arg_values)
        elif mutation == "drop" and args:
            args.pop(draw(st.sampled_from(list(args))))
        else:
            args[draw(st.one_of(st.sampled_from(ARG_NAMES), st.text(max_size=6)))] = draw(arg_values)
    count = draw(st.one_of(st.just(METHODS[method]), st.just(METHODS[method]), st.integers(0, MAX_TENSORS)))
    live = harness.server.engine.sessions.get(harness.session)
    T = draw(st.one_of(st.integers(1, 6), st.sampled_from([0, 7, 63, 64, 65, 2048, 2049])))
    shapes = exact_shapes(method, T, args, live.filled[0] if live else 0)
    pairs = [draw(tensor_frames(near_shape(shapes[i] if i < len(shapes) else None))) for i in range(count)]
    session = harness.session if draw(st.integers(0, 9)) < 8 else draw(session_field(harness))
    header = {
        "id": draw(st.integers(0, 2**31)),
        "method": method,
        "session": session,
        "args": args,
        "tensors": [d for d, _ in pairs],
    }
    return header, [f for _, f in pairs]


@settings(FUZZ, max_examples=1500)
@given(data=st.data())
def test_method_args_and_tensors(harness, data):
    FUZZ_TESTS.add("test_method_args_and_tensors")
    harness.reopen_session()
    header, frames = data.draw(method_calls(harness))
    harness.request(header, frames)


@settings(FUZZ, max_examples=300)
@given(
    shape=st.lists(dims, min_size=1, max_size=MAX_NDIM + 3),
    dtype=dtype_names,
    method=methods,
    frame=st.binary(max_size=64),
    offset=st.one_of(st.none(), ints, values),
)
def test_huge_and_bad_declared_shapes(harness, shape, dtype, method, frame, offset):
    FUZZ_TESTS.add("test_huge_and_bad_declared_shapes")
    descriptor = [dtype, shape] if offset is None else [dtype, shape, offset]
    harness.request(
        {"id": 7, "method": method, "session": harness.session, "args": {}, "tensors": [descriptor]}, [frame]
    )


@st.composite
def arena_calls(draw, harness):
    """A real method from the arena peer: tensors placed at (mostly aligned, maybe overlapping or out of
    range) arena offsets, some framed, and a reply_at that may overlap the inputs or leave the arena."""
    method = draw(st.sampled_from(list(METHODS)))
    args = draw(valid_args(method))

    def offset() -> int:  # mostly aligned and inside the arena
        kind = draw(st.integers(0, 9))
        if kind < 8:
            return draw(st.integers(0, ARENA_BYTES // ALIGN // 2)) * ALIGN
        return draw(st.integers(0, ARENA_BYTES + 1) if kind == 8 else st.sampled_from([ARENA_BYTES, 2**32, 2**63 - 1]))

    args["reply_at"] = offset() if draw(st.integers(0, 9)) < 8 else draw(arg_values)
    live = harness.server.engine.sessions.get(harness.arena_session)
    T = draw(st.one_of(st.integers(1, 6), st.sampled_from([0, 64, 2049])))
    shapes = exact_shapes(method, T, args, live.filled[0] if live else 0)
    count = draw(st.one_of(st.just(METHODS[method]), st.integers(0, MAX_TENSORS)))
    descriptors, frames = [], []
    for i in range(count):
        descriptor, frame = draw(tensor_frames(near_shape(shapes[i] if i < len(shapes) else None)))
        if draw(st.integers(0, 3)):
            descriptors.append(descriptor + [offset()])
        else:
            descriptors.append(descriptor)
            frames.append(frame)
    session = harness.arena_session if draw(st.integers(0, 9)) < 8 else draw(session_field(harness))
    header = {
        "id": draw(st.integers(0, 2**31)),
        "method": method,
        "session": session,
        "args": args,
        "tensors": descriptors,
    }
    return header, frames


@pytest.mark.skipif(not shm_available(), reason="no writable /dev/shm")
@settings(FUZZ, max_examples=500)
@given(data=st.data())
def test_arena_offsets(harness, data):
    if harness.arena_peer is None:
        harness.attach_arena()
    live = harness.server.engine.sessions
    if harness.arena_session not in live:
        header = {"id": 4, "method": "open_session", "session": None, "args": {"capacity": 64}, "tensors": []}
        harness.arena_session = harness.request(header, peer=harness.arena_peer).args["session"]
    header, frames = data.draw(arena_calls(harness))
    harness.request(header, frames, peer=harness.arena_peer)


# -- afterwards: the server still serves -------------------------------------------------------------


def test_valid_client_after_fuzzing(harness, fuzz_model):
    total = FUZZ_CASES["count"]
    print(f"\nfuzzed the server with {total} malformed or hostile messages")
    accepted = Counter({method: n for (method, outcome), n in OUTCOMES.items() if outcome == "ok"})
    kinds = {outcome for _, outcome in OUTCOMES if outcome != "ok"}
    print(
        f"  {sum(accepted.values())} were valid and served ({dict(sorted(accepted.items()))}); "
        f"the rest got {len(kinds)} kinds of error reply, none an internal error"
    )
    if len(FUZZ_TESTS) == 5:
        assert total >= MIN_CASES, f"only {total} fuzz cases ran"
    assert harness.request({"id": 5, "method": "ping", "session": None, "args": {}, "tensors": []}).header["ok"]

    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if harness.server.sock.poll(20):
                harness.server.serve_one()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        ids = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(3))
        with Client(harness.endpoint, context=harness.context, timeout_s=30) as client:
            got = forward(fuzz_model, client.call, ids)
    finally:
        stop.set()
        thread.join(timeout=10)
    expected = forward(fuzz_model, InProcess(Engine(str(fuzz_model))), ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def forward(model_dir: Path, call, ids: torch.Tensor) -> torch.Tensor:
    tee = tee_model(model_dir, call)
    tee.attach()
    tee.ops.open_session(ids.shape[0])
    logits = tee.forward(ids)
    tee.ops.close_session()
    return logits
