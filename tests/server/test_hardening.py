"""Hostile servers, restarts and kills: the client checks every reply, recovers, and nothing blocks a restart.

A fake server (a bare ROUTER in a thread) answers with crafted frames to show the client validates
replies before using them; real `tsqp serve` subprocesses are killed and restarted under a client that
keeps its socket.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from conftest import free_port, kill_process, reference_logits, split_logits, token_ids, wait_for

from tsqp.errors import ConnectionLost, ProtocolError, ServerError, TsqpError
from tsqp.model.checkpoint import Checkpoint
from tsqp.server.engine import Engine
from tsqp.server.sessions import EVICT_IDLE_S
from tsqp.stats import Stats
from tsqp.tee.compose import build_ops, tee_model
from tsqp.tee.launcher import ServerProcess
from tsqp.tee.remote import InProcess
from tsqp.wire.client import Client
from tsqp.wire.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Message, pack
from tsqp.wire.transport import bind_server, make_socket

START_TIMEOUT_S = 60.0
ATOL = 1e-4


@pytest.fixture
def short_dir():
    """A short folder for ipc socket paths (the sun_path limit is ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tsqph-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def endpoint_for(transport: str, folder: Path) -> str:
    return f"ipc://{folder}/h.sock" if transport == "ipc" else f"tcp://127.0.0.1:{free_port()}"


# -- a fake, lying server -----------------------------------------------------------------------------

Reply = Callable[[dict], list]  # request header -> reply frames (without the peer identity)


class FakeServer:
    """A ROUTER that answers each request with the next crafted reply (None: no answer at all; a tuple:
    several messages in a row)."""

    def __init__(self, endpoint: str, replies: list[Reply | None]):
        self.context = zmq.Context()
        self.sock = make_socket(self.context, zmq.ROUTER)
        self.sock.bind(endpoint)
        self.replies = list(replies)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set() and self.replies:
            if not self.sock.poll(20):
                continue
            peer, *frames = self.sock.recv_multipart()
            reply = self.replies.pop(0)
            for message in reply if isinstance(reply, tuple) else [] if reply is None else [reply]:
                self.sock.send_multipart([peer, *message(msgpack.unpackb(frames[0]))])

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()
        self.context.term()


def answer(ok=True, tensors=(), **fields) -> Reply:
    return lambda request: pack({"id": request["id"], "ok": ok, **fields}, list(tensors))


def raw(*frames: bytes) -> Reply:
    return lambda request: list(frames)


def header_bytes(**fields) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "tensors": [], **fields}, use_bin_type=True)


@pytest.mark.parametrize(
    "reply,error,match",
    [
        (raw(b"\xc1garbage"), ProtocolError, "not valid msgpack"),
        (raw(msgpack.packb([1, 2, 3])), ProtocolError, "not a map"),
        (lambda r: [header_bytes(id=r["id"], ok=True, v=2)], ProtocolError, "protocol version"),
        (lambda r: [header_bytes(id=r["id"], ok=True, tensors=[["float32", [4]]])], ProtocolError, "1 framed tensors"),
        (
            lambda r: [header_bytes(id=r["id"], ok=True, tensors=[["float32", [4]]]), b"\0" * 15],
            ProtocolError,
            "needs 16 bytes",
        ),
        (lambda r: [header_bytes(id=r["id"], ok=True, tensors=[[["x"], [4]]]), b"\0" * 16], ProtocolError, "dtype"),
        (
            lambda r: [header_bytes(id=r["id"], ok=True, tensors=[["float32", [2**31, 2**31]]]), b""],
            ProtocolError,
            "byte bound",
        ),
        (lambda r: [header_bytes(id=r["id"], ok=True, tensors=[["float32", [3]]], args=[1])], ProtocolError, "args"),
        (answer(ok=1), ServerError, "no reason given"),  # only True means ok
        (answer(ok=False, error="line one\nline two\x1b[31m" + "x" * 5000), ServerError, "line one line two"),
    ],
    ids=[
        "garbage",
        "not-a-map",
        "version",
        "missing-frame",
        "short-frame",
        "dtype-type",
        "huge-shape",
        "args-type",
        "ok-not-bool",
        "multiline-error",
    ],
)
def test_client_validates_every_reply(short_dir, reply, error, match):
    endpoint = f"ipc://{short_dir}/f.sock"
    with FakeServer(endpoint, [reply]), Client(endpoint, timeout_s=5) as client:
        with pytest.raises(error, match=match) as caught:
            client.call("ping")
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_stale_replies_are_dropped(short_dir):
    """A reply with another id (a late answer to an earlier call) never stands in for the current one."""
    endpoint = f"ipc://{short_dir}/f.sock"
    stale = lambda r: pack({"id": r["id"] - 1, "ok": True, "args": {"which": "stale"}})  # noqa: E731
    right = answer(args={"which": "right", "compute_s": "soon"})
    with FakeServer(endpoint, [(stale, right)]), Client(endpoint, timeout_s=5) as client:
        reply = client.call("ping")
    assert reply.args["which"] == "right"
    assert client.stats.server_s == 0.0  # a non-numeric compute_s is ignored, not trusted


