"""The GPU server's socket loop: a ROUTER socket and the clients' doorbells around `Engine`. Untrusted; it
never sees the TEE's secrets.

It takes what is waiting (socket and doorbells), parses it once, and serves it in rounds that the scheduler
orders (scheduler.py: per-client queues, several clients' requests for one op and layer as one product,
holds for a companion on its way); replies go back by socket or doorbell, results straight into the
client's arena. Any malformed request gets an error reply and the loop keeps serving. SIGINT and SIGTERM
end the loop cleanly and remove the ipc socket file. Start-up (loading, `run_server`) is startup.py.

On a tensor-parallel server this loop runs on rank 0 only (the others follow it: parallel.py). A rank
lost is the one fault it does not survive: for FAILURE_LINGER_S every request, the one in flight and
those that come, is answered with the reason, then the server exits with it.
"""

from __future__ import annotations

import os
import signal
import time

import msgpack
import torch
import zmq

from tsqp.errors import ProtocolError, TsqpError
from tsqp.server.engine import Engine
from tsqp.server.parallel import RankFailure
from tsqp.server.scheduler import Pending, Scheduler
from tsqp.wire import cores
from tsqp.wire.arena import Arena, align
from tsqp.wire.curve import CurveKeys, start_authenticator
from tsqp.wire.doorbell import CONTROL_BYTES, SERVER_SPIN_S, Doorbell, fits
from tsqp.wire.doorbell import supported as doorbell_supported
from tsqp.wire.protocol import (
    MAX_HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    Message,
    pack,
    parse_header,
    unpack,
)
from tsqp.wire.transport import bind_server, ipc_path

POLL_MS = 200
MAX_ROUND = 256  # requests taken into one round at most
DOORBELL_POLL_MS = 5  # with doorbells: how often they are looked at while the server sleeps on the socket
FAILURE_LINGER_S = 2.0  # after a rank is lost: its clients' next requests get the reason, not a closed socket


