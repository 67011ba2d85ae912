"""Endpoints and sockets: the one place that makes ZeroMQ sockets, and the TEE side's RPC client.

The client is a DEALER socket (not REQ: a lost reply cannot lock it up, and a restarted server is
reconnected to by ZeroMQ itself). Each request carries an id. `submit` sends without waiting, so
several requests can be in flight (the TEE works while the server computes); `wait` returns one
request's reply and keeps replies to the others for their turn; replies to no request in flight are
stale and dropped. A call fails with a one-line error when the server disconnects, dies, or misses its deadline;
the next call goes to whatever server listens on the endpoint then (a restarted one is reconnected to).
Until a server has completed the handshake, a call waits at most the connect timeout: nothing listening
fails in seconds, while a server that is there but busy (requests are served in arrival order) gets the
per-request timeout.
Replies are hostile input: protocol.unpack validates them before anything reads a tensor byte.
Every message part is bounded by zmq.MAXMSGSIZE; a peer that sends a larger one is disconnected.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from tsqp.errors import ConnectionLost, LinkRefused, ProtocolError, ServerError
from tsqp.stats import Stats
from tsqp.wire.arena import INITIAL_BYTES, SHM_DIR, Arena, Regions, align, shm_available
from tsqp.wire.curve import CurveKeys, apply_curve
from tsqp.wire.doorbell import NAP, SPIN_S, ZMQ_SPIN_S, Doorbell, fits, futex_usable
from tsqp.wire.doorbell import supported as doorbell_supported
from tsqp.wire.protocol import MAX_MESSAGE_BYTES, Message, nbytes_of, pack, unpack

POLL_MS = 100
DOORBELL_POLL_MS = 5  # waiting for a doorbell reply: how often the slot is looked at between ZeroMQ polls
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
PROBE_TIMEOUT_S = 0.5
CONNECT_TIMEOUT_S = 10.0  # a call made before any server completed the handshake waits this long for one
RECONNECT_GRACE_S = 1.0  # a call after a disconnect waits this long for the server to come back
MAX_ERROR_CHARS = 300  # of a server's error text shown to the user
LINK_EVENTS = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def endpoint_from_env() -> str | None:
    """The seed's variables, in its order: LLAMA_GPU_ENDPOINT, LLAMA_IPC_PATH, LLAMA_GPU_PORT."""
    if os.environ.get("LLAMA_GPU_ENDPOINT"):
        return os.environ["LLAMA_GPU_ENDPOINT"]
    if os.environ.get("LLAMA_IPC_PATH"):
        return "ipc://" + os.environ["LLAMA_IPC_PATH"]
    if os.environ.get("LLAMA_GPU_PORT"):
        return f"tcp://127.0.0.1:{os.environ['LLAMA_GPU_PORT']}"
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


@dataclass
class InFlight:
    method: str
    start: float  # perf_counter when submit began
    serialize_s: float
    sent: int  # bytes
    sent_at: float  # perf_counter when the request was out
    flag: int = 0  # the doorbell flag its reply will carry, when it was rung there (0: by ZeroMQ)
    bell: Doorbell | None = None  # the doorbell it was rung on
    discarded: bool = False  # given up on: its reply is dropped when it comes, then its region is free
    lost: str | None = None  # sent on a connection that went down: no reply will come


@dataclass
class Draft:
    """A request's input tensors, made before they are filled: in the arena when the client has one
    (filled in place, nothing copied when it is sent), private tensors otherwise. `Client.submit(...,
    draft=)` sends it; `Client.drop` gives it up."""

    id: int
    tensors: list[torch.Tensor]
    offsets: list[int] = field(default_factory=list)  # where the tensors lie in the arena
    reply_at: int | None = None  # where the results go in the arena (None: not in the arena)


