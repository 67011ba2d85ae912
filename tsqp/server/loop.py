"""The GPU server: a ROUTER socket loop around `Engine`. Untrusted; it never sees the TEE's secrets.

Requests of different clients interleave at round-trip granularity (one request at a time, in arrival
order). Any malformed request gets an error reply and the loop keeps serving. SIGINT and SIGTERM end
the loop cleanly and remove the ipc socket file.

On a tensor-parallel server this loop runs on rank 0 only (the others follow it: parallel.py). A rank
lost is the one fault it does not survive: for FAILURE_LINGER_S every request, the one in flight and
those that come, is answered with the reason, then the server exits with it.
"""

from __future__ import annotations

import signal
import sys
import time
from contextlib import contextmanager

import msgpack
import torch
import zmq

from tsqp.errors import ProtocolError, TsqpError
from tsqp.model.config import LlamaConfig
from tsqp.server.engine import Engine
from tsqp.server.parallel import HEARTBEAT, RankFailure, Ranks, follow, follower_command, join, shards
from tsqp.tuning import keep_freed_memory
from tsqp.wire.arena import Arena, align
from tsqp.wire.curve import CurveKeys, start_authenticator
from tsqp.wire.doorbell import CONTROL_BYTES, SPIN_S, Doorbell, fits
from tsqp.wire.doorbell import supported as doorbell_supported
from tsqp.wire.protocol import (
    MAX_HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Message,
    pack,
    parse_header,
    unpack,
)
from tsqp.wire.transport import bind_server, ipc_path

POLL_MS = 200
DOORBELL_POLL_MS = 5  # with doorbells: how often they are looked at while the server sleeps on the socket
FAILURE_LINGER_S = 2.0  # after a rank is lost: its clients' next requests get the reason, not a closed socket


