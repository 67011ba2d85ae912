"""CurveZMQ: `tsqp keys`, a `--curve-keys` server that admits only allow-listed clients, and an encrypted link.

The main server is a real `tsqp serve --curve-keys DIR` subprocess on tcp. A TCP relay between client
and server records the bytes on the wire to show that headers (method names, the model fingerprint)
are readable on a plain link and not on a CURVE one.
"""

from __future__ import annotations

import select
import socket
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from conftest import assert_one_line_error, free_port, reference_logits, run_tsqp, split_logits, token_ids

from tsqp.errors import LinkRefused
from tsqp.model.checkpoint import Checkpoint
from tsqp.server.engine import Engine
from tsqp.server.loop import Server
from tsqp.tee.launcher import ServerProcess
from tsqp.wire.client import Client
from tsqp.wire.curve import CurveKeys, client_keys, generate, server_keys

ATOL = 1e-4
REFUSAL_S = 3.0  # a refused client must hear so well before any reply deadline


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("curve") / "keys"
    result = run_tsqp("keys", folder)
    assert result.returncode == 0, result.stderr
    assert "server.key_secret" in result.stdout
    return folder


@pytest.fixture(scope="module")
def stranger(tmp_path_factory) -> Path:
    """Keys of another deployment: its client is in no allow-list of ours."""
    folder = tmp_path_factory.mktemp("curve") / "stranger"
    generate(folder)
    return folder


@pytest.fixture(scope="module")
def curve_server(tiny_model, keys):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=60, curve_keys=keys) as server:
        assert server.command[-2:] == ["--curve-keys", str(keys)]
        yield server


@contextmanager
def thread_server(model_dir: Path, endpoint: str, curve: CurveKeys | None = None):
    """An in-process Server on its own context, served from a thread."""
    context = zmq.Context()
    server = Server(Engine(str(model_dir)), endpoint, context=context, curve=curve)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            if server.sock.poll(20):
                server.serve_one()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(timeout=10)
        server.close()
        context.term()


