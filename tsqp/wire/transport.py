"""Endpoints and sockets: where a server listens, and the one place that makes ZeroMQ sockets.

Every message part is bounded by zmq.MAXMSGSIZE; a peer that sends a larger one is disconnected. The
TEE side's client over these sockets is client.Client.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import zmq

from tsqp import env
from tsqp.errors import ConnectionLost
from tsqp.wire.arena import SHM_DIR, shm_available
from tsqp.wire.curve import CurveKeys, apply_curve
from tsqp.wire.protocol import MAX_MESSAGE_BYTES

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
PROBE_TIMEOUT_S = 0.5


def endpoint_from_env() -> str | None:
    """The seed's variables, in its order: LLAMA_GPU_ENDPOINT, LLAMA_IPC_PATH, LLAMA_GPU_PORT."""
    if endpoint := env.read("LLAMA_GPU_ENDPOINT"):
        return endpoint
    if path := env.read("LLAMA_IPC_PATH"):
        return "ipc://" + path
    if (port := env.read("LLAMA_GPU_PORT")) is not None:
        return f"tcp://127.0.0.1:{port}"
    return None


def default_endpoint() -> str:
    """Where `tsqp serve` listens by default: the seed's variables, else a per-user ipc path."""
    if endpoint := endpoint_from_env():
        return endpoint
    runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return f"ipc://{runtime}/tsqp-{os.getuid()}.sock"


def private_endpoint() -> str:
    """A fresh ipc endpoint for a server the client starts itself."""
    folder = tempfile.mkdtemp(prefix="tsqp-")
    return f"ipc://{folder}/server.sock"


def ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://") :]) if endpoint.startswith("ipc://") else None


def check_endpoint(endpoint: str) -> None:
    if not endpoint.startswith(("ipc://", "tcp://")):
        raise ConnectionLost(f"endpoint {endpoint!r} is neither ipc://PATH nor tcp://HOST:PORT")


def use_shm(transport: str, endpoint: str) -> bool:
    """shm: bulk tensors through /dev/shm; only possible when client and server share a host."""
    local = endpoint.startswith("ipc://") or endpoint.split("://")[-1].split(":")[0] in LOCAL_HOSTS
    if transport == "shm" and not local:
        raise ConnectionLost(f"--transport shm needs a server on this host, not {endpoint}")
    if transport == "shm" and not shm_available():
        raise ConnectionLost(f"--transport shm needs a writable {SHM_DIR}")
    return transport == "shm" or (transport == "auto" and local and shm_available())


def make_socket(
    context: zmq.Context, kind: int, max_message_bytes: int = MAX_MESSAGE_BYTES, curve: CurveKeys | None = None
) -> zmq.Socket:
    """curve: CURVE keys (tsqp.wire.curve), server mode when they carry an allow-list."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    if curve is not None:
        apply_curve(sock, curve)
    return sock


def bind_server(
    context: zmq.Context, endpoint: str, curve: CurveKeys | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> zmq.Socket:
    """A ROUTER bound to endpoint. A stale ipc socket file is removed; a live server is an error.

    With curve (server keys), the context needs a running ZAP handler (curve.start_authenticator).
    max_message_bytes: the largest message part taken; a peer that sends a larger one is disconnected.
    """
    check_endpoint(endpoint)
    path = ipc_path(endpoint)
    if path is not None and path.exists():
        if _listening(path):
            raise ConnectionLost(f"a server is already listening on {endpoint}; stop it or pass another --listen")
        path.unlink()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    sock = make_socket(context, zmq.ROUTER, max_message_bytes, curve=curve)
    try:
        sock.bind(endpoint.replace("tcp://*", "tcp://0.0.0.0"))
    except zmq.ZMQError as exc:
        sock.close()
        raise ConnectionLost(f"cannot listen on {endpoint}: {exc}") from None
    return sock


def _listening(path: Path) -> bool:
    """Whether a process accepts connections on an ipc socket file. The kernel answers this, so a server
    busy with a long request (or one that needs CURVE keys) still counts as live; a file left by a
    killed process refuses the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT_S)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
