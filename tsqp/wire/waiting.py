"""How the client waits for the reply to a request it rang on the arena's doorbell (doorbell.py).

It naps on the wake word until shortly before the reply is due by that method's last replies (as
Linux's block layer polls a fast disk), polls the slot for the spin time, then the caller sleeps on
the wake word (or, where futexes are the enclave's own, on ZeroMQ). The environment's settings are
read when the client is made.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from tsqp import env
from tsqp.errors import ProtocolError
from tsqp.wire import cores
from tsqp.wire.arena import Arena
from tsqp.wire.doorbell import Doorbell, futex_usable
from tsqp.wire.protocol import Message, unpack

ZMQ_SPIN_S = 0.02  # the client's poll where it sleeps on ZeroMQ, not the wake word (inside an enclave)
OWN_CORES_SPIN_S = 0.02  # the client's poll, without a nap, where the server computes on cores it does not run on
DOORBELL_POLL_MS = 5  # waiting for a doorbell reply: how often the slot is looked at between ZeroMQ polls

Received = tuple[Message, int, float]  # a reply, bytes received in frames, seconds to unpack it


@dataclass
class InFlight:
    """A request sent and not yet answered: what its wait (which doorbell flag) and the statistics need."""

    method: str
    start: float  # perf_counter when submit began
    serialize_s: float
    sent: int  # bytes
    sent_at: float  # perf_counter when the request was out
    flag: int = 0  # the doorbell flag its reply will carry, when it was rung there (0: by ZeroMQ)
    bell: Doorbell | None = None  # the doorbell it was rung on
    discarded: bool = False  # given up on: its reply is dropped when it comes, then its region is free
    lost: str | None = None  # sent on a connection that went down: no reply will come


class DoorbellWait:
    """The client's side of waiting in the doorbell's slot, and what it learned of reply times."""

    def __init__(self):
        self.futex = futex_usable()  # a rung request's wait sleeps on the arena's wake word
        spin_ms = env.read("TSQP_DOORBELL_SPIN_MS")
        self.chosen = spin_ms is not None  # the user chose the spin: the server's cores do not change it
        self.spin_s = (spin_ms or 0.0) / 1000  # polls the slot this long, then sleeps
        self.zmq_spin_s = ZMQ_SPIN_S  # polls this long where it sleeps on ZeroMQ instead (no futex)
        self.nap_asked = env.read("TSQP_DOORBELL_NAP")  # the nap, where the client does not poll instead
        self.nap = self.nap_asked  # sleeps until a reply is nearly due, then polls
        self.slice_s = DOORBELL_POLL_MS / 1000  # the longest sleep between looks at the link
        self.reply_due: dict[str, float] = {}  # per method: seconds from a rung request to its reply, lately
        self.replies = 0  # replies that came by the doorbell

    def adapt(self, server: dict) -> None:
        """After the server attached the arena, from what its reply says of where it computes (cores.py).
        Where its products run apart from this client, polling takes nothing the server wants, and a client
        that slept pays the futex wake and wakes on cold caches (a round trip's cost beyond a 2 ms compute
        68-95 us asleep against 7-23 polling: bench/cold_wake.py, docs/benchmarks.md): it polls
        OWN_CORES_SPIN_S, without a nap, before it sleeps. Otherwise (two processes on the same cores) it does
        not poll at all."""
        if self.chosen:
            return
        own = cores.apart(server)
        self.spin_s = OWN_CORES_SPIN_S if own else 0.0
        self.nap = self.nap_asked and not own

    def early(self, request_id: int, request: InFlight, arena: Arena) -> Received | None:
        """Naps until the reply is nearly due, then polls for it: the reply if it came by then."""
        if self.futex and self.nap:
            self._nap(request)
        until = time.perf_counter() + (self.spin_s if self.futex else self.zmq_spin_s)
        while time.perf_counter() < until:
            if (reply := self.reply(request_id, request, arena)) is not None:
                self.learn(request)
                return reply
            os.sched_yield()  # the core goes to any thread that has work (the server's, on a shared host)
        return None

    def _nap(self, request: InFlight) -> None:
        """Sleeps on the wake word until spin_s / 2 before the reply is due by this method's last replies.
        A reply that comes sooner wakes it; it lasts no longer than a slice, so a dead server is noticed."""
        due = self.reply_due.get(request.method)
        if due is None:
            return
        bell = request.bell
        seq = bell.wake_seq()
        nap = request.sent_at + due - self.spin_s / 2 - time.perf_counter()
        if nap > 0 and bell.reply(request.flag) is None:
            bell.sleep(seq, min(nap, self.slice_s))

    def learn(self, request: InFlight) -> None:
        """Updates when this method's replies are due (a mean over the last few: one slow reply, a batch
        that waited for a companion, moves it only half way)."""
        seconds = time.perf_counter() - request.sent_at
        due = self.reply_due.get(request.method)
        self.reply_due[request.method] = seconds if due is None else (due + seconds) / 2

    def reply(self, request_id: int, request: InFlight, arena: Arena) -> Received | None:
        """The reply in the slot, once its flag is up (copied out: the slot is untrusted memory)."""
        raw = request.bell.reply(request.flag)
        if raw is None:
            return None
        start = time.perf_counter()
        reply = unpack([raw], arena)
        if reply.header.get("id") != request_id:
            raise ProtocolError(f"the doorbell's reply answers request {reply.header.get('id')!r}, not {request_id}")
        self.replies += 1
        return reply, len(raw), time.perf_counter() - start