class Relay:
    """A TCP relay to 127.0.0.1:port that keeps a copy of every byte it forwards, both ways."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.captured = bytearray()
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                downstream, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by close() while waiting
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(downstream, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        while not self.stop.is_set():
            readable, _, _ = select.select(list(peers), [], [], 0.1)
            for sock in readable:
                data = sock.recv(1 << 16)
                if not data:
                    a.close()
                    b.close()
                    return
                self.captured += data
                peers[sock].sendall(data)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


# -- keys ---------------------------------------------------------------------------------------------


def test_keys_layout(keys):
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret", "allowed/client.key"):
        assert (keys / name).is_file(), name
    for secret in ("server.key_secret", "client.key_secret"):
        assert stat.S_IMODE((keys / secret).stat().st_mode) == 0o600
    assert (keys / "allowed/client.key").read_text() == (keys / "client.key").read_text()
    server, client = server_keys(keys), client_keys(keys)
    assert client.server_public == server.public and server.allowed == keys / "allowed"
    assert_one_line_error(run_tsqp("keys", keys), "already holds CURVE keys")


def test_missing_keys_are_one_line_errors(tiny_model, keys, tmp_path):
    missing = tmp_path / "nowhere"
    assert_one_line_error(
        run_tsqp(
            "logits", "--model", tiny_model, "--token-ids", "1,2", "--out", tmp_path / "x.npy", "--curve-keys", missing
        ),
        "no CURVE key folder",
        "tsqp keys",
    )
    server_only = tmp_path / "server-only"
    server_only.mkdir()
    for name in ("server.key", "server.key_secret"):
        (server_only / name).write_bytes((keys / name).read_bytes())
    assert_one_line_error(
        run_tsqp(
            "serve", "--model", tiny_model, "--listen", f"tcp://127.0.0.1:{free_port()}", "--curve-keys", server_only
        ),
        "holds no client public keys",
    )
    assert_one_line_error(
        run_tsqp(
            "logits",
            "--model",
            tiny_model,
            "--token-ids",
            "1,2",
            "--out",
            tmp_path / "x.npy",
            "--connect",
            "tcp://127.0.0.1:1",
            "--curve-keys",
            server_only,
        ),
        "client.key_secret is missing",
    )
    (server_only / "client.key_secret").write_text("not a key")
    assert_one_line_error(
        run_tsqp(
            "logits",
            "--model",
            tiny_model,
            "--token-ids",
            "1,2",
            "--out",
            tmp_path / "x.npy",
            "--connect",
            "tcp://127.0.0.1:1",
            "--curve-keys",
            server_only,
        ),
        "client.key_secret",
    )


# -- the CURVE server ---------------------------------------------------------------------------------


def test_allowed_client_gets_correct_logits(curve_server, keys, tiny_model, tiny_reference):
    ids = token_ids(31)
    with Client(curve_server.endpoint, timeout_s=30, curve=client_keys(keys)) as client:
        got = split_logits(tiny_model, client.call, ids)
    torch.testing.assert_close(got, reference_logits(tiny_reference, ids), atol=ATOL, rtol=0)


def test_cli_client_flag(curve_server, keys, tiny_model, tiny_reference, tmp_path):
    ids = token_ids(9)
    out = tmp_path / "logits.npy"
    result = run_tsqp(
        "logits",
        "--model",
        tiny_model,
        "--token-ids",
        ",".join(map(str, ids.tolist())),
        "--out",
        out,
        "--connect",
        curve_server.endpoint,
        "--curve-keys",
        keys,
        "--transport",
        "zmq",
    )
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.from_numpy(np.load(out)), reference_logits(tiny_reference, ids), atol=ATOL, rtol=0)


def test_private_server_runs_curve_too(keys, tiny_model, tiny_reference, tmp_path):
    ids = token_ids(7)
    out = tmp_path / "logits.npy"
    result = run_tsqp(
        "logits",
        "--model",
        tiny_model,
        "--token-ids",
        ",".join(map(str, ids.tolist())),
        "--out",
        out,
        "--curve-keys",
        keys,
    )
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.from_numpy(np.load(out)), reference_logits(tiny_reference, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("who", ["stranger", "plain", "wrong-server-key"])
def test_refused_clients_fail_fast_and_server_keeps_serving(curve_server, keys, stranger, who):
    ours, theirs = client_keys(keys), client_keys(stranger)
    curve, match = {
        "stranger": (
            CurveKeys(theirs.public, theirs.secret, server_public=ours.server_public),
            "refused this client's CURVE key",
        ),
        "plain": (None, "may require CURVE"),
        "wrong-server-key": (
            CurveKeys(ours.public, ours.secret, server_public=theirs.server_public),
            "is server.key its public key",
        ),
    }[who]
    with Client(curve_server.endpoint, timeout_s=60, curve=curve) as client:
        for method in ("init", "ping"):  # the first call and a later one both fail, and quickly
            start = time.monotonic()
            with pytest.raises(LinkRefused, match=match):
                client.call(method)
            assert time.monotonic() - start < REFUSAL_S
    with Client(curve_server.endpoint, timeout_s=30, curve=ours) as client:
        assert client.call("ping").header["ok"]


def test_curve_client_against_plain_server_is_refused(tiny_model, keys):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with thread_server(tiny_model, endpoint), Client(endpoint, timeout_s=60, curve=client_keys(keys)) as client:
        start = time.monotonic()
        with pytest.raises(LinkRefused, match="handshake"):
            client.call("init")
        assert time.monotonic() - start < REFUSAL_S


def test_link_is_encrypted(curve_server, keys, tiny_model):
    """On a plain link the headers are readable on the wire; on a CURVE link nothing of them is."""
    fingerprint = Checkpoint(tiny_model).fingerprint().encode()
    plaintext = [b"method", b"init", b"fingerprint", fingerprint, b"open_session"]

    def wire_bytes(endpoint: str, curve) -> bytes:
        relay = Relay(port_of(endpoint))
        try:
            with Client(f"tcp://127.0.0.1:{relay.port}", timeout_s=30, curve=curve) as client:
                split_logits(tiny_model, client.call, token_ids(5))
            return bytes(relay.captured)
        finally:
            relay.close()

    plain_endpoint = f"tcp://127.0.0.1:{free_port()}"
    with thread_server(tiny_model, plain_endpoint):
        plain = wire_bytes(plain_endpoint, None)
    assert all(word in plain for word in plaintext)  # the relay sees what it should
    encrypted = wire_bytes(curve_server.endpoint, client_keys(keys))
    assert len(encrypted) > 1000
    assert not any(word in encrypted for word in plaintext)


def test_in_process_curve_server(tiny_model, keys, stranger, tiny_reference):
    """The Server class with curve= (its own ZAP authenticator thread, stopped on close)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ids = token_ids(12)
    with thread_server(tiny_model, endpoint, curve=server_keys(keys)) as server:
        assert server.authenticator is not None and server.authenticator.is_alive()
        with Client(endpoint, timeout_s=30, curve=client_keys(keys)) as client:
            got = split_logits(tiny_model, client.call, ids)
        theirs, ours = client_keys(stranger), client_keys(keys)
        with Client(
            endpoint, timeout_s=30, curve=CurveKeys(theirs.public, theirs.secret, server_public=ours.server_public)
        ) as client:
            with pytest.raises(LinkRefused):
                client.call("ping")
    assert not server.authenticator.is_alive()
    torch.testing.assert_close(got, reference_logits(tiny_reference, ids), atol=ATOL, rtol=0)
