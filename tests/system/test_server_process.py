"""Real `tsqp serve` subprocesses: logits over ipc and tcp, hostile input, crashes, signals, socket files."""

from __future__ import annotations

import itertools
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from conftest import assert_one_line_error, free_port, kill_process, reference_logits, run_tsqp, split_logits, token_ids

from tsqp.errors import ConnectionLost, TsqpError
from tsqp.tee.compose import tee_model
from tsqp.tee.forward import TeeModel
from tsqp.tee.launcher import ServerProcess
from tsqp.wire.client import Client
from tsqp.wire.protocol import PROTOCOL_VERSION, pack, unpack

ATOL = 1e-4
REPLY_TIMEOUT_MS = 10_000
START_TIMEOUT_S = 60.0


def assert_serves_correct_logits(endpoint: str, model_dir, reference, n: int = 29, alive=None) -> None:
    ids = token_ids(n, seed=n)
    with Client(endpoint, timeout_s=30, alive=alive) as client:
        got = split_logits(model_dir, client.call, ids)
    torch.testing.assert_close(got, reference_logits(reference, ids), atol=ATOL, rtol=0)


@pytest.fixture
def short_dir():
    """A short folder for ipc socket paths (the sun_path limit is ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tsqpt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tiny_model):
    with ServerProcess(str(tiny_model), start_timeout_s=START_TIMEOUT_S) as process:
        yield process


# -- logits over real sockets -------------------------------------------------------------------------


def test_logits_over_ipc(server, tiny_model, tiny_reference):
    assert server.endpoint.startswith("ipc://")
    assert_serves_correct_logits(server.endpoint, tiny_model, tiny_reference, n=41, alive=server.exit_reason)


def test_logits_over_tcp(tiny_model, tiny_reference):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=START_TIMEOUT_S) as server:
        assert server.command[2:4] == ["tsqp", "serve"]
        assert_serves_correct_logits(endpoint, tiny_model, tiny_reference, n=53, alive=server.exit_reason)
        # a second client on the same server, incremental this time
        ids = token_ids(20, seed=2)
        with Client(endpoint, timeout_s=30) as client:
            tee = tee_model(tiny_model, client.call)
            tee.attach()
            tee.ops.open_session(20)
            got = torch.cat([tee.forward(ids[:12]), tee.forward(ids[12:], pos=12)])
        torch.testing.assert_close(got, reference_logits(tiny_reference, ids), atol=ATOL, rtol=0)


def test_fingerprint_mismatch_is_refused(server, other_model):
    """A TEE whose folder holds another model (same config, other seed) refuses the server."""
    with Client(server.endpoint, timeout_s=30) as client:
        tee = tee_model(other_model, client.call)
        with pytest.raises(TsqpError, match="different model"):
            tee.attach()
        assert tee.ops.session is None


# -- hostile input ------------------------------------------------------------------------------------

_ids = itertools.count(1000)


def header(**fields) -> bytes:
    base = {"v": PROTOCOL_VERSION, "id": next(_ids), "method": "ping", "session": None, "args": {}, "tensors": []}
    base.update(fields)
    return msgpack.packb(base, use_bin_type=True)


def f32(*shape) -> bytes:
    return torch.zeros(shape, dtype=torch.float32).numpy().tobytes()


def malformed_requests() -> list[tuple[str, list[bytes], bool]]:
    """(name, frames, whether the header's id can be echoed)."""
    return [
        ("garbage header", [b"\xc1\xc1\xc1 not msgpack"], False),
        ("empty header", [b""], False),
        ("header is a list", [msgpack.packb([1, 2, 3])], False),
        ("wrong protocol version", [header(v=PROTOCOL_VERSION + 41)], True),
        ("no version", [msgpack.packb({"id": 5, "method": "ping", "tensors": []})], True),
        ("id is not an int", [header(id="seven")], False),
        ("declares a tensor, sends none", [header(method="lm_head", tensors=[["float32", [1, 32]]])], True),
        ("declares none, sends one", [header(method="lm_head"), f32(1, 32)], True),
        ("bad dtype name", [header(method="lm_head", tensors=[["int32", [1, 32]]]), b"\0" * 256], True),
        ("dtype not a string", [header(method="lm_head", tensors=[[7, [1, 32]]]), f32(1, 32)], True),
        ("shape/bytes mismatch", [header(method="lm_head", tensors=[["float32", [1, 32]]]), b"\0" * 127], True),
        ("negative dimension", [header(method="lm_head", tensors=[["float32", [-1, 32]]]), f32(1, 32)], True),
        ("too many dimensions", [header(method="lm_head", tensors=[["float32", [1, 1, 1, 1, 32]]]), f32(1, 32)], True),
        ("huge declared shape", [header(method="lm_head", tensors=[["float32", [2**31, 2**31, 2**31]]]), f32(1)], True),
        ("too many tensors", [header(method="matmul", tensors=[["float32", [1]]] * 9)] + [f32(1)] * 9, True),
        ("unknown method", [header(method="frobnicate")], True),
        ("method not a string", [header(method=["qkv"])], True),
        ("wrong tensor count: lm_head with none", [header(method="lm_head")], True),
        (
            "wrong tensor count: ping with one",
            [header(method="ping", tensors=[["float32", [1, 32]]]), f32(1, 32)],
            True,
        ),
        (
            "wrong tensor count: matmul with one",
            [header(method="matmul", tensors=[["float32", [2, 2]]]), f32(2, 2)],
            True,
        ),
        ("args not a map", [header(args=[1, 2])], True),
        (
            "session not bytes",
            [header(method="qkv", session=12, args={"layer": 0, "pos": 0}, tensors=[["float32", [1, 32]]]), f32(1, 32)],
            True,
        ),
        (
            "session method without a session",
            [header(method="qkv", args={"layer": 0, "pos": 0}, tensors=[["float32", [1, 32]]]), f32(1, 32)],
            True,
        ),
        (
            "unknown session",
            [
                header(method="gate_up", session=b"x" * 16, args={"layer": 0}, tensors=[["float32", [1, 32]]]),
                f32(1, 32),
            ],
            True,
        ),
        ("close someone else's session", [header(method="close_session", session=b"y" * 16)], True),
        ("wrong activation width", [header(method="lm_head", tensors=[["float32", [3, 7]]]), f32(3, 7)], True),
        ("int64 activation", [header(method="lm_head", tensors=[["int64", [1, 32]]]), b"\0" * 256], True),
        ("float token ids", [header(method="embedding", tensors=[["float32", [2]]]), f32(2)], True),
        (
            "token id out of range",
            [header(method="embedding", tensors=[["int64", [1]]]), torch.tensor([10**6]).numpy().tobytes()],
            True,
        ),
        ("capacity beyond max_position_embeddings", [header(method="open_session", args={"capacity": 10**9})], True),
        ("capacity not an int", [header(method="open_session", args={"capacity": "lots"})], True),
        (
            "linear: unknown weight",
            [header(method="linear", args={"layer": 0, "name": "secret"}, tensors=[["float32", [1, 32]]]), f32(1, 32)],
            True,
        ),
        (
            "linear: layer out of range",
            [header(method="linear", args={"layer": 99, "name": "q_proj"}, tensors=[["float32", [1, 32]]]), f32(1, 32)],
            True,
        ),
        (
            "batch_linear: too many names",
            [
                header(
                    method="batch_linear", args={"layer": 0, "names": ["q_proj"] * 50}, tensors=[["float32", [1, 32]]]
                ),
                f32(1, 32),
            ],
            True,
        ),
        (
            "matmul: shapes do not chain",
            [header(method="matmul", tensors=[["float32", [2, 3]], ["float32", [4, 5]]]), f32(2, 3), f32(4, 5)],
            True,
        ),
        ("header over 64 KiB", [msgpack.packb({"v": PROTOCOL_VERSION, "id": 3, "pad": "x" * 70_000})], False),
    ]


def raw_request(sock: zmq.Socket, frames: list[bytes]):
    sock.send_multipart(frames)
    assert sock.poll(REPLY_TIMEOUT_MS), "no reply to a malformed request"
    return unpack(sock.recv_multipart())


def test_malformed_requests_get_error_replies(server, tiny_model, tiny_reference):
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        failures = []
        for name, frames, echoes_id in malformed_requests():
            reply = raw_request(sock, frames)
            sent_id = msgpack.unpackb(frames[0])["id"] if echoes_id else 0
            if reply.header.get("ok") is not False or not isinstance(reply.header.get("error"), str):
                failures.append(f"{name}: reply {reply.header}")
            elif reply.header.get("id") != sent_id:
                failures.append(f"{name}: reply id {reply.header.get('id')} != {sent_id}")
        assert not failures, "\n".join(failures)
        # the same raw connection still gets a correct answer
        reply = raw_request(sock, [header(method="ping", id=77)])
        assert reply.header["ok"] is True and reply.header["id"] == 77
    finally:
        sock.close()
    assert server.exit_reason() is None
    assert_serves_correct_logits(server.endpoint, tiny_model, tiny_reference, alive=server.exit_reason)


@pytest.mark.parametrize(
    "name,frames", [pytest.param(name, frames, id=name.replace(" ", "-")) for name, frames, _ in malformed_requests()]
)
def test_malformed_request_is_validated(server, name, frames):
    """Each malformed request is refused by validation (a specific message), not by the catch-all."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        reply = raw_request(sock, frames)
    finally:
        sock.close()
    assert reply.header["ok"] is False
    assert "internal error" not in reply.header["error"], reply.header["error"]


BUDGET_MB = 640
SMALL_MAX_MESSAGE = (BUDGET_MB << 20) // 64  # `tsqp serve --max-memory-mb 640` takes message parts of 10 MiB at most


def test_oversized_message_drops_only_that_peer(tiny_model, tiny_reference, short_dir):
    endpoint = f"ipc://{short_dir}/big.sock"
    server = ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=START_TIMEOUT_S)
    server.command += ["--max-memory-mb", str(BUDGET_MB)]  # the budget bounds ZMQ_MAXMSGSIZE (budget.py)
    with server:
        rows = SMALL_MAX_MESSAGE // (32 * 4) + 1024  # just over 10 MiB of float32 activations
        with Client(endpoint, timeout_s=30) as client:
            client.call("ping")
            start = time.monotonic()
            with pytest.raises(ConnectionLost, match="closed the connection"):
                client.call("lm_head", tensors=[torch.zeros(rows, 32)])
            assert time.monotonic() - start < 10
        # raw: the oversized message gets no reply (the peer is dropped), and the server lives on
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        try:
            sock.send_multipart(pack({"id": 1, "method": "lm_head", "args": {}}, [torch.zeros(rows, 32)]))
            assert not sock.poll(1000)
        finally:
            sock.close()
        assert server.exit_reason() is None
        assert_serves_correct_logits(endpoint, tiny_model, tiny_reference, alive=server.exit_reason)


# -- a server that dies -------------------------------------------------------------------------------


def run_until_killed(
    tee: TeeModel, process, ids: torch.Tensor, kill_after_s: float = 0.3
) -> tuple[BaseException, float]:
    """Runs forward passes in a loop while the server is SIGKILLed; returns (the error, seconds from the
    kill to the error). Fails, rather than hangs, when no error comes within 30 s."""
    outcome: dict = {}

    def loop():
        try:
            while True:
                tee.ops.open_session(ids.shape[0])
                tee.forward(ids)
                tee.ops.close_session()
                outcome["passes"] = outcome.get("passes", 0) + 1
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"], outcome["at"] = exc, time.monotonic()

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    time.sleep(kill_after_s)
    killed_at = time.monotonic()
    process.send_signal(signal.SIGKILL)
    worker.join(timeout=30)
    assert not worker.is_alive(), "the client hung after the server was killed"
    assert outcome.get("passes", 0) >= 1, f"no forward pass completed before the kill: {outcome.get('error')!r}"
    return outcome["error"], outcome["at"] - killed_at


@pytest.mark.parametrize("transport,use_alive", [("ipc", True), ("ipc", False), ("tcp", False)])
def test_server_killed_mid_run(tiny_model, short_dir, transport, use_alive):
    endpoint = f"ipc://{short_dir}/k.sock" if transport == "ipc" else f"tcp://127.0.0.1:{free_port()}"
    with ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=START_TIMEOUT_S) as server:
        with Client(endpoint, timeout_s=60, alive=server.exit_reason if use_alive else None) as client:
            tee = tee_model(tiny_model, client.call)
            tee.attach()
            error, seconds = run_until_killed(tee, server.process, token_ids(40))
        assert server.process.wait(timeout=10) == -signal.SIGKILL
    assert isinstance(error, ConnectionLost), f"{type(error).__name__}: {error}"
    assert seconds < 15, f"ConnectionLost came {seconds:.1f} s after the kill"
    # either the disconnect monitor or, with alive=, the exit-code check may report it first
    assert "closed the connection" in str(error) or "exit code -9" in str(error), str(error)


def test_server_dead_before_first_call(tiny_model, short_dir):
    """Killed before the client ever connected (its socket file left behind): with alive= the client
    reports the exit code at once; without it, the reply deadline bounds the wait."""
    path = short_dir / "d.sock"
    endpoint = f"ipc://{path}"
    server = ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=START_TIMEOUT_S).__enter__()
    try:
        assert kill_process(server.process) == -signal.SIGKILL
        assert path.exists()
        start = time.monotonic()
        with Client(endpoint, timeout_s=60, alive=server.exit_reason) as client:
            with pytest.raises(ConnectionLost, match="exit code -9"):
                client.call("init")
        assert time.monotonic() - start < 5
        start = time.monotonic()
        with Client(endpoint, timeout_s=2) as client:
            with pytest.raises(ConnectionLost, match="did not answer init within 2 s"):
                client.call("init")
        assert time.monotonic() - start < 5
    finally:
        server.stop()


# -- signals and socket files -------------------------------------------------------------------------


def test_sigterm_exits_zero_and_removes_socket(tiny_model, short_dir):
    path = short_dir / "t.sock"
    server = ServerProcess(str(tiny_model), endpoint=f"ipc://{path}", start_timeout_s=START_TIMEOUT_S)
    with server:
        assert path.exists()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0
        assert not path.exists(), "the server left its socket file behind"


def test_stale_regular_file_does_not_block(tiny_model, tiny_reference, short_dir):
    path = short_dir / "s.sock"
    path.write_text("left over by something else")
    with ServerProcess(str(tiny_model), endpoint=f"ipc://{path}", start_timeout_s=START_TIMEOUT_S) as server:
        assert path.is_socket()
        assert_serves_correct_logits(server.endpoint, tiny_model, tiny_reference, alive=server.exit_reason)


def test_socket_of_killed_server_does_not_block(tiny_model, tiny_reference, short_dir):
    path = short_dir / "s.sock"
    endpoint = f"ipc://{path}"
    first = ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=START_TIMEOUT_S).__enter__()
    try:
        assert kill_process(first.process) == -signal.SIGKILL
        assert path.is_socket(), "a SIGKILLed server cannot remove its socket file"
    finally:
        first.process = None  # keep stop() from removing the stale file: the next server must cope
    with ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=START_TIMEOUT_S) as server:
        assert_serves_correct_logits(endpoint, tiny_model, tiny_reference, alive=server.exit_reason)


def test_second_server_on_live_ipc_path_fails(tiny_model, tiny_reference, short_dir):
    path = short_dir / "l.sock"
    endpoint = f"ipc://{path}"
    with ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=START_TIMEOUT_S) as server:
        result = run_tsqp("serve", "--model", tiny_model, "--listen", endpoint, timeout=60)
        assert_one_line_error(result, "already listening", endpoint)
        assert path.is_socket(), "the refused server removed the live server's socket file"
        assert server.exit_reason() is None
        assert_serves_correct_logits(endpoint, tiny_model, tiny_reference, alive=server.exit_reason)


def test_second_server_on_busy_tcp_port_fails(tiny_model, tiny_reference):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=START_TIMEOUT_S) as server:
        result = run_tsqp("serve", "--model", tiny_model, "--listen", endpoint, timeout=60)
        assert_one_line_error(result, endpoint)
        assert_serves_correct_logits(endpoint, tiny_model, tiny_reference, alive=server.exit_reason)
