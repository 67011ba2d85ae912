"""Which waiting requests run next, and which run together: rounds over per-client queues.

Each client's requests wait in its own queue and run in its order. A round serves what is waiting when
it starts, its groups in the arrival order of their first request: a group is the earliest head of a
queue, joined by the heads of the other clients' queues with the same batch key (Engine.batch_key: the
same op and layer), which then run as one product (Engine.handle_batch). A batchable request whose
companions are on their way (rendezvous.py) is held instead, at most hold_s from its first hold: it, and
the queues of its group's clients, wait for a later round.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from tsqp.server.rendezvous import Rendezvous, default_hold_s
from tsqp.wire.arena import Arena
from tsqp.wire.doorbell import Doorbell


@dataclass
class Pending:
    """A request waiting to be served: who sent it, its header bytes and frames, the doorbell it was rung on."""

    peer: bytes
    raw: bytes
    body: list
    bell: Doorbell | None = None
    flag: int = 0
    request: object = None  # parsed once (a held request is looked at again in later rounds)
    arena: Arena | None = None  # the peer's arena when it was parsed: its tensors may view it
    key: tuple | None = None  # its batch key (None: it runs alone)
    held_until: float = 0.0  # perf_counter until which it may wait for a companion (0: not held yet)
    arrival: int = 0  # its place in the order the server took requests in


class Scheduler:
    """The clients' queues, and the rounds served from them."""

    def __init__(self, hold_s: float | None = None):
        """hold_s: how long a batchable request may wait for a companion on its way (0: never)."""
        self.rendezvous = Rendezvous(default_hold_s() if hold_s is None else hold_s)
        self.queues: dict[bytes, deque[Pending]] = {}  # per client connection, in its order
        self.arrivals = itertools.count()

    def add(self, item: Pending) -> None:
        item.arrival = next(self.arrivals)
        self.queues.setdefault(item.peer, deque()).append(item)

    def waiting(self) -> set[bytes]:
        """The clients with requests waiting (held ones, between rounds)."""
        return {peer for peer, queue in self.queues.items() if queue}

    def round(self) -> Iterator[list[Pending]]:
        """The groups to run now, each taken off its queues as it is yielded; the caller runs it and calls
        `answered` before asking for the next."""
        queued = {peer: None if q[0].held_until else q[0].key for peer, q in self.queues.items() if q}
        deferred: set[bytes] = set()  # clients held this round
        while heads := [q[0] for peer, q in self.queues.items() if q and peer not in deferred]:
            first = min(heads, key=lambda item: item.arrival)
            group = [first]
            if first.key is not None:
                others = [h for h in heads if h is not first and h.key == first.key]
                group += sorted(others, key=lambda item: item.arrival)
                if self.hold(first, first.key, queued):
                    peers = {item.peer for item in group}
                    deferred |= peers
                    queued.update(dict.fromkeys(peers))  # held: not counted on by the requests after it
                    continue
            for item in group:
                self.queues[item.peer].popleft()
            yield group
        self.queues = {peer: queue for peer, queue in self.queues.items() if queue}

    def answered(self, group: list[Pending], now: float) -> None:
        for item in group:
            if item.key is not None:
                self.rendezvous.answered(item.peer, item.key, now)

    def hold(self, item: Pending, key: tuple, queued: dict[bytes, tuple | None]) -> bool:
        """Whether this request waits (again) for a companion on its way: at most hold_s from its first hold."""
        now = time.perf_counter()
        if item.held_until and now >= item.held_until:
            return False
        if not self.rendezvous.coming(key, item.peer, queued, now):
            return False
        if not item.held_until:
            item.held_until = now + self.rendezvous.hold_s
        return True

    def hold_deadline(self) -> float:
        """Until when the loop polls: the earliest end of a hold (a held client's later requests have none)."""
        return min((p.held_until for q in self.queues.values() for p in q if p.held_until), default=0.0)