def test_reply_shapes_and_types_are_checked_by_remote_ops(tiny_model):
    """The plain split's ops hold every reply to exactly the dtype and shape it asked for, control replies included."""
    engine = Engine(str(tiny_model))
    honest = InProcess(engine)
    checkpoint = Checkpoint(tiny_model)
    config = checkpoint.config

    def lying(change):
        def call(method, args=None, tensors=(), session=None, **kw):
            reply = honest(method, args, tensors, session)
            return change(method, reply)

        return call

    def first_tensor(fn):
        return lambda method, reply: (
            Message(reply.header, [fn(reply.tensors[0])] + reply.tensors[1:]) if reply.tensors else reply
        )

    cases = {
        "extra row": first_tensor(lambda t: torch.cat([t, t[:1]])),
        "dtype": first_tensor(lambda t: t.to(torch.float16)),
        "flat": first_tensor(lambda t: t.reshape(-1)),
        "missing": lambda method, reply: Message(reply.header, []),
        "extra tensor": lambda method, reply: Message(reply.header, reply.tensors + reply.tensors[:1]),
    }
    ids = token_ids(5, vocab=config.vocab_size)
    for change in cases.values():
        ops = build_ops(checkpoint, lying(change), Stats(), verify=False)
        ops.open_session(5)
        with pytest.raises(ProtocolError, match="expected"):
            ops.embedding(ids)
        with pytest.raises(ProtocolError, match="expected"):
            ops.qkv(0, 0, torch.randn(5, config.hidden_size))
        with pytest.raises(ProtocolError, match="expected"):
            ops.lm_head(torch.randn(5, config.hidden_size))

    def control(args):
        return lambda method, args_=None, tensors=(), session=None, **kw: Message({"id": 0, "ok": True, "args": args})

    with pytest.raises(ServerError, match="unknown dtype"):
        build_ops(checkpoint, control({"dtype": ["float32"]}), Stats(), verify=False).init()
    with pytest.raises(ServerError, match="no session id"):
        build_ops(checkpoint, control({"session": "not-bytes"}), Stats(), verify=False).open_session(4)
    with pytest.raises(TsqpError, match="different model"):
        tee_model(tiny_model, control({"dtype": "float32", "fingerprint": ["x"]})).attach()


def test_deadline(short_dir):
    endpoint = f"ipc://{short_dir}/f.sock"
    with FakeServer(endpoint, [None]), Client(endpoint, timeout_s=0.5) as client:
        start = time.monotonic()
        with pytest.raises(ConnectionLost, match="did not answer ping within 0.5 s"):
            client.call("ping")
        assert time.monotonic() - start < 2


def test_message_size_bound(short_dir):
    """Every socket bounds a message part (zmq.MAXMSGSIZE); a peer that sends a larger one is cut off."""
    server_sock = bind_server(zmq.Context.instance(), f"ipc://{short_dir}/s.sock")
    assert server_sock.getsockopt(zmq.MAXMSGSIZE) == MAX_MESSAGE_BYTES
    server_sock.close()
    endpoint = f"ipc://{short_dir}/f.sock"
    with FakeServer(endpoint, [answer(tensors=[torch.zeros(4096)])]):
        with Client(endpoint) as client:
            assert client.link.sock.getsockopt(zmq.MAXMSGSIZE) == MAX_MESSAGE_BYTES
        dealer = make_socket(zmq.Context.instance(), zmq.DEALER, max_message_bytes=1024)
        monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        dealer.connect(endpoint)
        dealer.send_multipart(pack({"id": 1, "method": "ping"}))
        assert monitor.poll(5000), "the oversized reply did not cut the connection"
        assert not dealer.poll(100)
        dealer.disable_monitor()
        monitor.close()
        dealer.close()


