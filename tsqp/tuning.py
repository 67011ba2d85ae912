"""Process settings for the TEE and the server: memory (applied once their start-up allocations are over)
and threads.

Large tensors are allocated and freed on every call (results copied out of the arena, scores,
activations). glibc serves allocations over 32 MiB with a fresh mmap each time, so every such
tensor pays its page faults again: a 128 MB copy ran at 1.7 GB/s instead of 10 GB/s here. Keeping
them in the heap and not trimming it makes the pages stay mapped between calls. Applied before
start-up (loading weights, computing verification keys), the same setting would keep every transient
copy of a weight: the TEE's peak RSS went from 1.3 to 3.4 GB.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
START_MMAP_BYTES = 1 << 20  # at start, blocks this large or larger are mapped apart (and unmapped when freed)


@functools.cache
def _glibc_function(name: str):
    """A glibc function, or None (musl, macOS). Looked up in the process's own symbols, not through
    ctypes.util.find_library: that starts ldconfig, gcc and ld, which an enclave cannot (Gramine)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def return_start_up_copies() -> bool:
    """For start-up (the weights streamed for the verification keys, the pads, the calibration): blocks of
    START_MMAP_BYTES or more get mappings of their own, unmapped when freed. Left to itself glibc raises its
    threshold to the largest block freed (up to 32 MiB) and the weights' transient copies then land in a heap
    that small long-lived blocks (the keys) fragment: the 1.1B preset's TEE peaked at 1.8 GB instead of 0.5
    once one read of the checkpoint came before the keys. keep_freed_memory replaces it when start-up is over."""
    mallopt = _glibc_function("mallopt")
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, START_MMAP_BYTES))


def keep_freed_memory() -> bool:
    """True when glibc took the settings (a no-op elsewhere, e.g. musl or macOS)."""
    mallopt = _glibc_function("mallopt")
    return mallopt is not None and bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def release_freed_memory() -> bool:
    """Gives the heap's free pages back to the OS (glibc's malloc_trim), where keep_freed_memory kept them: the
    server's memory budget calls it before a large allocation that would otherwise pass the budget in RSS."""
    malloc_trim = _glibc_function("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


SMALL_STEP_ROWS = 8  # a forward of at most this many tokens (a decode step) runs on one TEE thread
# A TEE step of at most this many tokens is short: a decode step, a short prompt (an API request's chat
# turn), a step of the API's batches. A verified one has its checks made at its end, all layers at once
# (step_checks.py); it runs on one TEE thread (forward.TeeModel.threads); `--attention decode` attends it in
# the TEE. SmolLM2 on this 2-core host, a 40-token prompt: checks 88-105 ms call by call, 17-21 ms at the
# end (python bench/short_prompt.py, docs/benchmarks.md). Over a 16-bit wire only a short step sends fused
# calls (tee/calls.py): a longer one's products go apart, where the server's float32 work between them, its
# returned inputs and their checks cost more than the round trips they save (docs/benchmarks.md).
SHORT_STEP_ROWS = 128


@contextmanager
def one_thread(on: bool = True) -> Iterator[None]:
    """Runs the block on one intra-op thread (when on), then restores the count.

    A decode step's TEE ops are small (a row of 2048 to 32,000 values): a second thread gains nothing
    there, and after each parallel region its OpenMP worker spins, waiting for more, on a core the
    server needs when both share the host (docs/benchmarks.md has the decode figures, one thread against two).
    """
    threads = torch.get_num_threads()
    if not on or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
