"""The TEE side's RPC client: requests to one server, each matched with its reply, with deadlines.

The client is a DEALER socket (not REQ: a lost reply cannot lock it up, and a restarted server is
reconnected to by ZeroMQ itself). Each request carries an id. `submit` sends without waiting, so
several requests can be in flight (the TEE works while the server computes); `wait` returns one
request's reply and keeps replies to the others for their turn; replies to no request in flight are
stale and dropped. A call fails with a one-line error when the server disconnects, dies, or misses its
deadline; the next call goes to whatever server listens on the endpoint then (a restarted one is
reconnected to). Replies are hostile input: protocol.unpack validates them before anything reads a
tensor byte.

`Client` composes three parts, each with one job: the link (link.Link: socket, monitor, deadlines),
the arena placement (placement.Placement: regions, drafts), and the doorbell wait (waiting.DoorbellWait).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable

import torch
import zmq

from tsqp.errors import ConnectionLost, ServerError
from tsqp.stats import Stats
from tsqp.wire.arena import Arena
from tsqp.wire.curve import CurveKeys
from tsqp.wire.doorbell import Doorbell, fits
from tsqp.wire.link import POLL_MS, Link
from tsqp.wire.placement import Draft, Placement
from tsqp.wire.protocol import Message, nbytes_of, pack, unpack
from tsqp.wire.waiting import DoorbellWait, InFlight, Received

REPLY_TIMEOUT_S = 600.0  # how long a call waits for its reply from a server that took the connection
CONNECT_TIMEOUT_S = 10.0  # a call made before any server completed the handshake waits this long for one
MAX_ERROR_CHARS = 300  # of a server's error text shown to the user


class Client:
    """Sends requests to one server and waits for the matching replies, with a deadline.

    A reply's tensors may view the arena: they stay valid until the next `submit` or `draft`, so copy
    them out (or finish with them) first."""

    def __init__(
        self,
        endpoint: str,
        *,
        context: zmq.Context | None = None,
        timeout_s: float = REPLY_TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        stats: Stats | None = None,
        alive: Callable[[], str | None] | None = None,
        shm: bool = False,
        arena_name: str | None = None,
        curve: CurveKeys | None = None,
        doorbell: bool = True,
    ):
        """curve: client keys (tsqp.wire.curve.client_keys) for a server started with --curve-keys.
        doorbell: ring the arena's doorbell for lone small requests when the server polls it (shm only).
        connect_timeout_s: how long a call waits while no server has completed the handshake (at most timeout_s)."""
        context = context or zmq.Context.instance()
        self.link = Link(endpoint, context, curve, connect_timeout_s, alive, self._lose_in_flight, self._drop_lost)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.stats = stats or Stats()
        self.ids = itertools.count(1)
        self.placement = Placement(shm, arena_name, doorbell, self._attach)
        self.waiter = DoorbellWait()
        self.doorbell_requests = 0  # requests that went by the doorbell
        self.in_flight: dict[int, InFlight] = {}  # request id -> what the statistics need
        self.replies: dict[int, Received] = {}  # replies that came before their wait

    @property
    def arena(self) -> Arena | None:
        return self.placement.arena

    @property
    def use_shm(self) -> bool:
        return self.placement.use_shm

    @property
    def doorbell(self) -> Doorbell | None:
        return self.placement.doorbell

    def call(
        self,
        method: str,
        args: dict | None = None,
        tensors: list[torch.Tensor] = (),
        session: bytes | None = None,
        timeout_s: float | None = None,
        reply_bytes: int = 0,
    ) -> Message:
        """One round trip. reply_bytes: room the results need in the arena (the caller knows their shapes)."""
        return self.wait(self.submit(method, args, tensors, session, reply_bytes), timeout_s)

    __call__ = call

    def submit(
        self,
        method: str,
        args: dict | None = None,
        tensors: list[torch.Tensor] = (),
        session: bytes | None = None,
        reply_bytes: int = 0,
        draft: Draft | None = None,
    ) -> int:
        """Sends a request without waiting for its reply; returns its id for `wait`. Several may be in
        flight: the server answers them in order, each into its own arena region.

        draft: inputs made by `draft` and filled since (instead of `tensors` and `reply_bytes`)."""
        start = time.perf_counter()
        self.link.check(method)
        self._drop_answered_in_slot()
        placement = self.placement
        placement.release_retired(busy=bool(self.in_flight))
        args = dict(args or {})
        if draft is not None:
            if draft.id not in placement.drafts:
                raise ValueError(f"draft {draft.id} was submitted or dropped already")
            request_id, placed = draft.id, draft.reply_at is not None
        else:
            request_id, placed = next(self.ids), placement.use_shm and bool(tensors or reply_bytes)
        try:
            if draft is None and placed:
                tensors = placement.place(request_id, list(tensors), reply_bytes, args)
            elif placement.use_shm and method != "attach_arena":
                placement.ensure(0)  # the doorbell lives in the arena: a control call may use it too
            if draft is not None:
                tensors = placement.drafted(draft, args)
            header = {"id": request_id, "method": method, "session": session, "args": args}
            frames = pack(header, list(tensors), placement.arena)
            packed = time.perf_counter()
            flag = self._send(frames)
        except BaseException:
            placement.regions.free(request_id)  # nothing was sent: nobody writes there
            placement.drafts.discard(request_id)
            raise
        placement.drafts.discard(request_id)
        sent = sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)
        if placed:
            sent += placement.bytes_in_arena(tensors)
        bell = placement.doorbell if flag else None
        self.in_flight[request_id] = InFlight(method, start, packed - start, sent, time.perf_counter(), flag, bell)
        self.doorbell_requests += bool(flag)
        return request_id

    def _send(self, frames: list) -> int:
        """Sends by the doorbell a lone request whose header is all of it, while the server polls for one
        (lone: the server serves a rung request before any later one of this client's by ZeroMQ), else by
        ZeroMQ. The flag its reply will carry (0: by ZeroMQ)."""
        bell = self.placement.doorbell
        if bell and not self.in_flight and len(frames) == 1 and fits(frames[0]) and bell.server_awake():
            return bell.ring(frames[0])
        self.link.sock.send_multipart(frames, copy=False)
        return 0

    def draft(self, specs: list[tuple[torch.dtype, tuple[int, ...]]], reply_bytes: int = 0) -> Draft:
        """Input tensors (dtype, shape) for a request to fill before `submit(..., draft=)`: views of a
        region of the arena reserved for it (with room for reply_bytes of results), or private tensors."""
        self.placement.release_retired(busy=bool(self.in_flight))
        return self.placement.draft(next(self.ids), specs, reply_bytes)

    def drop(self, draft: Draft) -> None:
        """Gives up on a draft that was not submitted: its region is free again (nobody writes there)."""
        self.placement.drop(draft)

    def wait(self, request_id: int, timeout_s: float | None = None) -> Message:
        """The reply to a submitted request (replies to other requests in flight are kept for their turn)."""
        request = self.in_flight[request_id]
        waiting = time.perf_counter()
        try:
            if request.lost is not None:
                raise ConnectionLost(f"{request.lost} ({request.method} was in flight)")
            reply, received_bytes, unpack_s = self._receive(request_id, request, timeout_s or self.timeout_s)
        except BaseException:
            self._forget_in_flight()  # the link is in doubt: no reply in flight is waited for any more
            raise
        del self.in_flight[request_id]
        self.placement.regions.free(request_id)
        self._drop_answered_in_slot()  # a rung request given up on was answered before this one
        received_bytes += sum(nbytes_of(d[0], d[1]) for d in reply.header["tensors"] if len(d) == 3)  # in the arena
        if request.method != "attach_arena":  # setup, not part of the computation's round trips
            self.stats.rpc(
                request.method,
                sent=request.sent,
                received=received_bytes,
                serialize_s=request.serialize_s,
                deserialize_s=unpack_s,
                server_s=_seconds(reply.args.get("compute_s")),
                start=request.start,
                sent_at=request.sent_at,
                waiting=waiting,
                done=time.perf_counter(),
                server_start=_seconds(reply.args.get("compute_start")),
            )
        if reply.header.get("ok") is not True:
            raise ServerError(
                f"server refused {request.method}: {_one_line(reply.header.get('error', 'no reason given'))}"
            )
        return reply

    def _attach(self, args: dict) -> Message:
        """The server maps the arena (Placement.ensure); its reply says where it computes (DoorbellWait.adapt)."""
        reply = self.call("attach_arena", args)
        self.waiter.adapt(reply.args)
        return reply

    def ring_doorbell(self, on: bool) -> None:
        """Turns the doorbell on or off; the server hears of it with the next request (the arena is
        attached again), and polls no more for this client when it is off."""
        self.placement.use_doorbell = on
        self.placement.detach()

    def discard(self, request_id: int) -> None:
        """Gives up on a request in flight (a failed pipeline): its reply is dropped when it comes, and
        only then is its arena region reused (the server may still write there until it answers)."""
        if request_id in self.replies:
            del self.replies[request_id], self.in_flight[request_id]
            self.placement.regions.free(request_id)
        elif request_id in self.in_flight:
            request = self.in_flight[request_id]
            request.discarded = True
            if request.flag:
                request.bell.waiting(False)  # nobody looks at the slot for it: its reply may come by ZeroMQ

    def _forget_in_flight(self) -> None:
        """After a failed wait: every request in flight is given up on. Their regions stay taken until
        their replies come (the server may still be writing there), or their connection is gone."""
        for request_id in list(self.in_flight):
            self.discard(request_id)

    def _drop_answered_in_slot(self) -> None:
        """A rung request given up on (an interrupted wait) may have its reply in the doorbell's slot, where
        no ZeroMQ reply will come to free it: drop it once its reply is there."""
        for request_id, request in list(self.in_flight.items()):
            if request.discarded and request.flag and request.bell.reply(request.flag) is not None:
                del self.in_flight[request_id]
                self.placement.regions.free(request_id)

    def _lose_in_flight(self, reason: str) -> None:
        """The connection went down: no reply to what was sent on it will come, and the server behind the
        next one must attach the arena again."""
        self.placement.detach()
        for request in self.in_flight.values():
            request.lost = reason

    def _drop_lost(self) -> None:
        """A new connection is up: requests lost with the old one are gone (their server no longer answers
        on this link; if it still lives, its late writes meet a verified client's checks)."""
        for request_id in [i for i, r in self.in_flight.items() if r.lost is not None]:
            del self.in_flight[request_id]
            self.replies.pop(request_id, None)
            self.placement.regions.free(request_id)

    def _receive(self, request_id: int, request: InFlight, timeout_s: float) -> Received:
        """(reply, bytes received in frames, seconds to unpack it). Replies to other requests in flight are
        kept; replies to discarded requests free their region; anything else is stale and dropped."""
        if request_id in self.replies:
            return self.replies.pop(request_id)
        if not request.flag:
            return self._sleep_for_reply(request_id, request, timeout_s, sleeper=False)
        waiter = self.waiter
        try:  # the client waits in the slot since it rang (Doorbell.ring); the server answers there
            if (reply := waiter.early(request_id, request, self.arena)) is not None:
                return reply
            if waiter.futex:  # sleeps on the wake word, still waiting in the slot
                reply = self._sleep_for_reply(request_id, request, timeout_s, sleeper=True)
                waiter.learn(request)
                return reply
        finally:
            request.bell.waiting(False)
        if (reply := waiter.reply(request_id, request, self.arena)) is not None:  # came as the flag went down
            return reply
        return self._sleep_for_reply(request_id, request, timeout_s, sleeper=False)

    def _sleep_for_reply(self, request_id: int, request: InFlight, timeout_s: float, sleeper: bool) -> Received:
        """Waits on ZeroMQ, or on the doorbell's wake word (sleeper), with the deadlines and link checks."""
        flag, bell, waiter = request.flag, request.bell, self.waiter
        start = time.monotonic()
        while True:
            remaining = self.link.remaining(start, request.method, timeout_s)
            if sleeper:  # a reply by ZeroMQ (a header over the slot) wakes it too, and is seen within a poll
                seq = bell.wake_seq()
                if (reply := waiter.reply(request_id, request, self.arena)) is not None:
                    return reply
                bell.sleep(seq, min(waiter.slice_s, remaining))
                events = self.link.poll(0)
            else:
                events = self.link.poll(min(waiter.slice_s * 1000 if flag else POLL_MS, remaining * 1000))
            if flag and (reply := waiter.reply(request_id, request, self.arena)) is not None:
                return reply
            if self.link.readable(events, request.method) and (reply := self._take(request_id)) is not None:
                return reply

    def _take(self, request_id: int) -> Received | None:
        """Reads one reply from the socket: this request's, or one kept for (or dropped with) another's."""
        frames = self.link.sock.recv_multipart(copy=False)
        start = time.perf_counter()
        reply = unpack(frames, self.arena)
        received = (reply, sum(f.buffer.nbytes for f in frames), time.perf_counter() - start)
        reply_id = reply.header.get("id")
        if reply_id == request_id:
            return received
        if reply_id in self.in_flight and not isinstance(reply_id, bool):
            if self.in_flight[reply_id].discarded:
                del self.in_flight[reply_id]
                self.placement.regions.free(reply_id)
            else:
                self.replies[reply_id] = received
        return None

    def close(self) -> None:
        self.placement.close()
        self.link.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _seconds(value) -> float:
    """A duration reported by the server, for the statistics only; anything else counts as 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return float(value) if ok else 0.0


def _one_line(text) -> str:
    """A server's error text as one bounded line (it is untrusted and goes to the user's terminal)."""
    text = " ".join(str(text).split())
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."
