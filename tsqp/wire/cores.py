"""Where a server computes, seen from the TEE: on cores the TEE may run on, or apart from them.

A server describes itself in its `init` and `attach_arena` replies: `compute_cores`, the CPUs its products
run on (none on a GPU), and `host`, a digest of this boot's id. Where the products run apart from the TEE
(a GPU, another host, CPUs the TEE may not run on), the TEE can work while it waits, and poll for a reply,
without taking a core the server wants: checks overlap the server's next call (checks.Overlapped), score
chunks go ahead of their use, a long step's TEE ops use every thread, and the doorbell's client polls.
Where both share cores, each of these only makes them compete (docs/benchmarks.md has the figures).

What a server says here only steers the TEE's scheduling, never what it checks or sends.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@functools.cache  # a boot's id does not change while a process lives: read once
def host_id() -> str | None:
    """A digest of this boot's id (the same for every process of one host until it reboots), or None."""
    try:
        return hashlib.sha256(BOOT_ID.read_bytes().strip()).hexdigest()[:16]
    except OSError:  # not Linux, or an enclave's file system
        return None


def compute_cores(device_type: str) -> list[int]:
    """The CPUs a server's products run on: none on a GPU (its launches are a core's small share)."""
    return [] if device_type != "cpu" else sorted(os.sched_getaffinity(0))


def describe(device_type: str) -> dict:
    """What a server says of where it computes (`init` and `attach_arena` replies)."""
    return {"compute_cores": compute_cores(device_type), "host": host_id()}


def apart(info: dict) -> bool:
    """Whether a server that described itself so computes apart from this process: on a device other than the
    CPU, on another host, or on CPUs this process may not run on. A server that says nothing of its cores
    (an older one) shares them, for all the TEE knows."""
    if not str(info.get("device", "cpu")).startswith("cpu"):
        return True
    cores = info.get("compute_cores")
    if not isinstance(cores, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in cores):
        return False
    if not cores:
        return True
    host, here = info.get("host"), host_id()
    if isinstance(host, str) and here is not None and host != here:
        return True
    return set(cores).isdisjoint(os.sched_getaffinity(0))
