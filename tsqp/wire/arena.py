"""The shared-memory arena: one file in /dev/shm mapped MAP_SHARED by the TEE client and the server.

Bulk tensors travel through it; ZeroMQ carries only the small headers that say where they lie. The
TEE creates the file and sizes it with ftruncate (the only calls Gramine's `untrusted_shm` mount
allows besides mmap), and grows it when a call needs more room. Its first CONTROL_BYTES are the
doorbell (doorbell.py), which carries lone small requests without ZeroMQ. Each request in flight owns a region
(`Regions`, first fit): its inputs from the region's start, its results from the request's `reply_at`
offset on, each aligned to ALIGN bytes. A region is free again once its reply has been read; with
nothing in flight, the next request starts right after the doorbell, so only the pages of the busiest
moment are ever touched.

The arena is untrusted memory: the server may write there at any time. The TEE copies each result
out before it checks or uses it (calls.Calls does), and never reads a value twice from here.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
from pathlib import Path

import torch

from tsqp.errors import ProtocolError, TsqpError
from tsqp.wire.doorbell import CONTROL_BYTES

SHM_DIR = Path("/dev/shm")
ALIGN = 256
NAME_PATTERN = re.compile(r"^tsqp-[A-Za-z0-9_.-]{1,100}$")
INITIAL_BYTES = 16 << 20
VIEWS_KEPT = 512  # views a mapping keeps by (dtype, shape, offset): a decode step asks for the same ones each token


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def shm_available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


class Arena:
    """A mapping of /dev/shm/NAME; `view` gives tensors over its bytes (bounds checked)."""

    def __init__(self, name: str, size: int, create: bool):
        if not NAME_PATTERN.match(name):
            raise ProtocolError(f"arena name {name!r} is not tsqp-[A-Za-z0-9_.-]+")
        self.name = name
        self.path = SHM_DIR / name
        self.owner = create
        flags = os.O_RDWR | (os.O_CREAT if create else 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise TsqpError(f"cannot open shared-memory arena {self.path}: {exc.strerror}") from None
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size < size:
                raise ProtocolError(f"arena {name} is smaller than the declared {size} bytes")
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.size = size
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)  # (size,)
        self.base = self.bytes.data_ptr()
        self.pinned = False
        self.typed: dict[torch.dtype, torch.Tensor] = {}  # the whole arena as each dtype asked for
        self.views: dict[tuple, torch.Tensor] = {}  # (dtype, shape, offset) -> a view made before

    @classmethod
    def create(cls, name: str | None = None, size: int = INITIAL_BYTES) -> Arena:
        sweep_stale()
        return cls(name or f"tsqp-arena-{os.getpid()}-{secrets.token_hex(4)}", size, create=True)

    def view(self, dtype: torch.dtype, shape: list[int] | tuple[int, ...], offset: int) -> torch.Tensor:
        """A tensor over [offset, offset + nbytes); a ProtocolError when that leaves the arena or is unaligned.

        The same (dtype, shape, offset) gives the same tensor object (made once: a view costs 5-8 us a call
        on a decode step's cold caches, a lookup well under one): callers never change a view's shape in
        place."""
        key = (dtype, tuple(shape), offset)
        view = self.views.get(key)
        if view is not None:
            return view
        nbytes = dtype.itemsize
        for dim in shape:
            nbytes *= dim
        if offset % ALIGN or offset < 0 or offset + nbytes > self.size:
            raise ProtocolError(
                f"arena range [{offset}, {offset + nbytes}) is unaligned or outside the {self.size}-byte arena"
            )
        typed = self.typed.get(dtype)
        if typed is None:
            typed = self.typed[dtype] = self.bytes.view(dtype)  # the size is a multiple of ALIGN
        strides, step = [], 1
        for dim in reversed(shape):
            strides.append(step)
            step *= dim
        # one call, not a slice and two views: 4 against 12 us, a few times a request
        view = typed.as_strided(key[1], strides[::-1], offset // dtype.itemsize)
        if len(self.views) >= VIEWS_KEPT:
            self.views.clear()
        self.views[key] = view
        return view

    def offset_of(self, tensor: torch.Tensor) -> int | None:
        """Where a tensor lies in this arena, or None when it lies elsewhere."""
        offset = tensor.data_ptr() - self.base
        return offset if 0 <= offset < self.size and tensor.is_contiguous() else None

    def grown(self, needed: int) -> Arena:
        """The TEE side: the same file, resized to hold `needed` bytes (at least doubling), mapped anew.
        This mapping stays valid (and the bytes it holds stay in the file) until it is released."""
        return Arena(self.name, align(max(needed, 2 * self.size)), create=True)

    def pin(self) -> bool:
        """Page-locks the mapping for CUDA (cudaHostRegister), so device-to-host copies land in it by DMA."""
        if not torch.cuda.is_available():
            return False
        error = torch.cuda.cudart().cudaHostRegister(self.base, self.size, 0)
        self.pinned = int(error) == 0
        return self.pinned

    def release(self) -> None:
        """Unmaps it: a tensor viewing it must not be used afterwards (torch.frombuffer does not keep
        the mapping alive; reading such a tensor faults)."""
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.base)
            self.pinned = False
        self.bytes = None
        self.typed.clear()
        self.views.clear()
        try:
            self.map.close()
        except BufferError:
            pass  # a memoryview still exports it; the mapping goes with that view

    def unlink(self) -> None:
        self.release()
        self.path.unlink(missing_ok=True)


class Regions:
    """The arena's regions in use, one per request in flight: [start, end) by request id, from `base` on
    (the bytes before it hold the doorbell)."""

    def __init__(self, base: int = CONTROL_BYTES):
        self.base = align(base)
        self.live: dict[int, tuple[int, int]] = {}

    def allocate(self, key: int, nbytes: int, size: int) -> int | None:
        """The start of the first free gap of nbytes (aligned) in an arena of `size` bytes, else None."""
        nbytes, start = align(nbytes), self.base
        for begin, end in sorted(self.live.values()):
            if begin - start >= nbytes:
                break
            start = max(start, end)
        if start + nbytes > size:
            return None
        self.live[key] = (start, start + nbytes)
        return start

    def end(self) -> int:
        """Where the last region in use ends: a grown arena must keep [0, end) as it is."""
        return max((end for _, end in self.live.values()), default=self.base)

    def free(self, key: int) -> None:
        self.live.pop(key, None)


def sweep_stale() -> None:
    """Removes arena files of dead processes (the pid is in the default name): a kill -9 leaves no trace."""
    try:
        paths = list(SHM_DIR.glob("tsqp-arena-*-*"))
    except OSError:  # no /dev/shm, or a listing refused (Gramine's untrusted_shm mount)
        return
    for path in paths:
        try:
            pid = int(path.name.split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except (ValueError, PermissionError, IndexError, OSError):
            continue