class Server:
    def __init__(
        self,
        engine: Engine,
        endpoint: str,
        context: zmq.Context | None = None,
        curve: CurveKeys | None = None,
        hold_s: float | None = None,
    ):
        """curve: server keys (tsqp.wire.curve.server_keys): only clients in the allow-list connect, encrypted.
        hold_s: how long a batchable request may wait for a companion on its way (scheduler.py; 0: never)."""
        self.engine = engine
        self.endpoint = endpoint
        self.context = context or zmq.Context.instance()
        self.authenticator = start_authenticator(self.context, curve) if curve is not None else None
        try:
            self.sock = bind_server(self.context, endpoint, curve, engine.budget.frames_bound())
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
        self.scheduler = Scheduler(hold_s)
        engine.budget.count("arenas", lambda: sum(arena.size for arena in self.arenas.values()))

    def serve_forever(self) -> None:
        """Serves requests from the socket and the doorbells, a round at a time (serve_round). After a
        request from a client with a doorbell the loop polls for SERVER_SPIN_S, yielding its core (the
        client's next small request is usually that close), then sleeps on the socket, looking at the
        doorbells every DOORBELL_POLL_MS."""
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self.stopping and self.failure is None:
                if self.serve_round():
                    continue
                spinning = time.perf_counter() < max(self.spin_until, self.scheduler.hold_deadline())
                self._awake(spinning)
                if not spinning and self.serve_round():  # rung as the flag went down
                    continue
                if self.sock.poll(0 if spinning else (DOORBELL_POLL_MS if self.doorbells else POLL_MS)):
                    self.serve_round()
                elif spinning:
                    os.sched_yield()  # a polite spin: a process that has work gets this core first
                else:
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
        """Nothing to serve: idle sessions expire, followers get their heartbeat, a lost rank is noticed,
        and the arenas of clients that are gone (their file removed: the next client sweeps a killed one's)
        are unmapped."""
        held = self.scheduler.waiting()  # their requests' tensors view their arenas
        for peer in [p for p, arena in self.arenas.items() if not arena.path.exists() and p not in held]:
            self.doorbells.pop(peer, None)
            self.arenas.pop(peer).release()
        self.scheduler.rendezvous.forget(time.perf_counter())
        try:
            self.engine.tick()
        except RankFailure as exc:
            self.failure = str(exc)
        self.failure = self.failure or self.engine.ranks.lost()

    def refuse(self, seconds: float) -> None:
        """Answers every request for `seconds` with the failure (answer() does), by socket or doorbell."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stopping:
            if not self.serve_round() and self.sock.poll(DOORBELL_POLL_MS):
                self.serve_round()

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def _awake(self, on: bool) -> None:
        if on != self.polling:
            self.polling = on
            for bell in self.doorbells.values():
                bell.awake(on)

    def _served(self, peer: bytes) -> None:
        if peer in self.doorbells:
            self.spin_until = time.perf_counter() + SERVER_SPIN_S

    # -- a round: what is waiting now, batched where it can be ------------------------------------

    def collect(self) -> list[Pending]:
        """Every request waiting now: rung doorbells, then the socket's queue (without waiting)."""
        pending = []
        for peer, bell in list(self.doorbells.items()):
            if (rung := bell.take()) is not None:
                pending.append(Pending(peer, rung[1], [rung[1]], bell, rung[0]))
        while len(pending) < MAX_ROUND and self.sock.poll(0):
            frames = self.sock.recv_multipart(copy=False)
            if len(frames) < 2:
                continue  # nothing to answer to: a ROUTER message always starts with the peer identity
            peer, body = frames[0].bytes, frames[1:]
            # A client rings only with nothing in flight, so a request it rang came before this one.
            bell = self.doorbells.get(peer)
            if bell is not None and (rung := bell.take()) is not None:
                pending.append(Pending(peer, rung[1], [rung[1]], bell, rung[0]))
            pending.append(Pending(peer, bytes(body[0].buffer[: MAX_HEADER_BYTES + 1]), body))
        return pending

    def serve_one(self) -> None:
        """Waits for a request on the socket, then serves the round it begins (tests serve in lockstep)."""
        self.sock.poll()
        while not self.serve_round() and self.scheduler.waiting():
            os.sched_yield()  # held for a companion: served by hold_s at the latest

    def serve_round(self) -> bool:
        """Takes what is waiting and serves a round of it (Scheduler.round): each group's replies go out
        together, then its sleepers are woken (see send). False: none ran."""
        for item in self.collect():
            item.arena, item.request = self.arenas.get(item.peer), self.parse(item)
            item.key = self.engine.batch_key(item.request)
            self.scheduler.add(item)
        ran = False
        for group in self.scheduler.round():
            ran = True
            if group[0].key is not None:
                self.engine.batch_sizes[len(group)] += 1
            replies = self.run(group)
            sleepers = []  # woken once every reply of the product is out (see send)
            for item, reply in zip(group, replies, strict=True):
                if (bell := self.send(item, reply)) is not None:
                    sleepers.append(bell)
            self.scheduler.answered(group, time.perf_counter())
            for bell in sleepers:
                bell.wake()
        return ran

    def parse(self, item: Pending) -> Message | list:
        """The request, or the reply frames that refuse it (a bad header or frames, a lost rank)."""
        arena = self.arenas.get(item.peer)
        try:
            header = parse_header(item.raw)
        except Exception as exc:  # ProtocolError, or anything a hostile header provokes
            error = str(exc) if isinstance(exc, TsqpError) else f"malformed header ({type(exc).__name__})"
            return pack({"id": _lenient_id(item.raw), "ok": False, "error": error})
        if self.failure is not None:
            return pack({"id": header["id"], "ok": False, "error": self.failure})
        try:
            return unpack(item.body, arena, header=header)
        except Exception as exc:
            return self.error(header["id"], exc)

    def run(self, group: list[Pending]) -> list[list]:
        """The reply frames of a group of requests (one, or several that share a product)."""
        replies: dict[int, list] = {}
        items, slots, where = [], [], []
        for j, item in enumerate(group):
            self.requests += 1
            request = item.request
            if not isinstance(request, Message):
                replies[j] = request
                continue
            try:
                if self.arenas.get(item.peer) is not item.arena:  # unmapped since: its tensors must not be read
                    raise ProtocolError("the arena this request came in was replaced before it ran")
                if request.header.get("method") == "attach_arena":
                    if item.bell is not None:  # it would unmap the doorbell it came by
                        raise ProtocolError("attach_arena must come by the socket, not the doorbell")
                    replies[j] = pack(
                        {"id": request.header["id"], "ok": True, "args": self.attach_arena(item.peer, request.args)}
                    )
                    continue
                arena = self.arenas.get(item.peer)
                slot = ReplySlots(arena, request) if arena and "reply_at" in request.args else None
            except Exception as exc:
                replies[j] = self.error(request.header["id"], exc)
                continue
            items.append((item.peer, request, slot))
            slots.append(slot)
            where.append(j)
        for j, slot, outcome in zip(where, slots, self.engine.handle_batch(items) if items else [], strict=True):
            request_id = group[j].request.header["id"]
            if isinstance(outcome, Exception):
                replies[j] = self.error(request_id, outcome)
                continue
            args, tensors = outcome
            if slot is not None:
                tensors = [slot.place(t) for t in tensors]
            replies[j] = pack({"id": request_id, "ok": True, "args": args}, tensors, self.arenas.get(group[j].peer))
        return [replies[j] for j in range(len(group))]

    def error(self, request_id: int, exc: Exception) -> list:
        if isinstance(exc, RankFailure):  # the server cannot go on: this and every later request get the reason
            self.failure = str(exc)
            return pack({"id": request_id, "ok": False, "error": self.failure})
        if isinstance(exc, TsqpError):
            return pack({"id": request_id, "ok": False, "error": str(exc)})
        # a bug or a hostile input we did not foresee: answer, keep serving
        return pack({"id": request_id, "ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"})

    def send(self, item: Pending, reply: list) -> Doorbell | None:
        """A reply to a rung request goes back on its doorbell while the client polls for it (and it is all
        header); every other reply goes by ZeroMQ. Returns the doorbell whose sleeper the caller must wake
        (Doorbell.wake). A batch's replies all go out before the first wake: a wake lets the woken client
        preempt the server on a shared core, and the clients still to be answered would wait for it."""
        bell = item.bell
        self._served(item.peer)
        if bell is not None and self.doorbells.get(item.peer) is bell and len(reply) == 1 and fits(reply[0]):
            if bell.client_waiting():
                bell.answer(item.flag, reply[0])
                return bell
        self.sock.send_multipart([item.peer] + reply, copy=False)
        if bell is not None and self.doorbells.get(item.peer) is bell:
            return bell  # a client asleep on the wake word looks at the socket next
        return None

    def attach_arena(self, peer: bytes, args: dict) -> dict:
        name, size = args.get("name"), args.get("size")
        if not isinstance(name, str) or not isinstance(size, int) or not 0 < size <= MAX_MESSAGE_BYTES * 2:
            raise ProtocolError("attach_arena needs a name and a size within bounds")
        # This peer's earlier arena, and the same file attached by an earlier connection (a client that
        # reconnected, a fixed --arena-name): two doorbells on one file would both take its requests.
        replaced = [p for p, a in self.arenas.items() if p == peer or a.name == name]
        # mapped, the server writes results into it: its pages count as the server's
        budget = self.engine.budget
        budget.reserve(size - sum(self.arenas[p].size for p in replaced), f"a {size}-byte arena")
        budget.release()  # once mapped, it counts among the arenas
        for other in replaced:
            self.doorbells.pop(other, None)
            self.arenas.pop(other).release()
        arena = self.arenas[peer] = Arena(name, size, create=False)
        if self.engine.device.type == "cuda":
            arena.pin()
        if args.get("doorbell") is not True or not doorbell_supported() or size < CONTROL_BYTES:
            return {}
        bell = self.doorbells[peer] = Doorbell(arena.map)
        bell.awake(self.polling)
        return {"doorbell": True, **cores.describe(self.engine.device.type)}

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
