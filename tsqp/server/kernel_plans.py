"""The measured kernel plans of this host, kept in `$TSQP_CACHE/kernels/` so that every server start on it
takes the same kernels, and the same request gets the same logits after a restart.

kernel_tuning.py times the linear kernels when a CPU server loads. Timings on a shared host are noisy: two
starts that measured anew chose different kernels for some row counts, and the products then summed in
another order (logits differing by up to 1e-3 on a real model). So a shape is measured once per host and
its figures are kept, keyed by what decides them: the CPU model, the torch version, the thread count and
the kernel choice (TSQP_CPU_LINEAR). Later starts read them back; a second server that starts while the
first measures waits for it (an flock on the file) and takes its figures. Delete the file to measure
again (the server's log names it).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from tsqp.model.fetch import cache_root

Figures = dict[int, dict[str, float]]  # row count -> kernel -> ms a GB


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_identity(choice: str) -> dict[str, str]:
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "choice": choice,
    }


class PlanStore:
    """One JSON file per host identity: {"host": {...}, "shapes": {"2048x5632": {"1": {"onednn": ms, ...}}}}."""

    def __init__(self, folder: Path, choice: str):
        self.host = host_identity(choice)
        key = hashlib.sha256(json.dumps(self.host, sort_keys=True).encode()).hexdigest()[:16]
        self.path = folder / f"{key}.json"

    @classmethod
    def default(cls, choice: str) -> PlanStore:
        return cls(cache_root() / "kernels", choice)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Held while a server reads, measures and writes: servers starting together measure once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def load(self) -> dict[str, Figures]:
        """The kept figures by shape; nothing when the file is missing, unreadable or of another host."""
        try:
            data = json.loads(self.path.read_text())
            if data.get("host") != self.host:
                return {}
            return {
                shape: {int(rows): {k: float(v) for k, v in times.items()} for rows, times in figures.items()}
                for shape, figures in data["shapes"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def save(self, shapes: dict[str, Figures]) -> None:
        """Adds these shapes' figures to the file (written whole, then renamed into place)."""
        kept = {**self.load(), **shapes}
        data = {"host": self.host, "shapes": {s: {str(r): t for r, t in f.items()} for s, f in kept.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".plan-")
        with os.fdopen(handle, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(temporary, self.path)
