"""The GPU server: a ROUTER socket loop around `Engine`. Untrusted; it never sees the TEE's secrets.

Requests of different clients interleave at round-trip granularity (one request at a time, in arrival
order). Any malformed request gets an error reply and the loop keeps serving. SIGINT and SIGTERM end
the loop cleanly and remove the ipc socket file.
"""

from __future__ import annotations

import signal
import sys
import time

import msgpack
import zmq

from tsqp.engine import Engine
from tsqp.errors import TsqpError
from tsqp.protocol import PROTOCOL_VERSION, pack, parse_header, unpack
from tsqp.transport import bind_server, ipc_path

POLL_MS = 200


class Server:
    def __init__(self, engine: Engine, endpoint: str, context: zmq.Context | None = None):
        self.engine = engine
        self.endpoint = endpoint
        self.context = context or zmq.Context.instance()
        self.sock = bind_server(self.context, endpoint)
        self.stopping = False
        self.requests = 0

    def serve_forever(self) -> None:
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self.stopping:
                if self.sock.poll(POLL_MS):
                    self.serve_one()
                else:
                    self.engine.expire_idle()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def serve_one(self) -> None:
        frames = self.sock.recv_multipart(copy=False)
        if len(frames) < 2:
            return  # nothing to answer to: a ROUTER message always starts with the peer identity
        peer, body = frames[0].bytes, frames[1:]
        self.requests += 1
        request_id = _request_id(body[0])
        try:
            request = unpack(body)
            args, tensors = self.engine.handle(peer, request)
            reply = pack({"id": request_id, "ok": True, "args": args}, tensors)
        except TsqpError as exc:
            reply = pack({"id": request_id, "ok": False, "error": str(exc)})
        except Exception as exc:  # a bug or a hostile input we did not foresee: answer, keep serving
            reply = pack({"id": request_id, "ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"})
        self.sock.send_multipart([peer] + reply, copy=False)

    def close(self) -> None:
        self.sock.close()
        path = ipc_path(self.endpoint)
        if path is not None:
            path.unlink(missing_ok=True)


def _request_id(frame) -> int:
    """The id to echo, even from a header that fails validation (0 when it cannot be read)."""
    try:
        return parse_header(frame.bytes)["id"]
    except TsqpError:
        try:
            header = msgpack.unpackb(frame.bytes[:4096], raw=False)
            value = header.get("id") if isinstance(header, dict) else None
            return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63 else 0
        except Exception:
            return 0


def run_server(model_dir: str, endpoint: str, device: str, dtype: str, **engine_options) -> None:
    from rich.progress import Progress

    started = time.perf_counter()
    with Progress(transient=True, console=None) as progress:
        task = progress.add_task("loading weights", total=None)
        engine = Engine(model_dir, device=device, dtype=dtype,
                        progress=lambda done, total: progress.update(task, completed=done, total=total), **engine_options)
    server = Server(engine, endpoint)
    print(f"tsqp server: {model_dir} on {device} ({dtype}), loaded in {time.perf_counter() - started:.1f} s, "
          f"listening on {endpoint}, protocol v{PROTOCOL_VERSION}", file=sys.stderr, flush=True)
    server.serve_forever()
