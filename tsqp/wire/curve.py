"""CurveZMQ keys: an authenticated, encrypted link between the TEE client and the GPU server.

`tsqp keys DIR` writes (zmq.auth.create_certificates, Z85 text files):

    DIR/server.key          the server's public key            the client host needs it
    DIR/server.key_secret   the server's key pair              the server host only
    DIR/client.key          the client's public key
    DIR/client.key_secret   the client's key pair              the client host only
    DIR/allowed/*.key       client public keys the server admits (starts with a copy of client.key)

`--curve-keys DIR` makes the server a CURVE server whose ZAP handler (a ThreadAuthenticator on the
server's ZeroMQ context) admits only the public keys in DIR/allowed, and makes the client use
DIR/client.key_secret and expect DIR/server.key. The link is meant for tcp:// (the TEE in an enclave
must use tcp); it works on ipc:// too. Arena traffic (--transport shm) does not cross it.

Two settings make the allow-list hold: the server socket names a ZAP domain (libzmq does not ask the
handler for an empty domain, which would admit every key) and enforces it (no handler: no entry).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from tsqp.errors import TsqpError

ZAP_DOMAIN = "tsqp"
ALLOWED_DIR = "allowed"


@dataclass(frozen=True)
class CurveKeys:
    public: bytes  # Z85, 40 bytes
    secret: bytes
    server_public: bytes | None = None  # client side: the only server it talks to
    allowed: Path | None = None  # server side: folder of admitted client public keys (*.key)

    @property
    def is_server(self) -> bool:
        return self.allowed is not None


def generate(folder: str | Path) -> list[Path]:
    """Writes a server and a client key pair and an allow-list holding the client; returns the files."""
    folder = Path(folder)
    if (folder / "server.key_secret").exists() or (folder / "client.key_secret").exists():
        raise TsqpError(f"{folder} already holds CURVE keys: remove them or choose another folder")
    allowed = folder / ALLOWED_DIR
    allowed.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(folder, "server")
    client_public, _ = zmq.auth.create_certificates(folder, "client")
    shutil.copy(client_public, allowed / "client.key")
    for secret in ("server.key_secret", "client.key_secret"):
        (folder / secret).chmod(0o600)
    return sorted(p for p in folder.rglob("*") if p.is_file())


def server_keys(folder: str | Path) -> CurveKeys:
    """The server's key pair and its allow-list folder."""
    folder = _existing(folder)
    public, secret = _load(folder / "server.key_secret", secret=True)
    allowed = folder / ALLOWED_DIR
    if not allowed.is_dir() or not any(allowed.glob("*.key")):
        raise TsqpError(f"{allowed} holds no client public keys (*.key): copy the allowed clients' .key files there")
    return CurveKeys(public, secret, allowed=allowed)


def client_keys(folder: str | Path) -> CurveKeys:
    """The client's key pair and the server's public key."""
    folder = _existing(folder)
    public, secret = _load(folder / "client.key_secret", secret=True)
    server_public, _ = _load(folder / "server.key", secret=False)
    return CurveKeys(public, secret, server_public=server_public)


def apply_curve(sock: zmq.Socket, keys: CurveKeys) -> None:
    """CURVE options on a socket before it binds (server) or connects (client)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    if keys.is_server:
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    else:
        sock.curve_serverkey = keys.server_public


def start_authenticator(context: zmq.Context, keys: CurveKeys) -> ThreadAuthenticator:
    """The ZAP handler of a context (one per context): admits the public keys in keys.allowed."""
    authenticator = ThreadAuthenticator(context)
    try:
        authenticator.start()
    except zmq.ZMQError as exc:
        raise TsqpError(f"cannot start the CURVE authenticator: {exc} (one CURVE server per ZeroMQ context)") from None
    authenticator.configure_curve(domain=ZAP_DOMAIN, location=str(keys.allowed))
    return authenticator


def _existing(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise TsqpError(f"no CURVE key folder at {folder}: create one with `tsqp keys {folder}`")
    return folder


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise TsqpError(f"CURVE key file {path} is missing: create keys with `tsqp keys {path.parent}`")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise TsqpError(f"CURVE key file {path} is unreadable: {exc}") from None
    if secret and not secret_key:
        raise TsqpError(f"CURVE key file {path} holds no secret key")
    return public, secret_key