# -- engine bounds ------------------------------------------------------------------------------------


def test_engine_bounds_result_sizes(tiny_model):
    engine = Engine(str(tiny_model))
    call = InProcess(engine)
    c = engine.config
    too_many = c.max_position_embeddings + 1
    with pytest.raises(ServerError, match="positions"):
        call("lm_head", {}, [torch.zeros(too_many, c.hidden_size)])
    with pytest.raises(ServerError, match="positions"):
        call("embedding", {}, [torch.zeros(too_many, dtype=torch.int64)])
    with pytest.raises(ServerError, match="exceeds"):  # (2^16, 0) @ (0, 2^16): no bytes in, 16 GiB out
        call("matmul", {}, [torch.zeros(2**16, 0), torch.zeros(0, 2**16)])
    # a fresh session's cache is zeroed, so reading values before writing them leaks nothing
    session = call("open_session", {"capacity": 8}).args["session"]
    assert all(not s.values.any() and not s.keys.any() for s in engine.sessions.values())
    call("close_session", session=session)


# -- live servers: busy, killed, restarted ------------------------------------------------------------


def test_busy_server_is_not_taken_over(short_dir):
    """A server that does not answer (busy with a long request) still owns its socket file."""
    endpoint = f"ipc://{short_dir}/b.sock"
    with FakeServer(endpoint, [None]):
        with pytest.raises(ConnectionLost, match="already listening"):
            bind_server(zmq.Context.instance(), endpoint)
        assert (short_dir / "b.sock").exists()


@pytest.mark.parametrize("transport,shm", [("ipc", False), ("tcp", False), ("tcp", True)])
def test_restarted_server_is_reconnected(tiny_model, tiny_reference, short_dir, transport, shm):
    """kill -9 of the server: the next call fails fast; a new server on the same endpoint serves the same
    Client object (same socket; the shared-memory arena is attached again)."""
    endpoint = endpoint_for(transport, short_dir)
    ids = token_ids(23)
    expected = reference_logits(tiny_reference, ids)
    first = ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=START_TIMEOUT_S).__enter__()
    try:
        with Client(endpoint, timeout_s=30, shm=shm) as client:
            torch.testing.assert_close(split_logits(tiny_model, client.call, ids), expected, atol=ATOL, rtol=0)
            assert kill_process(first.process) == -signal.SIGKILL
            start = time.monotonic()
            with pytest.raises(ConnectionLost, match="closed the connection"):
                client.call("init")
            assert time.monotonic() - start < 5
            second = ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=START_TIMEOUT_S).__enter__()
            try:
                assert client.call("init").args["layers"] == 2
                torch.testing.assert_close(split_logits(tiny_model, client.call, ids), expected, atol=ATOL, rtol=0)
                assert kill_process(second.process) == -signal.SIGKILL
            finally:
                second.stop()
            # killed and replaced while no call was made: the old disconnect must not fail the next call
            with ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=START_TIMEOUT_S):
                torch.testing.assert_close(split_logits(tiny_model, client.call, ids), expected, atol=ATOL, rtol=0)
    finally:
        first.stop()