class Server:
    def __init__(
        self, engine: Engine, endpoint: str, context: zmq.Context | None = None, curve: CurveKeys | None = None
    ):
        """curve: server keys (tsqp.wire.curve.server_keys): only clients in the allow-list connect, encrypted."""
        self.engine = engine
        self.endpoint = endpoint
        self.context = context or zmq.Context.instance()
        self.authenticator = start_authenticator(self.context, curve) if curve is not None else None
        try:
            self.sock = bind_server(self.context, endpoint, curve)
        except BaseException:
            if self.authenticator is not None:
                self.authenticator.stop()
            raise
        self.stopping = False
        self.polling = False  # the doorbells' "server awake" flag, as last written
        self.spin_until = 0.0  # perf_counter until which the loop polls instead of sleeping
        self.requests = 0
        self.arenas: dict[bytes, Arena] = {}  # per client connection: its shared-memory arena
        self.doorbells: dict[bytes, Doorbell] = {}  # per client connection: its arena's control block
        self.failure: str | None = None  # a tensor-parallel rank was lost: every reply is this error now

    def serve_forever(self) -> None:
        """Serves requests from the socket and the doorbells. After a request from a client with a
        doorbell the loop polls for SPIN_S (its next small request is usually that close), then sleeps
        on the socket, looking at the doorbells every DOORBELL_POLL_MS."""
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self.stopping and self.failure is None:
                if self.serve_doorbells():
                    continue
                spinning = time.perf_counter() < self.spin_until
                self._awake(spinning)
                if not spinning and self.serve_doorbells():  # rung as the flag went down
                    continue
                if self.sock.poll(0 if spinning else (DOORBELL_POLL_MS if self.doorbells else POLL_MS)):
                    self.serve_one()
                elif not spinning:
                    self.idle()
            if self.failure is not None:
                self.refuse(FAILURE_LINGER_S)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()
        if self.failure is not None:
            raise RankFailure(self.failure)

    def idle(self) -> None:
        """Nothing to serve: idle sessions expire, followers get their heartbeat, a lost rank is noticed."""
        try:
            self.engine.tick()
        except RankFailure as exc:
            self.failure = str(exc)
        self.failure = self.failure or self.engine.ranks.lost()

    def refuse(self, seconds: float) -> None:
        """Answers every request for `seconds` with the failure (answer() does), by socket or doorbell."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stopping:
            if not self.serve_doorbells() and self.sock.poll(DOORBELL_POLL_MS):
                self.serve_one()

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def _awake(self, on: bool) -> None:
        if on != self.polling:
            self.polling = on
            for bell in self.doorbells.values():
                bell.awake(on)

    def _served(self, peer: bytes) -> None:
        if peer in self.doorbells:
            self.spin_until = time.perf_counter() + SPIN_S

    def serve_one(self) -> None:
        frames = self.sock.recv_multipart(copy=False)
        if len(frames) < 2:
            return  # nothing to answer to: a ROUTER message always starts with the peer identity
        peer, body = frames[0].bytes, frames[1:]
        # A client rings only with nothing in flight, so a request it rang came before this one.
        self.serve_doorbell(peer)
        reply = self.answer(peer, bytes(body[0].buffer[: MAX_HEADER_BYTES + 1]), body)
        self.sock.send_multipart([peer] + reply, copy=False)
        self._served(peer)

    def serve_doorbells(self) -> bool:
        served = False
        for peer in list(self.doorbells):
            served |= self.serve_doorbell(peer)
        return served

    def serve_doorbell(self, peer: bytes) -> bool:
        """Serves the request rung on a client's doorbell, if any. The reply goes back there while the
        client polls for it (and is all header), else by ZeroMQ."""
        bell = self.doorbells.get(peer)
        rung = bell.take() if bell is not None else None
        if rung is None:
            return False
        flag, header = rung
        reply = self.answer(peer, header, [header], rung=True)
        if self.doorbells.get(peer) is bell and len(reply) == 1 and fits(reply[0]) and bell.client_waiting():
            bell.answer(flag, reply[0])
        else:
            self.sock.send_multipart([peer] + reply, copy=False)
        self._served(peer)
        return True

    def answer(self, peer: bytes, raw_header: bytes, body: list, rung: bool = False) -> list:
        """The reply frames to one request: body is its frames (header first), raw_header its header
        bytes; rung: it came by the doorbell."""
        self.requests += 1
        arena = self.arenas.get(peer)
        try:
            header = parse_header(raw_header)
        except Exception as exc:  # ProtocolError, or anything a hostile header provokes
            error = str(exc) if isinstance(exc, TsqpError) else f"malformed header ({type(exc).__name__})"
            return pack({"id": _lenient_id(raw_header), "ok": False, "error": error})
        request_id = header["id"]
        if self.failure is not None:
            return pack({"id": request_id, "ok": False, "error": self.failure})
        try:
            request = unpack(body, arena, header=header)
            if request.header.get("method") == "attach_arena":
                if rung:  # it would unmap the doorbell it came by
                    raise ProtocolError("attach_arena must come by the socket, not the doorbell")
                args, tensors = self.attach_arena(peer, request.args), []
            else:
                slots = ReplySlots(arena, request) if arena and "reply_at" in request.args else None
                args, tensors = self.engine.handle(peer, request, slots)
                if slots is not None:
                    tensors = [slots.place(t) for t in tensors]
            return pack({"id": request_id, "ok": True, "args": args}, tensors, arena)
        except RankFailure as exc:  # the server cannot go on: this and every later request get the reason
            self.failure = str(exc)
            return pack({"id": request_id, "ok": False, "error": self.failure})
        except TsqpError as exc:
            return pack({"id": request_id, "ok": False, "error": str(exc)})
        except Exception as exc:  # a bug or a hostile input we did not foresee: answer, keep serving
            return pack({"id": request_id, "ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"})

    def attach_arena(self, peer: bytes, args: dict) -> dict:
        name, size = args.get("name"), args.get("size")
        if not isinstance(name, str) or not isinstance(size, int) or not 0 < size <= MAX_MESSAGE_BYTES * 2:
            raise ProtocolError("attach_arena needs a name and a size within bounds")
        # This peer's earlier arena, and the same file attached by an earlier connection (a client that
        # reconnected, a fixed --arena-name): two doorbells on one file would both take its requests.
        for other in [p for p, a in self.arenas.items() if p == peer or a.name == name]:
            self.doorbells.pop(other, None)
            self.arenas.pop(other).release()
        arena = self.arenas[peer] = Arena(name, size, create=False)
        if self.engine.device.type == "cuda":
            arena.pin()
        if args.get("doorbell") is not True or not doorbell_supported() or size < CONTROL_BYTES:
            return {}
        bell = self.doorbells[peer] = Doorbell(arena.map)
        bell.awake(self.polling)
        return {"doorbell": True}

    def close(self) -> None:
        for arena in self.arenas.values():
            arena.release()
        self.sock.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        path = ipc_path(self.endpoint)
        if path is not None:
            path.unlink(missing_ok=True)


class ReplySlots:
    """Hands out the arena slots for one request's results, from the client's reply_at offset on."""

    def __init__(self, arena: Arena, request: Message):
        reply_at = request.args["reply_at"]
        if not isinstance(reply_at, int) or isinstance(reply_at, bool):
            raise ProtocolError("a request through the arena needs an integer reply_at")
        inputs_end = max(
            (offset + t.nbytes for t in request.tensors if (offset := arena.offset_of(t)) is not None), default=0
        )
        if reply_at < inputs_end:
            raise ProtocolError(f"reply_at {reply_at} overlaps the request's inputs (which end at {inputs_end})")
        self.arena = arena
        self.cursor = reply_at

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        view = self.arena.view(dtype, shape, self.cursor)
        self.cursor += align(view.nbytes)
        return view

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        """A result not yet in the arena (computed on a GPU, or a small one) is copied to the next slot."""
        if self.arena.offset_of(tensor) is not None:
            return tensor
        return self(tuple(tensor.shape), tensor.dtype).copy_(tensor)


def _lenient_id(raw: bytes) -> int:
    """The id to echo from a header that failed validation: a lenient read of its first bytes, else 0."""
    try:
        header = msgpack.unpackb(raw[:4096], raw=False)
        value = header.get("id") if isinstance(header, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63 else 0
    except Exception:  # any hostile bytes
        return 0


@contextmanager
def loading_progress(label: str):
    """A progress callback (done, total): a live bar on a terminal, else a line per tenth after the first
    second (a private server's stderr is a pipe the client relays to the user)."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(label, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    shown, started = [-1], time.perf_counter()

    def report(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth > shown[0] and time.perf_counter() - started > 1.0:  # quiet for a model that loads at once
            shown[0] = tenth
            print(f"{label}: {10 * tenth}% of {total} tensors", file=sys.stderr, flush=True)

    yield report


def run_server(
    model_dir: str,
    endpoint: str,
    device: str,
    dtype: str,
    curve: CurveKeys | None = None,
    tensor_parallel: int = 1,
    **engine_options,
) -> None:
    """Loads the model and serves until SIGINT/SIGTERM. tensor_parallel > 1: this process is one rank of a
    tensor-parallel server (parallel.join: rank 0 of this host, which starts the others, or a torchrun
    worker); rank 0 serves, the others follow it."""
    started = time.perf_counter()
    ranks = Ranks(device=device)
    if tensor_parallel > 1:
        shards(LlamaConfig.from_model_dir(model_dir), tensor_parallel)  # an impossible split: before any rank
        private_only = engine_options.get("private_only", False)
        ranks = join(tensor_parallel, device, follower_command(model_dir, device, dtype, tensor_parallel, private_only))
    lost = False
    try:
        if not ranks.leader:
            follow(Engine(model_dir, device=str(ranks.device), dtype=dtype, ranks=ranks, **engine_options))
            return
        with loading_progress(f"tsqp server: loading {model_dir}") as progress:
            engine = Engine(model_dir, str(ranks.device), dtype, progress=progress, ranks=ranks, **engine_options)
        ranks.send(HEARTBEAT, {})  # waits for every rank to have loaded its share; one that failed is named
        keep_freed_memory()  # after loading: the weights' transient copies are not kept
        server = Server(engine, endpoint, curve=curve)
        split = f", {tensor_parallel} tensor-parallel ranks" if tensor_parallel > 1 else ""
        print(
            f"tsqp server: {model_dir} on {ranks.device} ({dtype}{split}), loaded in "
            f"{time.perf_counter() - started:.1f} s, listening on {endpoint}{' (CURVE)' if curve else ''}, "
            f"protocol v{PROTOCOL_VERSION}",
            file=sys.stderr,
            flush=True,
        )
        server.serve_forever()
    except RankFailure:
        lost = True
        raise
    finally:
        if lost:
            ranks.abort()  # out of step: the ranks still running are stopped, not sent a last step
        else:
            ranks.close()
