"""Connects a TEE model to a server: one it starts itself (the default) or one given by --connect."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from tsqp.errors import TsqpError
from tsqp.model.checkpoint import Checkpoint
from tsqp.model.presets import cache_dir
from tsqp.options import RunOptions
from tsqp.stats import Stats
from tsqp.tee.compose import attach, run_attention, tee_model
from tsqp.tee.forward import TeeModel
from tsqp.tee.launcher import ServerProcess
from tsqp.tee.ops import Link
from tsqp.tee.private import PrivateOptions
from tsqp.tuning import keep_freed_memory, return_start_up_copies
from tsqp.wire.client import Client
from tsqp.wire.curve import client_keys
from tsqp.wire.transport import check_endpoint, use_shm


@contextmanager
def open_client(
    options: RunOptions, stats: Stats | None = None, server: ServerProcess | None = None
) -> Iterator[Client]:
    """A Client of the given server (`server`, one this process started and shares, or options.connect),
    or of a private one that stops on exit (Ctrl-C too)."""
    stats = stats or Stats()
    curve = client_keys(options.curve_keys) if options.curve_keys else None  # checked before a server starts
    with ExitStack() as stack:
        if server is None and options.connect:
            endpoint, alive = options.connect, None
        else:
            if server is None:
                server = stack.enter_context(start_server(options))
            endpoint, alive = server.endpoint, server.exit_reason
        client = stack.enter_context(
            Client(
                endpoint,
                timeout_s=options.timeout_s,
                connect_timeout_s=options.connect_timeout_s,
                stats=stats,
                alive=alive,
                shm=use_shm(options.transport, endpoint),
                arena_name=options.arena_name,
                curve=curve,
                doorbell=options.doorbell,
            )
        )
        yield client


def start_server(options: RunOptions) -> ServerProcess:
    """The private server a client without --connect runs (enter it to start it; it stops on exit)."""
    return ServerProcess(
        str(options.model_dir),
        options.device,
        options.dtype,
        start_timeout_s=options.start_timeout_s,
        curve_keys=options.curve_keys,
        extra_args=["--private-only"] if options.private else [],
    )


@contextmanager
def open_model(
    options: RunOptions,
    stats: Stats | None = None,
    server: ServerProcess | None = None,
    wrap: Callable[[Link], Link] | None = None,
) -> Iterator[TeeModel]:
    """A TeeModel attached to a server that runs the same model (its fingerprint is checked).

    server: a running `start_server(options)` that several models share (the API's slots).
    wrap: a link around the client that the model uses instead (a recorder: measure/replay.py)."""
    stats = stats or Stats()
    Checkpoint(options.model_dir)  # a missing or broken model folder is reported before a server starts
    return_start_up_copies()  # until keep_freed_memory, once the keys (and pads) are made
    with ExitStack() as stack:
        private = stack.enter_context(private_options(options, stats)) if options.private else None
        client = stack.enter_context(open_client(options, stats, server))
        tee = tee_model(
            options.model_dir,
            wrap(client) if wrap else client,
            stats,
            verify=options.verify,
            pipeline=options.pipeline,
            private=private,
            attention=run_attention(options.attention, options.private),
        )
        if private is not None:
            stack.callback(tee.ops.close)
        attach(tee)  # computes the verification keys (and calibrates): the start-up allocations are over
        keep_freed_memory()
        yield tee


@contextmanager
def private_options(options: RunOptions, stats: Stats) -> Iterator[PrivateOptions]:
    """Private mode's options, with the link to the helper server when one is named."""
    pads_dir = options.pads_dir or cache_dir() / "pads"
    if options.helper is None:
        yield PrivateOptions(pads_dir=pads_dir, pad_bits=options.pad_bits)
        return
    check_endpoint(options.helper)
    if options.helper.startswith("tcp://") and options.helper_curve_keys is None:
        raise TsqpError(
            "a helper on tcp:// receives the pad seeds: give --helper-curve-keys DIR (its server.key and your "
            "client keys, from `tsqp keys`) so the link is encrypted and the helper authenticated"
        )
    curve = client_keys(options.helper_curve_keys) if options.helper_curve_keys else None
    with Client(
        options.helper,
        timeout_s=options.timeout_s,
        connect_timeout_s=options.connect_timeout_s,
        stats=stats,
        curve=curve,
    ) as helper:
        helper.call("ping")  # a helper that is not there is reported now, not in the first layer
        yield PrivateOptions(pads_dir=pads_dir, helper=helper, pad_bits=options.pad_bits)
