"""Where a request's tensors lie in the client's shared-memory arena, and its drafts.

Each request in flight owns a region of the arena (arena.Regions): its inputs from the region's start,
its results from `reply_at` on. The client creates the arena with its first placed request, grows it
(the same file, mapped anew) when a request needs more room than is free, and has the server attach it
again after each growth or new connection. Mappings from before a growth are kept while replies may view
them. A `Draft` is a request's inputs made before they are filled: views of its region, so nothing is
copied when it is sent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tsqp.wire.arena import INITIAL_BYTES, Arena, Regions, align
from tsqp.wire.doorbell import Doorbell
from tsqp.wire.doorbell import supported as doorbell_supported
from tsqp.wire.protocol import Message


@dataclass
class Draft:
    """A request's input tensors, made before they are filled: in the arena when the client has one
    (filled in place, nothing copied when it is sent), private tensors otherwise. `Client.submit(...,
    draft=)` sends it; `Client.drop` gives it up."""

    id: int
    tensors: list[torch.Tensor]
    offsets: list[int] = field(default_factory=list)  # where the tensors lie in the arena
    reply_at: int | None = None  # where the results go in the arena (None: not in the arena)


class Placement:
    """The client's arena (shm: bulk tensors through it; else none), its regions, retired mappings and
    open drafts, and its doorbell when the server polls it. attach(args): the `attach_arena` call."""

    def __init__(self, shm: bool, arena_name: str | None, doorbell: bool, attach: Callable[[dict], Message]):
        self.use_shm = shm  # bulk tensors through a shared-memory arena (same host only)
        self.arena_name = arena_name
        self.attach = attach
        self.arena: Arena | None = None
        self.attached = False  # the server behind the current connection maps self.arena
        self.regions = Regions()  # the arena's regions of requests in flight (after the doorbell)
        self.retired: list[Arena] = []  # mappings before the arena grew, kept while replies may view them
        self.drafts: set[int] = set()  # drafts made and neither submitted nor dropped
        self.use_doorbell = doorbell
        self.doorbell: Doorbell | None = None  # the arena's control block, when the server polls it

    def detach(self) -> None:
        """The server must attach the arena again (a new connection, the doorbell turned on or off)."""
        self.attached, self.doorbell = False, None

    def ensure(self, needed: int, request_id: int | None = None) -> int | None:
        """An arena the server has attached, with a region of `needed` bytes for the request (its start)
        when a request id is given."""
        region = request_id is not None
        start = self.regions.allocate(request_id, needed, self.arena.size) if region and self.arena else None
        if self.arena is None:
            self.arena = Arena.create(self.arena_name, max(align(self.regions.base + needed), INITIAL_BYTES))
            self.attached = False
        elif region and start is None:  # the same file, grown: regions in flight keep their bytes; replies
            self.retired.append(self.arena)  # already unpacked view the old mapping, kept until none is in flight
            self.arena = self.arena.grown(self.regions.end() + needed)
            self.attached = False
        if region and start is None:
            start = self.regions.allocate(request_id, needed, self.arena.size)
        if not self.attached:  # a new arena, or a new connection (a restarted server)
            self.doorbell = None
            ring = self.use_doorbell and doorbell_supported()
            reply = self.attach({"name": self.arena.name, "size": self.arena.size, "doorbell": ring})
            if ring and reply.args.get("doorbell") is True:
                self.doorbell = Doorbell(self.arena.map)
            self.attached = True
        return start

    def place(self, request_id: int, tensors: list[torch.Tensor], reply_bytes: int, args: dict) -> list[torch.Tensor]:
        """Copies request tensors into a region of the arena and reserves room there for the results."""
        sizes = [align(t.nbytes) for t in tensors]
        start = self.ensure(sum(sizes) + align(reply_bytes), request_id)
        placed, offset = [], start
        for tensor, size in zip(tensors, sizes, strict=True):
            view = self.arena.view(tensor.dtype, tensor.shape, offset)
            view.copy_(tensor)
            placed.append(view)
            offset += size
        args["reply_at"] = offset
        return placed

    def draft(self, request_id: int, specs: list[tuple[torch.dtype, tuple[int, ...]]], reply_bytes: int) -> Draft:
        """Input tensors (dtype, shape): views of a region reserved for the request, or private tensors."""
        if not self.use_shm:
            draft = Draft(request_id, [torch.empty(shape, dtype=dtype) for dtype, shape in specs])
        else:
            sizes = [align(math.prod(shape) * dtype.itemsize) for dtype, shape in specs]
            try:
                offset = self.ensure(sum(sizes) + align(reply_bytes), request_id)
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

    def drafted(self, draft: Draft, args: dict) -> list[torch.Tensor]:
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

    def release_retired(self, busy: bool) -> None:
        """Unmaps the arena's mappings from before it grew once nothing can view them: no reply in flight
        (busy), no draft being filled (a reply already waited for is done with by the rules of `Client`)."""
        if not busy and not self.drafts:
            for arena in self.retired:
                arena.release()
            self.retired.clear()

    def bytes_in_arena(self, tensors: list[torch.Tensor]) -> int:
        """Bytes of these tensors that lie in the arena (sent without a ZeroMQ frame)."""
        return sum(t.nbytes for t in tensors if self.arena.offset_of(t) is not None)

    def close(self) -> None:
        for arena in self.retired:
            arena.release()
        if self.arena is not None:
            self.arena.unlink()
            self.arena = None
