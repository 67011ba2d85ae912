"""Endpoints and sockets: the one place that makes ZeroMQ sockets, and the TEE side's RPC client.

The client is a DEALER socket (not REQ: a lost reply cannot lock it up, and a restarted server is
reconnected to by ZeroMQ itself). Each request carries an id; replies with another id are stale and
dropped. A call fails with a one-line error when the server disconnects, dies, or misses its deadline.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from tsqp.errors import ConnectionLost, ServerError
from tsqp.protocol import MAX_MESSAGE_BYTES, Message, pack, unpack
from tsqp.stats import Stats

POLL_MS = 100
PROBE_TIMEOUT_S = 0.5


def default_endpoint() -> str:
    """The seed's variables first, then a per-user ipc path."""
    if os.environ.get("LLAMA_GPU_ENDPOINT"):
        return os.environ["LLAMA_GPU_ENDPOINT"]
    if os.environ.get("LLAMA_IPC_PATH"):
        return "ipc://" + os.environ["LLAMA_IPC_PATH"]
    if os.environ.get("LLAMA_GPU_PORT"):
        return f"tcp://127.0.0.1:{os.environ['LLAMA_GPU_PORT']}"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return f"ipc://{runtime}/tsqp-{os.getuid()}.sock"


def private_endpoint() -> str:
    """A fresh ipc endpoint for a server the client starts itself."""
    folder = tempfile.mkdtemp(prefix="tsqp-")
    return f"ipc://{folder}/server.sock"


def ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


def check_endpoint(endpoint: str) -> None:
    if not endpoint.startswith(("ipc://", "tcp://")):
        raise ConnectionLost(f"endpoint {endpoint!r} is neither ipc://PATH nor tcp://HOST:PORT")


def make_socket(context: zmq.Context, kind: int, max_message_bytes: int = MAX_MESSAGE_BYTES) -> zmq.Socket:
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    return sock


def bind_server(context: zmq.Context, endpoint: str) -> zmq.Socket:
    """A ROUTER bound to endpoint. A stale ipc socket file is removed; a live server is an error."""
    check_endpoint(endpoint)
    path = ipc_path(endpoint)
    if path is not None and path.exists():
        if _answers(context, endpoint):
            raise ConnectionLost(f"a server is already listening on {endpoint}; stop it or pass another --listen")
        path.unlink()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    sock = make_socket(context, zmq.ROUTER)
    try:
        sock.bind(endpoint.replace("tcp://*", "tcp://0.0.0.0"))
    except zmq.ZMQError as exc:
        sock.close()
        raise ConnectionLost(f"cannot listen on {endpoint}: {exc}") from None
    return sock


def _answers(context: zmq.Context, endpoint: str) -> bool:
    try:
        with Client(endpoint, context=context, timeout_s=PROBE_TIMEOUT_S) as probe:
            probe.call("ping")
        return True
    except ConnectionLost:
        return False


class Client:
    """Sends requests to one server and waits for the matching reply, with a deadline."""

    def __init__(self, endpoint: str, *, context: zmq.Context | None = None, timeout_s: float = 600.0,
                 stats: Stats | None = None, alive: Callable[[], str | None] | None = None):
        check_endpoint(endpoint)
        path = ipc_path(endpoint)
        if path is not None and not path.exists():
            raise ConnectionLost(f"no server at {endpoint} (the socket file does not exist): start `tsqp serve` first")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.stats = stats or Stats()
        self.alive = alive  # returns a reason when the server is known to be gone (a child process that exited)
        self.context = context or zmq.Context.instance()
        self.sock = make_socket(self.context, zmq.DEALER)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.connected = False
        self.sock.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.ids = itertools.count(1)

    def call(self, method: str, args: dict | None = None, tensors: list[torch.Tensor] = (),
             session: bytes | None = None, timeout_s: float | None = None) -> Message:
        start = time.perf_counter()
        request_id = next(self.ids)
        frames = pack({"id": request_id, "method": method, "session": session, "args": args or {}}, list(tensors))
        packed = time.perf_counter()
        self.sock.send_multipart(frames, copy=False)
        sent = sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)
        reply, received_bytes, received = self._wait(request_id, method, timeout_s or self.timeout_s)
        done = time.perf_counter()
        self.stats.rpc(method, sent=sent, received=received_bytes,
                       total_s=done - start, serialize_s=packed - start, deserialize_s=done - received,
                       server_s=float(reply.args.get("compute_s", 0.0)) if isinstance(reply.args, dict) else 0.0)
        if not reply.header.get("ok"):
            raise ServerError(f"server refused {method}: {reply.header.get('error', 'no reason given')}")
        return reply

    def _wait(self, request_id: int, method: str, timeout_s: float) -> tuple[Message, int, float]:
        """(reply, bytes received, time it arrived); replies to earlier requests are dropped."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionLost(f"server at {self.endpoint} did not answer {method} within {timeout_s:.0f} s")
            events = dict(self.poller.poll(min(POLL_MS, remaining * 1000)))
            if self.monitor in events:
                event = recv_monitor_message(self.monitor)["event"]
                if event == zmq.EVENT_CONNECTED:
                    self.connected = True
                elif event == zmq.EVENT_DISCONNECTED and self.connected:
                    raise ConnectionLost(f"server at {self.endpoint} closed the connection during {method}")
            if self.sock in events:
                frames = self.sock.recv_multipart(copy=False)
                arrived = time.perf_counter()
                reply = unpack(frames)
                if reply.header.get("id") == request_id:
                    return reply, sum(f.buffer.nbytes for f in frames), arrived
            if self.alive is not None and (reason := self.alive()):
                raise ConnectionLost(f"server stopped during {method}: {reason}")

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close()
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
