"""Record a run's replies, then replay them at once: the TEE against a server that costs nothing.

The seam is the TEE's link (`ops.Link`: submit, wait, draft, drop, discard). `Recorder` wraps the real
link (a `wire.client.Client`) and keeps a copy of every reply in submission order; `Replayer` is a link
with no server behind it that hands the same replies back, in the same order, as soon as they are waited
for. A run replayed over the same prompt sends the same requests (greedy decoding, the same keys and
weights), so its replies are the real results of its own requests: the checks (Freivalds, the decode
step's checks) still verify them, and what the run's wall time measures is the TEE's own work, the floor
it imposes whatever server sits behind it.

Private mode is not replayed: its pads are fresh each run, so the masked requests, and their replies,
differ from the recorded ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from tsqp.errors import TsqpError
from tsqp.options import RunOptions
from tsqp.stats import Stats
from tsqp.tee.compose import attach, run_attention, tee_model
from tsqp.tee.forward import TeeModel
from tsqp.tee.ops import Draft, Link
from tsqp.tee.remote import LocalDraft
from tsqp.wire.protocol import Message


@dataclass
class Recording:
    """Every request's method and its reply (or the error its wait raised), in submission order."""

    methods: list[str] = field(default_factory=list)
    replies: list[Message | Exception | None] = field(default_factory=list)  # None: never waited for

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for r in self.replies if isinstance(r, Message) for t in r.tensors)


class Recorder:
    """A link that passes every request to `link` and keeps a copy of each reply (`recording`)."""

    def __init__(self, link: Link, recording: Recording | None = None):
        self.link = link
        self.recording = recording or Recording()
        self.index: dict[int, int] = {}  # request id -> its place in the recording

    def submit(self, method: str, *args, **kwargs) -> int:
        """`ops.Link.submit`, passed on."""
        request_id = self.link.submit(method, *args, **kwargs)
        self.index[request_id] = len(self.recording.methods)
        self.recording.methods.append(method)
        self.recording.replies.append(None)
        return request_id

    def wait(self, request_id: int) -> Message:
        at = self.index.pop(request_id)
        try:
            reply = self.link.wait(request_id)
        except Exception as exc:
            self.recording.replies[at] = exc
            raise
        # the reply's tensors may view the arena, rewritten by the next request: keep copies
        self.recording.replies[at] = Message(dict(reply.header), [t.clone() for t in reply.tensors])
        return reply

    def discard(self, request_id: int) -> None:
        self.index.pop(request_id, None)
        self.link.discard(request_id)

    def draft(self, specs: list[tuple[torch.dtype, tuple[int, ...]]], reply_bytes: int = 0) -> Draft:
        return self.link.draft(specs, reply_bytes)

    def drop(self, draft: Draft) -> None:
        self.link.drop(draft)


class Replayer:
    """A link with no server: the recorded replies, in order, each handed out as soon as it is waited for.

    Each call is counted in `stats` as a round trip with no server time. A request other than the one
    recorded at its place (another method) means the run diverged from the recorded one: an error."""

    def __init__(self, recording: Recording, stats: Stats):
        self.recording = recording
        self.stats = stats
        self.next = 0
        self.in_flight: dict[int, tuple[int, float, int]] = {}  # request id -> (place, submitted at, bytes sent)

    def submit(self, method: str, args=None, tensors=(), session=None, reply_bytes: int = 0, draft=None) -> int:
        start = time.perf_counter()
        at = self.next
        if at >= len(self.recording.methods) or self.recording.methods[at] != method:
            recorded = self.recording.methods[at] if at < len(self.recording.methods) else "nothing more"
            raise TsqpError(f"the replayed run asked {method} where the recorded run asked {recorded} (call {at})")
        self.next += 1
        sent = draft.tensors if draft is not None else tensors
        self.in_flight[at + 1] = (at, start, sum(t.nbytes for t in sent))
        return at + 1

    def wait(self, request_id: int) -> Message:
        at, start, sent = self.in_flight.pop(request_id)
        waiting = time.perf_counter()
        reply = self.recording.replies[at]
        if reply is None:
            raise TsqpError(f"the recorded run never waited for call {at} ({self.recording.methods[at]})")
        if isinstance(reply, Exception):
            raise reply
        received = sum(t.nbytes for t in reply.tensors)
        self.stats.rpc(
            self.recording.methods[at],
            sent=sent,
            received=received,
            serialize_s=0.0,
            deserialize_s=0.0,
            server_s=0.0,
            start=start,
            sent_at=start,
            waiting=waiting,
            done=time.perf_counter(),
        )
        return reply

    def discard(self, request_id: int) -> None:
        self.in_flight.pop(request_id, None)

    def draft(self, specs: list[tuple[torch.dtype, tuple[int, ...]]], reply_bytes: int = 0) -> LocalDraft:
        return LocalDraft([torch.empty(shape, dtype=dtype) for dtype, shape in specs])

    def drop(self, draft: Draft) -> None:
        pass


@contextmanager
def open_replayed(options: RunOptions, stats: Stats, recording: Recording) -> Iterator[TeeModel]:
    """A TeeModel in options' (plain) modes over a `Replayer` of recording (no server), attached as
    `open_model` attaches one: the recorded run's first replies are the server's init."""
    attention = run_attention(options.attention, False)  # a replay is of the plain split
    replayer = Replayer(recording, stats)
    tee = tee_model(
        options.model_dir, replayer, stats, verify=options.verify, pipeline=options.pipeline, attention=attention
    )
    attach(tee)
    yield tee
