"""Connects a TEE model to a server: one it starts itself (the default) or one given by --connect."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tsqp.launcher import ServerProcess
from tsqp.model import TeeModel
from tsqp.stats import Stats
from tsqp.transport import Client


@dataclass
class RunOptions:
    model_dir: Path
    connect: str | None = None  # None: start a private server subprocess
    device: str = "cpu"  # for the private server
    dtype: str = "float32"  # for the private server
    timeout_s: float = 600.0  # per request
    start_timeout_s: float = 600.0


@contextmanager
def open_model(options: RunOptions, stats: Stats | None = None) -> Iterator[TeeModel]:
    """A TeeModel attached to a verified-fingerprint server; the private server stops on exit (Ctrl-C too)."""
    stats = stats or Stats()
    with ExitStack() as stack:
        if options.connect:
            endpoint, alive = options.connect, None
        else:
            server = stack.enter_context(ServerProcess(str(options.model_dir), options.device, options.dtype,
                                                       start_timeout_s=options.start_timeout_s))
            endpoint, alive = server.endpoint, server.exit_reason
        client = stack.enter_context(Client(endpoint, timeout_s=options.timeout_s, stats=stats, alive=alive))
        tee = TeeModel(options.model_dir, client.call, stats)
        tee.attach()
        yield tee