class Client:
    """Sends requests to one server and waits for the matching replies, with a deadline.

    A reply's tensors may view the arena: they stay valid until the next `submit` or `draft`, so copy
    them out (or finish with them) first."""

    def __init__(
        self,
        endpoint: str,
        *,
        context: zmq.Context | None = None,
        timeout_s: float = 600.0,
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
        check_endpoint(endpoint)
        path = ipc_path(endpoint)
        if path is not None and not path.exists():
            raise ConnectionLost(f"no server at {endpoint} (the socket file does not exist): start `tsqp serve` first")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.stats = stats or Stats()
        self.alive = alive  # returns a reason when the server is known to be gone (a child process that exited)
        self.context = context or zmq.Context.instance()
        self.curve = curve
        self.sock = make_socket(self.context, zmq.DEALER, curve=curve)
        self.monitor = self.sock.get_monitor_socket(LINK_EVENTS)
        self.up = False  # a connection to the server has completed its handshake and is open
        self.down: ConnectionLost | None = None  # why the last connection ended, until another comes up
        self.sock.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.ids = itertools.count(1)
        self.use_shm = shm  # bulk tensors through a shared-memory arena (same host only)
        self.arena_name = arena_name
        self.arena: Arena | None = None
        self.arena_attached = False  # the server behind the current connection maps self.arena
        self.regions = Regions()  # the arena's regions of requests in flight (after the doorbell)
        self.retired: list[Arena] = []  # mappings before the arena grew, kept while replies may view them
        self.use_doorbell = doorbell
        self.futex = futex_usable()  # a rung request's wait sleeps on the arena's wake word (doorbell.py)
        self.doorbell: Doorbell | None = None  # the arena's control block, when the server polls it
        self.doorbell_requests = 0  # requests that went by the doorbell
        self.doorbell_replies = 0  # replies that came by it
        self.reply_due: dict[str, float] = {}  # per method: seconds from a rung request to its reply, lately
        self.in_flight: dict[int, InFlight] = {}  # request id -> what the statistics need
        self.replies: dict[int, tuple[Message, int, float]] = {}  # replies that came before their wait
        self.drafts: set[int] = set()  # drafts made and neither submitted nor dropped

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
        self._check_link(method)
        self._drop_answered_in_slot()
        self._release_retired()
        args = dict(args or {})
        if draft is not None:
            if draft.id not in self.drafts:
                raise ValueError(f"draft {draft.id} was submitted or dropped already")
            request_id, placed = draft.id, draft.reply_at is not None
        else:
            request_id, placed = next(self.ids), self.use_shm and bool(tensors or reply_bytes)
        try:
            if draft is None and placed:
                tensors = self._place(request_id, list(tensors), reply_bytes, args)
            elif self.use_shm and method != "attach_arena":
                self._arena_for(0)  # the doorbell lives in the arena: a control call may use it too
            if draft is not None:
                tensors = self._drafted(draft, args)
            header = {"id": request_id, "method": method, "session": session, "args": args}
            frames = pack(header, list(tensors), self.arena)
            packed = time.perf_counter()
            bell, flag = self.doorbell, 0
            # The doorbell takes a lone request whose header is all of it, while the server polls for one.
            # Lone: the server serves a rung request before any later one of this client's by ZeroMQ.
            if bell and not self.in_flight and len(frames) == 1 and fits(frames[0]) and bell.server_awake():
                flag = bell.ring(frames[0])
            else:
                self.sock.send_multipart(frames, copy=False)
        except BaseException:
            self.regions.free(request_id)  # nothing was sent: nobody writes there
            self.drafts.discard(request_id)
            raise
        self.drafts.discard(request_id)
        sent = sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)
        if placed:
            sent += sum(t.nbytes for t in tensors if self.arena.offset_of(t) is not None)
        self.in_flight[request_id] = InFlight(
            method, start, packed - start, sent, time.perf_counter(), flag, bell if flag else None
        )
        self.doorbell_requests += bool(flag)
        return request_id

    def draft(self, specs: list[tuple[torch.dtype, tuple[int, ...]]], reply_bytes: int = 0) -> Draft:
        """Input tensors (dtype, shape) for a request to fill before `submit(..., draft=)`: views of a
        region of the arena reserved for it (with room for reply_bytes of results), or private tensors."""
        self._release_retired()
        request_id = next(self.ids)
        if not self.use_shm:
            draft = Draft(request_id, [torch.empty(shape, dtype=dtype) for dtype, shape in specs])
        else:
            sizes = [align(math.prod(shape) * dtype.itemsize) for dtype, shape in specs]
            try:
                offset = self._arena_for(sum(sizes) + align(reply_bytes), request_id)
            except BaseException:  # attaching a new or grown arena failed (the link is down)
                self.regions.free(request_id)
                raise
            tensors, offsets = [], []
            for (dtype, shape), size in zip(specs, sizes, strict=True):
                tensors.append(self.arena.view(dtype, shape, offset))
                offsets.append(offset)
                offset += size
            draft = Draft(request_id, tensors, offsets, reply_at=offset)
        self.drafts.add(request_id)
        return draft

    def _drafted(self, draft: Draft, args: dict) -> list[torch.Tensor]:
        """A draft's tensors to send: in the arena, views of the current mapping at the draft's offsets
        (the arena may have grown since; the bytes are the same file's)."""
        if draft.reply_at is None:
            return list(draft.tensors)
        args["reply_at"] = draft.reply_at
        placed = zip(draft.tensors, draft.offsets, strict=True)
        return [self.arena.view(t.dtype, t.shape, offset) for t, offset in placed]

    def drop(self, draft: Draft) -> None:
        """Gives up on a draft that was not submitted: its region is free again (nobody writes there)."""
        if draft.id in self.drafts:
            self.drafts.discard(draft.id)
            self.regions.free(draft.id)

    def _release_retired(self) -> None:
        """Unmaps the arena's mappings from before it grew once nothing can view them: no reply in flight,
        no draft being filled (a reply already waited for is done with by the rules of `Client`)."""
        if not self.in_flight and not self.drafts:
            for arena in self.retired:
                arena.release()
            self.retired.clear()

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
        self.regions.free(request_id)
        self._drop_answered_in_slot()  # a rung request given up on was answered before this one
        received_bytes += sum(nbytes_of(d[0], d[1]) for d in reply.header["tensors"] if len(d) == 3)  # in the arena
        done = time.perf_counter()
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
                done=done,
                server_start=_seconds(reply.args.get("compute_start")),
            )
        if reply.header.get("ok") is not True:
            raise ServerError(
                f"server refused {request.method}: {_one_line(reply.header.get('error', 'no reason given'))}"
            )
        return reply

    def ring_doorbell(self, on: bool) -> None:
        """Turns the doorbell on or off; the server hears of it with the next request (the arena is
        attached again), and polls no more for this client when it is off."""
        self.use_doorbell, self.arena_attached, self.doorbell = on, False, None

    def discard(self, request_id: int) -> None:
        """Gives up on a request in flight (a failed pipeline): its reply is dropped when it comes, and
        only then is its arena region reused (the server may still write there until it answers)."""
        if request_id in self.replies:
            del self.replies[request_id], self.in_flight[request_id]
            self.regions.free(request_id)
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
                self.regions.free(request_id)

    def _lose_in_flight(self, reason: str) -> None:
        """The connection went down: no reply to what was sent on it will come."""
        for request in self.in_flight.values():
            request.lost = reason

    def _drop_lost(self) -> None:
        """A new connection is up: requests lost with the old one are gone (their server no longer answers
        on this link; if it still lives, its late writes meet a verified client's checks)."""
        for request_id in [i for i, r in self.in_flight.items() if r.lost is not None]:
            del self.in_flight[request_id]
            self.replies.pop(request_id, None)
            self.regions.free(request_id)

    def _check_link(self, method: str) -> None:
        """Catches up on connection events that came between calls. After a disconnect the server gets
        RECONNECT_GRACE_S to come back (ZeroMQ retries every 100 ms, so a restarted server is picked up);
        otherwise the call fails now instead of at its deadline."""
        self._link_events(method, in_flight=False)
        deadline = time.monotonic() + RECONNECT_GRACE_S
        while self.down is not None and time.monotonic() < deadline:
            if self.monitor.poll(min(POLL_MS, max(0.0, deadline - time.monotonic()) * 1000)):
                self._link_events(method, in_flight=False)
        if isinstance(self.down, LinkRefused):
            raise LinkRefused(str(self.down))
        if self.down is not None:
            raise ConnectionLost(
                f"{self.down} and did not come back within {RECONNECT_GRACE_S:g} s ({method} not sent)"
            )

    def _link_events(self, method: str, in_flight: bool) -> None:
        """Reads the monitor's pending events; during a call, a lost or refused connection fails it."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            kind, lost = event["event"], None
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up, self.down = True, None
                self._drop_lost()
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                lost = LinkRefused(
                    f"server at {self.endpoint} refused this client's CURVE key (ZAP status "
                    f"{int(event['value'])}): add its client.key to the server's allowed/ folder"
                )
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                lost = LinkRefused(
                    f"handshake with server at {self.endpoint} failed: "
                    + (
                        "is it running with --curve-keys, and is server.key its public key?"
                        if self.curve
                        else "it may require CURVE; pass --curve-keys DIR"
                    )
                )
            elif kind == zmq.EVENT_DISCONNECTED and self.up:
                self.up = False
                lost = ConnectionLost(f"server at {self.endpoint} closed the connection")
            if lost is not None:
                self.down, self.arena_attached, self.doorbell = lost, False, None
                self._lose_in_flight(str(lost))
                if in_flight:
                    raise lost if isinstance(lost, LinkRefused) else ConnectionLost(f"{lost} during {method}")

    def _receive(self, request_id: int, request: InFlight, timeout_s: float) -> tuple[Message, int, float]:
        """(reply, bytes received in frames, seconds to unpack it). Replies to other requests in flight are
        kept; replies to discarded requests free their region; anything else is stale and dropped."""
        if request_id in self.replies:
            return self.replies.pop(request_id)
        flag, bell = request.flag, request.bell
        if not flag:
            return self._sleep_for_reply(request_id, request, timeout_s, sleeper=False)
        try:  # the client waits in the slot since it rang (Doorbell.ring); the server answers there
            if self.futex and NAP:
                self._nap(request, bell, flag)
            if (reply := self._spin_for_reply(request_id, bell, flag)) is not None:
                self._learn(request, time.perf_counter())
                return reply
            if self.futex:  # sleeps on the wake word, still waiting in the slot
                reply = self._sleep_for_reply(request_id, request, timeout_s, sleeper=True)
                self._learn(request, time.perf_counter())
                return reply
        finally:
            bell.waiting(False)
        if (reply := self._doorbell_reply(request_id, bell, flag)) is not None:  # came as the flag went down
            return reply
        return self._sleep_for_reply(request_id, request, timeout_s, sleeper=False)

    def _sleep_for_reply(
        self, request_id: int, request: InFlight, timeout_s: float, sleeper: bool
    ) -> tuple[Message, int, float]:
        """Waits on ZeroMQ, or on the doorbell's wake word (sleeper), with the deadlines and link checks."""
        method, flag, bell = request.method, request.flag, request.bell
        start = time.monotonic()
        reach_s = min(self.connect_timeout_s, timeout_s)  # for a server to take the connection (self.up)
        while True:
            remaining = start + (timeout_s if self.up else reach_s) - time.monotonic()
            if remaining <= 0 and not self.up:
                raise ConnectionLost(
                    f"nothing answers at {self.endpoint} (it did not answer {method} within {reach_s:g} s): "
                    "is `tsqp serve` running there?"
                )
            if remaining <= 0:
                raise ConnectionLost(f"server at {self.endpoint} did not answer {method} within {timeout_s:g} s")
            if sleeper:  # a reply by ZeroMQ (a header over the slot) wakes it too, and is seen within a poll
                seq = bell.wake_seq()
                if (reply := self._doorbell_reply(request_id, bell, flag)) is not None:
                    return reply
                bell.sleep(seq, min(DOORBELL_POLL_MS / 1000, remaining))
                events = dict(self.poller.poll(0))
            else:
                events = dict(self.poller.poll(min(DOORBELL_POLL_MS if flag else POLL_MS, remaining * 1000)))
            if flag and (reply := self._doorbell_reply(request_id, bell, flag)) is not None:
                return reply
            if self.sock in events:  # a reply that made it wins over the disconnect that may follow it
                frames = self.sock.recv_multipart(copy=False)
                start = time.perf_counter()
                reply = unpack(frames, self.arena)
                received = (reply, sum(f.buffer.nbytes for f in frames), time.perf_counter() - start)
                reply_id = reply.header.get("id")
                if reply_id == request_id:
                    return received
                if reply_id in self.in_flight and not isinstance(reply_id, bool):
                    if self.in_flight[reply_id].discarded:
                        del self.in_flight[reply_id]
                        self.regions.free(reply_id)
                    else:
                        self.replies[reply_id] = received
                continue
            if self.monitor in events:
                self._link_events(method, in_flight=True)
            if self.alive is not None and (reason := self.alive()):
                raise ConnectionLost(f"server stopped during {method}: {reason}")

    def _nap(self, request: InFlight, bell: Doorbell, flag: int) -> None:
        """Hybrid polling, as Linux's block layer polls a fast disk: sleeps on the wake word until shortly
        (SPIN_S / 2) before the reply is due by this method's last replies, then the caller polls. A reply
        that comes sooner wakes it: sleeping too long costs only the wake-up (doorbell.py). It lasts no
        longer than a sleeper's slice (DOORBELL_POLL_MS), so a server that died is noticed as soon."""
        due = self.reply_due.get(request.method)
        if due is None:
            return
        seq = bell.wake_seq()
        nap = request.sent_at + due - SPIN_S / 2 - time.perf_counter()
        if nap > 0 and bell.reply(flag) is None:
            bell.sleep(seq, min(nap, DOORBELL_POLL_MS / 1000))

    def _learn(self, request: InFlight, now: float) -> None:
        """Updates when this method's replies are due (a mean over the last few: one slow reply, a batch
        that waited for a companion, moves it only half way)."""
        seconds = now - request.sent_at
        due = self.reply_due.get(request.method)
        self.reply_due[request.method] = seconds if due is None else (due + seconds) / 2

    def _spin_for_reply(self, request_id: int, bell: Doorbell, flag: int) -> tuple[Message, int, float] | None:
        """Polls the doorbell for SPIN_S (ZMQ_SPIN_S where it cannot sleep on the wake word; the caller says
        in the control block that it waits), yielding the core between looks to any thread that has work
        (the server's, on a shared host)."""
        until = time.perf_counter() + (SPIN_S if self.futex else ZMQ_SPIN_S)
        while time.perf_counter() < until:
            if (reply := self._doorbell_reply(request_id, bell, flag)) is not None:
                return reply
            os.sched_yield()
        return None

    def _doorbell_reply(self, request_id: int, bell: Doorbell, flag: int) -> tuple[Message, int, float] | None:
        raw = bell.reply(flag)  # a copy: the slot is untrusted memory
        if raw is None:
            return None
        start = time.perf_counter()
        reply = unpack([raw], self.arena)
        if reply.header.get("id") != request_id:
            raise ProtocolError(f"the doorbell's reply answers request {reply.header.get('id')!r}, not {request_id}")
        self.doorbell_replies += 1
        return reply, len(raw), time.perf_counter() - start

    def _arena_for(self, needed: int, request_id: int | None = None) -> int | None:
        """An arena the server has attached, with a region of `needed` bytes for the request (its start)
        when a request id is given."""
        region = request_id is not None
        start = self.regions.allocate(request_id, needed, self.arena.size) if region and self.arena else None
        if self.arena is None:
            self.arena = Arena.create(self.arena_name, max(align(self.regions.base + needed), INITIAL_BYTES))
            self.arena_attached = False
        elif region and start is None:  # the same file, grown: regions in flight keep their bytes; replies
            self.retired.append(self.arena)  # already unpacked view the old mapping, kept until none is in flight
            self.arena = self.arena.grown(self.regions.end() + needed)
            self.arena_attached = False
        if region and start is None:
            start = self.regions.allocate(request_id, needed, self.arena.size)
        if not self.arena_attached:  # a new arena, or a new connection (a restarted server)
            self.doorbell = None
            ring = self.use_doorbell and doorbell_supported()
            args = {"name": self.arena.name, "size": self.arena.size, "doorbell": ring}
            reply = self.call("attach_arena", args)  # no tensors: no recursion
            if ring and reply.args.get("doorbell") is True:
                self.doorbell = Doorbell(self.arena.map)
            self.arena_attached = True
        return start

    def _place(self, request_id: int, tensors: list[torch.Tensor], reply_bytes: int, args: dict) -> list[torch.Tensor]:
        """Copies request tensors into a region of the arena and reserves room there for the results."""
        sizes = [align(t.nbytes) for t in tensors]
        needed = sum(sizes) + align(reply_bytes)
        start = self._arena_for(needed, request_id)
        placed, offset = [], start
        for tensor, size in zip(tensors, sizes, strict=True):
            view = self.arena.view(tensor.dtype, tensor.shape, offset)
            view.copy_(tensor)
            placed.append(view)
            offset += size
        args["reply_at"] = offset
        return placed

    def close(self) -> None:
        for arena in self.retired:
            arena.release()
        if self.arena is not None:
            self.arena.unlink()
            self.arena = None
        self.sock.disable_monitor()
        self.monitor.close()
        self.sock.close()

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
