"""Connects a TEE model to a server: one it starts itself (the default) or one given by --connect."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tsqp.model.checkpoint import Checkpoint
from tsqp.stats import Stats
from tsqp.tee.forward import TeeModel
from tsqp.tee.launcher import ServerProcess
from tsqp.tuning import keep_freed_memory
from tsqp.wire.curve import client_keys
from tsqp.wire.transport import Client, use_shm


@dataclass
class RunOptions:
    model_dir: Path
    connect: str | None = None  # None: start a private server subprocess
    device: str = "cpu"  # for the private server
    dtype: str = "float32"  # for the private server
    timeout_s: float = 600.0  # per request
    start_timeout_s: float = 600.0
    transport: str = "auto"  # shm | zmq | auto: shm when the server is on this host
    arena_name: str | None = None  # a fixed arena file name (Gramine lists it in sgx.allowed_files)
    curve_keys: Path | None = None  # CurveZMQ key folder (tsqp keys DIR); the private server gets it too
    verify: bool = True  # Freivalds-check every server result (verify.VerifiedOps)
    doorbell: bool = True  # lone small requests through the arena's doorbell instead of ZeroMQ (shm only)
    pipeline: str = "auto"  # on | off | auto: attention chunks overlap TEE and server when the server is a GPU


@contextmanager
def open_client(options: RunOptions, stats: Stats | None = None) -> Iterator[Client]:
    """A Client of the given server, or of a private one that stops on exit (Ctrl-C too)."""
    stats = stats or Stats()
    curve = client_keys(options.curve_keys) if options.curve_keys else None  # checked before a server starts
    with ExitStack() as stack:
        if options.connect:
            endpoint, alive = options.connect, None
        else:
            server = stack.enter_context(
                ServerProcess(
                    str(options.model_dir),
                    options.device,
                    options.dtype,
                    start_timeout_s=options.start_timeout_s,
                    curve_keys=options.curve_keys,
                )
            )
            endpoint, alive = server.endpoint, server.exit_reason
        client = stack.enter_context(
            Client(
                endpoint,
                timeout_s=options.timeout_s,
                stats=stats,
                alive=alive,
                shm=use_shm(options.transport, endpoint),
                arena_name=options.arena_name,
                curve=curve,
                doorbell=options.doorbell,
            )
        )
        yield client


@contextmanager
def open_model(options: RunOptions, stats: Stats | None = None) -> Iterator[TeeModel]:
    """A TeeModel attached to a server that runs the same model (its fingerprint is checked)."""
    stats = stats or Stats()
    Checkpoint(options.model_dir)  # a missing or broken model folder is reported before a server starts
    with open_client(options, stats) as client:
        tee = TeeModel(options.model_dir, client, stats, verify=options.verify, pipeline=options.pipeline)
        tee.attach()  # computes the verification keys: the start-up allocations are over
        keep_freed_memory()
        yield tee
