"""--connect-timeout: nothing listening at an endpoint fails in seconds, a busy server still gets --timeout.

The CLI cases run `python -m tsqp` against a tcp port and ipc socket files where nothing listens; the
transport cases use a bare ROUTER in a thread that answers each request after a set delay.
"""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from conftest import assert_one_line_error, free_port, run_tsqp

from tsqp.errors import ConnectionLost
from tsqp.wire.client import Client
from tsqp.wire.protocol import pack
from tsqp.wire.transport import make_socket

CONNECT_TIMEOUT = "2"
BOUND_S = 30  # wall clock of one failing command, interpreter start and imports included


@pytest.fixture
def short_dir():
    """A short folder for ipc socket paths (the sun_path limit is ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tsqpc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def stale_socket_file(folder: Path) -> Path:
    """An ipc socket file that nothing listens on (left behind by a process that is gone)."""
    path = folder / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    assert path.exists()
    return path


def assert_fails_fast(*args, fragments: tuple[str, ...]) -> str:
    start = time.monotonic()
    result = run_tsqp(*args, timeout=90)
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    line = assert_one_line_error(result, *fragments)
    assert elapsed < BOUND_S, f"took {elapsed:.1f} s: {line}"
    return line


# -- the CLI against endpoints where nothing listens ---------------------------------------------------


def test_bench_tcp_nothing_listening(tiny_model):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    assert_fails_fast(
        "bench",
        "--model",
        tiny_model,
        "--tokens",
        "4",
        "--connect",
        endpoint,
        "--connect-timeout",
        CONNECT_TIMEOUT,
        fragments=(f"nothing answers at {endpoint}", "within 2 s", "tsqp serve"),
    )


@pytest.mark.parametrize("transport", ["zmq", "shm"])
def test_generate_tcp_nothing_listening(tiny_model, transport):
    """zmq sends init first, shm attaches the arena first: either first call is bounded."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    assert_fails_fast(
        "generate",
        "--model",
        tiny_model,
        "--token-ids",
        "1,2",
        "--connect",
        endpoint,
        "--transport",
        transport,
        "--connect-timeout",
        CONNECT_TIMEOUT,
        fragments=(f"nothing answers at {endpoint}", "within 2 s"),
    )


def test_ipc_socket_file_missing(tiny_model, short_dir):
    endpoint = f"ipc://{short_dir}/missing.sock"
    assert_fails_fast(
        "bench", "--model", tiny_model, "--tokens", "4", "--connect", endpoint, fragments=(endpoint, "does not exist")
    )


def test_ipc_socket_file_with_nothing_listening(tiny_model, short_dir):
    endpoint = f"ipc://{stale_socket_file(short_dir)}"
    assert_fails_fast(
        "generate",
        "--model",
        tiny_model,
        "--token-ids",
        "1,2",
        "--connect",
        endpoint,
        "--connect-timeout",
        CONNECT_TIMEOUT,
        fragments=(f"nothing answers at {endpoint}", "within 2 s"),
    )


def test_helper_with_nothing_listening(tiny_model, short_dir):
    """private_options pings the helper before any server starts: that ping is bounded too."""
    endpoint = f"ipc://{stale_socket_file(short_dir)}"
    assert_fails_fast(
        "generate",
        "--model",
        tiny_model,
        "--token-ids",
        "1,2",
        "--helper",
        endpoint,
        "--connect-timeout",
        CONNECT_TIMEOUT,
        fragments=(f"nothing answers at {endpoint}", "within 2 s"),
    )


def test_timeout_below_connect_timeout_bounds_the_first_call(tiny_model):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    assert_fails_fast(
        "generate",
        "--model",
        tiny_model,
        "--token-ids",
        "1,2",
        "--connect",
        endpoint,
        "--timeout",
        "1",
        fragments=(f"nothing answers at {endpoint}", "within 1 s"),
    )


# -- the transport: reaching the server, then the per-request timeout ----------------------------------


class SlowServer:
    """A ROUTER that answers each request ok after the next delay in seconds (None: never)."""

    def __init__(self, endpoint: str, delays: list[float | None]):
        self.context = zmq.Context()
        self.sock = make_socket(self.context, zmq.ROUTER)
        self.sock.bind(endpoint)
        self.delays = list(delays)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for delay in self.delays:
            while not self.sock.poll(20):
                if self.stop.is_set():
                    return
            peer, header, *_ = self.sock.recv_multipart()
            if delay is None or self.stop.wait(delay):
                continue
            self.sock.send_multipart([peer, *pack({"id": msgpack.unpackb(header)["id"], "ok": True})])

    def __enter__(self) -> SlowServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()
        self.context.term()


def test_busy_server_is_not_cut_off_by_the_connect_timeout():
    """The first reply and a later one each come after 3x the connect timeout, well within timeout_s."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with SlowServer(endpoint, [1.5, 1.5]), Client(endpoint, timeout_s=30, connect_timeout_s=0.5) as client:
        for method in ("ping", "init"):
            start = time.monotonic()
            assert client.call(method).header["ok"] is True
            assert time.monotonic() - start >= 1.4


def test_connected_server_gets_the_request_timeout():
    """Once the server took the connection, a missing reply is the per-request timeout's, not 'nothing answers'."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with SlowServer(endpoint, [None]), Client(endpoint, timeout_s=1.5, connect_timeout_s=0.3) as client:
        start = time.monotonic()
        with pytest.raises(ConnectionLost, match="did not answer ping within 1.5 s"):
            client.call("ping")
        assert time.monotonic() - start >= 1.4


def test_client_with_nothing_listening():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Client(endpoint, timeout_s=600, connect_timeout_s=0.5) as client:
        start = time.monotonic()
        message = f"nothing answers at {endpoint} (it did not answer ping within 0.5 s)"
        with pytest.raises(ConnectionLost, match=re.escape(message)):
            client.call("ping")
        assert time.monotonic() - start < 3
