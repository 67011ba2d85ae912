"""When a batchable request waits for companions: only when another client is known to be on its way.

Batching what is queued when the loop looks (Engine.handle_batch) shares few products on a small machine: the
clients' TEE steps between two requests take different times, so their requests for one op arrive a few
milliseconds apart and each runs alone. A request is therefore held, at most `hold_s`, when another
active client will send the same op next, as far as the server can tell from what the clients sent
before: per client, the batch key it was last answered (and when); per key, the key a client sent after
it last time (a decode step's ops follow each other in the same order every step). "Another active
client" is one whose next `depth` keys, along what followed before, include this one, counted from its
queued request's key, or, when it has none, from the key it was last answered within `recent_s`. So
two clients a few ops apart come together: the one ahead waits until the other has caught up, and
from then on they run in step. A client that is itself held is not counted on, so two clients never
hold for each other past one round (possible only where a model's cycle of ops is shorter than twice
`depth`: then both run in the next round).

A lone client is never held: there is no other recent client. A client whose companion has stopped
(finished its generation, killed) is held at most once more: after `recent_s` that companion is no
longer recent. Nothing is held on a timer alone: a hold is a prediction from the clients' own order.
"""

from __future__ import annotations

from tsqp import env

DEPTH = 4  # how many keys ahead a companion may be: the ops of one layer (qkv, o_proj, gate_up, down)
RECENT_S = 0.05  # a client answered longer ago than this is not counted on


def default_hold_s() -> float:
    """`tsqp serve --batch-hold-ms`'s default ($TSQP_BATCH_HOLD_MS), in seconds."""
    return env.read("TSQP_BATCH_HOLD_MS") / 1000


class Rendezvous:
    def __init__(self, hold_s: float, depth: int = DEPTH, recent_s: float = RECENT_S):
        self.hold_s, self.depth, self.recent_s = hold_s, depth, recent_s
        self.last: dict[bytes, tuple[tuple, float]] = {}  # per client: its last batch key, when answered
        self.follows: dict[tuple, tuple] = {}  # a batch key -> the one a client sent after it, last time

    def answered(self, peer: bytes, key: tuple, now: float) -> None:
        previous = self.last.get(peer)
        if previous is not None and previous[0] != key:
            self.follows[previous[0]] = key
        self.last[peer] = (key, now)

    def coming(self, key: tuple, peer: bytes, queued: dict[bytes, tuple | None], now: float) -> bool:
        """Whether another client than `peer` will send `key` within depth keys: one with a request queued
        (`queued`: its first one's key; None for one that is itself held or runs alone) or one with none,
        answered within recent_s, counted from the key it was last answered."""
        if self.hold_s <= 0:
            return False
        for other, (last, when) in self.last.items():
            if other == peer:
                continue
            if other in queued:
                k = queued[other]
                if k is None or k == key:  # held itself, or here already (in this product, or after it)
                    continue
            elif now - when > self.recent_s:
                continue
            else:
                k = last
            for _ in range(self.depth):
                k = self.follows.get(k)
                if k is None:
                    break
                if k == key:
                    return True
        return False

    def forget(self, now: float) -> None:
        """Drops the clients not answered for a while (the table stays as small as the active clients)."""
        for peer in [p for p, (_, when) in self.last.items() if now - when > 100 * self.recent_s]:
            del self.last[peer]
