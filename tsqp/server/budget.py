"""The server's memory budget: every allocation a message can size is checked against it before it is made.

A request names sizes: its tokens, a session's capacity, an arena's size, a pad's rows, the rows of several
clients batched into one product. Once a request is validated, its op reserves here what it will allocate
(its results and intermediates, estimated from those sizes, never less than they take); a request that does
not fit is refused in one line, with nothing allocated, and the server goes on. What lasts is counted as in
use: the resident memory once the model is loaded (weights, their packed copies, the libraries), the
sessions' KV caches, private mode's float64 weights, the clients' mapped arenas. A batch's requests reserve
in turn, so the group fits as a whole. The budget is `tsqp serve --max-memory-mb` (default: DEFAULT_FRACTION
of the host's memory, or of its cgroup's limit when lower).

What arrives before any header is read is bounded apart: each ZeroMQ message part by the socket's
MAXMSGSIZE (frames_bound, 1/64 of the budget), so a message of MAX_TENSORS tensors and its header stays
within the room kept for the message being received (`incoming`, about 14% of the budget). Messages queued
behind it are bounded per connection by ZeroMQ's high-water mark, not here: that is what CurveZMQ's
allow-list is for. A tensor-parallel server's followers allocate the shares of what rank 0 reserved.

The server keeps freed memory mapped (tuning.keep_freed_memory: page faults cost more than the copies they
slow down), so its RSS can hold more than what is in use. Before an allocation of TRIM_CHECK_BYTES or more
that would take the RSS past the budget, the free pages are given back first (malloc_trim).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tsqp.errors import TsqpError
from tsqp.tuning import release_freed_memory
from tsqp.wire.protocol import MAX_MESSAGE_BYTES, MAX_TENSORS

DEFAULT_FRACTION = 0.8  # of the host's memory: the rest for the TEE process, the OS, the page cache
FRAME_FRACTION = 64  # a message part may take 1/64 of the budget: 300 MB of a 19 GB one (a 2048-token P is 268)
SMALL_BYTES = 64 << 10  # a decode step's reservations: counted, not checked (the room kept for a message covers them)
TRIM_CHECK_BYTES = 16 << 20  # reservations this large look at the RSS, and trim the heap when it would pass
MIB = 1 << 20


class MemoryBudgetExceeded(TsqpError):
    """A request would take the server past its memory budget."""


def host_memory() -> int:
    """The memory this process may use: MemTotal, or its cgroup's limit when lower (Linux); 0 when unknown."""
    sizes = []
    try:
        with open("/proc/meminfo") as f:
            sizes += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:")]
    except (OSError, ValueError, IndexError):
        pass
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(limit).read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 60:  # "max", or v1's huge number: no limit
            sizes.append(int(value))
    return min(sizes, default=0)


def resident_bytes() -> int:
    """This process's resident memory now (Linux); 0 where /proc cannot tell."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def default_limit() -> int:
    return int(DEFAULT_FRACTION * host_memory()) or MAX_MESSAGE_BYTES


class Budget:
    def __init__(self, limit_bytes: int | None = None):
        self.limit = limit_bytes or default_limit()
        self.base = 0  # resident once the model is loaded (settle)
        self.counters: dict[str, Callable[[], int]] = {}  # what lasts: KV caches, float64 weights, arenas
        self.reserved = 0  # the working memory of the request (or batch) being served
        self.incoming = (MAX_TENSORS + 1) * self.frames_bound()  # room for the message being received

    def settle(self) -> None:
        """After loading: the resident memory, less what the counters count, is the base every request adds to
        (count() what lasts before settling); a model that does not fit leaves no room for any request, and is
        refused at start."""
        counted = sum(nbytes() for nbytes in self.counters.values())  # made at load (a private server's float64
        # weights) and already resident: counted once, by their counter
        self.base = max(0, resident_bytes() - counted)
        if self.in_use() > self.limit:
            raise MemoryBudgetExceeded(
                f"the loaded model takes {(self.base + counted) / MIB:.0f} MiB and a message "
                f"{self.incoming / MIB:.0f} MiB, over the server's memory budget of {self.limit / MIB:.0f} MiB: "
                "raise --max-memory-mb"
            )

    def count(self, name: str, nbytes: Callable[[], int]) -> None:
        """Memory that lasts beyond a request, counted as in use (nbytes() when asked)."""
        self.counters[name] = nbytes

    def in_use(self) -> int:
        return self.base + self.incoming + sum(nbytes() for nbytes in self.counters.values()) + self.reserved

    def reserve(self, nbytes: int, what: str) -> None:
        """Room for nbytes more until release(); a MemoryBudgetExceeded that says so when there is none."""
        if nbytes < SMALL_BYTES:  # the decode path's: a check each would cost more than it bounds
            self.reserved += nbytes
            return
        in_use = self.in_use()
        if in_use + nbytes > self.limit:
            raise MemoryBudgetExceeded(
                f"{what} needs {nbytes / MIB:.1f} MiB, and the server's memory budget of {self.limit / MIB:.0f} "
                f"MiB (--max-memory-mb) has {max(0, self.limit - in_use) / MIB:.1f} MiB left"
            )
        self.reserved += nbytes
        if nbytes >= TRIM_CHECK_BYTES and resident_bytes() + nbytes > self.limit:
            release_freed_memory()  # what earlier requests freed and the heap kept

    def reserve_rows(self, rows: int, width: int, dtype, what: str, x=None) -> None:
        """A (rows, width) result of `dtype`, twice: the linear kernels that beat torch.matmul on a CPU (oneDNN,
        the weight on the left) compute into a tensor of their own and copy it into the result
        (kernels.linear_into), and which kernel runs depends on the host's plan; the budget must not. And the
        input x again, which a batch concatenates."""
        self.reserve(2 * rows * width * dtype.itemsize + (x.nbytes if x is not None else 0), what)

    def release(self) -> None:
        """The request (or batch) is answered: its working memory is free again."""
        self.reserved = 0

    def report(self) -> dict[str, int]:
        """For ping: the budget and what is in use, in bytes."""
        lasting = {name: nbytes() for name, nbytes in self.counters.items()}
        return {"budget": self.limit, "loaded": self.base, **lasting, "resident": resident_bytes()}

    def frames_bound(self) -> int:
        """The largest ZeroMQ message part the server takes: a message's parts together stay under the budget."""
        return max(1 << 20, min(MAX_MESSAGE_BYTES, self.limit // FRAME_FRACTION))