def test_call_in_flight_fails_then_client_recovers(tiny_model, short_dir):
    """The server dies while a call waits: that call fails at once; the next server serves the next call."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    fake = FakeServer(endpoint, [None])  # swallows the request, then its socket closes
    with fake, Client(endpoint, timeout_s=60) as client:
        closer = threading.Thread(target=lambda: (fake.thread.join(), time.sleep(0.2), fake.sock.close()))
        closer.start()
        start = time.monotonic()
        with pytest.raises(ConnectionLost, match="closed the connection during ping"):
            client.call("ping")
        assert time.monotonic() - start < 5
        closer.join()
        with ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=START_TIMEOUT_S):
            assert client.call("init").args["layers"] == 2


def test_tcp_port_of_killed_server_is_free_at_once(tiny_model):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    first = ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=START_TIMEOUT_S).__enter__()
    try:
        with Client(endpoint, timeout_s=30) as client:  # an open connection when it dies
            client.call("init")
            assert kill_process(first.process) == -signal.SIGKILL
        with ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=START_TIMEOUT_S) as second:
            with Client(endpoint, timeout_s=30) as client:
                assert client.call("ping").header["ok"]
            second.process.send_signal(signal.SIGTERM)
            assert second.process.wait(timeout=15) == 0
    finally:
        first.stop()


def test_sigterm_with_connected_client_exits_zero(tiny_model, short_dir):
    path = short_dir / "t.sock"
    with ServerProcess(str(tiny_model), endpoint=f"ipc://{path}", start_timeout_s=START_TIMEOUT_S) as server:
        with Client(f"ipc://{path}", timeout_s=30) as client:
            tee = tee_model(tiny_model, client.call)
            tee.attach()
            tee.ops.open_session(8)  # a session still open
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=15) == 0
            assert not path.exists()
            with pytest.raises(ConnectionLost):
                client.call("ping")


def test_kill9_of_client_stops_its_private_server(tiny_model):
    """A client killed with -9 takes its private server with it (PR_SET_PDEATHSIG): no orphan holds the GPU."""
    script = textwrap.dedent(f"""
        import sys, time
        from tsqp.options import RunOptions
        from tsqp.tee.runner import open_model
        with open_model(RunOptions(model_dir={str(tiny_model)!r}, start_timeout_s=60)) as tee:
            print(tee.ops.link.endpoint, flush=True)
            time.sleep(120)
    """)
    client = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env={**os.environ, "TSQP_QUIET_SERVER": "1"}
    )
    servers: list[int] = []
    try:
        endpoint = client.stdout.readline().strip()
        assert endpoint.startswith("ipc://"), endpoint
        socket_file = Path(endpoint[len("ipc://") :])
        servers = _children(client.pid)
        assert len(servers) == 1, servers
        assert kill_process(client) == -signal.SIGKILL
        assert wait_for(lambda: not _alive(servers[0]), timeout=15), "the private server outlived its client"
        assert wait_for(lambda: not socket_file.exists(), timeout=5), "the private server left its socket file"
    finally:
        kill_process(client)
        for pid in servers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # ppid
            children.append(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_sessions_of_a_vanished_client_give_way_under_memory_pressure(tiny_model):
    """A client killed with -9 cannot close its session; once idle for EVICT_IDLE_S it yields to a new one."""
    engine = Engine(str(tiny_model))
    per_token = 2 * engine.config.num_layers * engine.config.kv_dim * 4
    big = engine.config.max_position_embeddings
    engine.sessions.max_cache_bytes = per_token * big * 3 // 2  # one fits, two do not
    killed, newcomer = InProcess(engine, peer=b"killed"), InProcess(engine, peer=b"newcomer")
    old = killed("open_session", {"capacity": big}).args["session"]
    with pytest.raises(ServerError, match="memory cap"):  # a recently used session keeps its memory
        newcomer("open_session", {"capacity": big})
    engine.sessions[old].last_used -= EVICT_IDLE_S
    newcomer("open_session", {"capacity": big})
    assert old not in engine.sessions


@pytest.mark.parametrize("name", [["q_proj"], {"q": 1}, 3, None, "w_proj"])
def test_seed_linear_refuses_a_bad_weight_name(tiny_model, name):
    """A weight name that is not one of the seed's names (a list, a map, ...) is a plain refusal."""
    engine = Engine(str(tiny_model))
    call = InProcess(engine)
    x = torch.zeros(2, engine.config.hidden_size)
    with pytest.raises(ServerError, match="unknown weight"):
        call("linear", {"layer": 0, "name": name}, [x])
    with pytest.raises(ServerError, match="unknown weight"):
        call("batch_linear", {"layer": 0, "names": ["q_proj", name]}, [x])
    (q,) = call("linear", {"layer": 0, "name": "q_proj"}, [x]).tensors
    assert q.shape == (2, engine.config.q_dim)
