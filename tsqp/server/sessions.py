"""The server's sessions: each client's KV cache, who owns it, and the books that bound them.

A session is opened by one client connection and only that connection may use it. Rank 0 keeps the
books (owner, how far each layer's cache is filled, when it was last used); every rank holds its share of
the cache itself (its kv heads). The caches together stay under max_cache_bytes per rank; a session idle
for idle_timeout_s is closed, and under memory pressure one idle for EVICT_IDLE_S gives way sooner.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import torch

from tsqp.errors import TsqpError

DEFAULT_MAX_CACHE_BYTES = 8 << 30
DEFAULT_IDLE_TIMEOUT_S = 600.0
EVICT_IDLE_S = 30.0  # when the cache is full, sessions idle this long give way to a new one (a killed client's)


@dataclass
class Session:
    """One client's KV cache on this rank, and rank 0's books about it."""

    owner: bytes  # the client connection that opened it; nobody else can use it (rank 0)
    keys: torch.Tensor  # (layers, kv_heads, capacity, head_dim), post-RoPE, as sent by the TEE (this rank's heads)
    values: torch.Tensor  # (layers, kv_heads, capacity, head_dim), never leave the server
    id: bytes = b""
    filled: list[int] = field(default_factory=list)  # per layer: positions holding keys and values (rank 0)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class Sessions(dict[bytes, Session]):
    """The open sessions by id, with the cap on their caches and the idle timeout."""

    def __init__(self, max_cache_bytes: int, idle_timeout_s: float):
        super().__init__()
        self.max_cache_bytes = max_cache_bytes
        self.idle_timeout_s = idle_timeout_s

    def owned(self, peer: bytes, session_id) -> Session:
        """The session, if `peer` opened it; it counts as used now."""
        session = self.get(session_id) if isinstance(session_id, bytes) else None
        if session is None or not secrets.compare_digest(session.owner, peer):
            raise TsqpError("unknown or expired session (sessions are bound to the connection that opened them)")
        session.last_used = time.monotonic()
        return session

    def cache_bytes(self) -> int:
        return sum(session.nbytes for session in self.values())

    def expired(self) -> list[bytes]:
        """The sessions idle for longer than idle_timeout_s: to be closed."""
        now = time.monotonic()
        return [sid for sid, session in self.items() if now - session.last_used > self.idle_timeout_s]

    def evictable(self) -> list[bytes]:
        """Sessions idle for EVICT_IDLE_S or more, least recently used first: they give way to a new one.

        ZeroMQ does not tell the server which client went away, so a client killed with -9 leaves its
        sessions behind until the idle timeout; under memory pressure they give way sooner."""
        now = time.monotonic()
        return [
            sid for _, sid in sorted((s.last_used, sid) for sid, s in self.items() if now - s.last_used >= EVICT_IDLE_S)
        ]

    def check_room(self, capacity: int, nbytes: int) -> None:
        """A new session's cache of nbytes fits under the cap, or a one-line error says it does not."""
        in_use = self.cache_bytes()
        if in_use + nbytes > self.max_cache_bytes:
            raise TsqpError(
                f"KV cache memory cap reached: a {capacity}-token session needs {nbytes / 2**20:.1f} MiB, "
                f"{in_use / 2**20:.1f} of {self.max_cache_bytes / 2**20:.1f} MiB are in use"
            )
