"""The command line that starts a `tsqp serve` process, built in one place for everyone who starts one.

A TEE process without --connect starts its private server with it (tee/launcher.py), and rank 0 of a
tensor-parallel server starts the other ranks of its host with it (server/parallel.py). It runs this
interpreter (`sys.executable -m tsqp`), so the child imports the same tsqp as its parent.
"""

from __future__ import annotations

import sys
from pathlib import Path


def serve_command(model_dir: str | Path, device: str, dtype: str, *options: str) -> list[str]:
    """`tsqp serve` for the model on `device` in `dtype`, followed by `options` (further flags, as given)."""
    return [
        sys.executable,
        "-m",
        "tsqp",
        "serve",
        "--model",
        str(model_dir),
        "--device",
        device,
        "--dtype",
        dtype,
        *options,
    ]
