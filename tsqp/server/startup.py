"""Starting a server: `tsqp serve` loads the model (with a progress line), joins the tensor-parallel ranks, and
serves until SIGINT/SIGTERM.

Rank 0 loads its share with a progress bar on a terminal (a line per tenth on a pipe), waits for every
rank to have loaded its own, then prints the line a user or a launcher waits for ("listening on ...")
and runs the socket loop (loop.py); the other ranks follow it (parallel.follow).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from tsqp.model.config import ModelConfig
from tsqp.server.engine import Engine
from tsqp.server.kernel_tuning import describe
from tsqp.server.loop import Server
from tsqp.server.parallel import HEARTBEAT, RankFailure, Ranks, follow, follower_command, join
from tsqp.server.sharded import shards
from tsqp.tuning import keep_freed_memory
from tsqp.wire.curve import CurveKeys
from tsqp.wire.protocol import PROTOCOL_VERSION


@contextmanager
def loading_progress(label: str):
    """A progress callback (done, total): a live bar on a terminal, else a line per tenth after the first
    second (a private server's stderr is a pipe the client relays to the user)."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(label, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    shown, started = [-1], time.perf_counter()

    def report(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth > shown[0] and time.perf_counter() - started > 1.0:  # quiet for a model that loads at once
            shown[0] = tenth
            print(f"{label}: {10 * tenth}% of {total} tensors", file=sys.stderr, flush=True)

    yield report


def run_server(
    model_dir: str,
    endpoint: str,
    device: str,
    dtype: str,
    curve: CurveKeys | None = None,
    tensor_parallel: int = 1,
    hold_s: float | None = None,
    **engine_options,
) -> None:
    """Loads the model and serves until SIGINT/SIGTERM. tensor_parallel > 1: this process is one rank of a
    tensor-parallel server (parallel.join: rank 0 of this host, which starts the others, or a torchrun
    worker); rank 0 serves, the others follow it."""
    started = time.perf_counter()
    ranks = Ranks(device=device)
    if tensor_parallel > 1:
        shards(ModelConfig.from_model_dir(model_dir), tensor_parallel)  # an impossible split: before any rank
        private_only = engine_options.get("private_only", False)
        ranks = join(tensor_parallel, device, follower_command(model_dir, device, dtype, tensor_parallel, private_only))
    lost = False
    try:
        if not ranks.leader:
            follow(Engine(model_dir, device=str(ranks.device), dtype=dtype, ranks=ranks, **engine_options))
            return
        with loading_progress(f"tsqp server: loading {model_dir}") as progress:
            engine = Engine(model_dir, str(ranks.device), dtype, progress=progress, ranks=ranks, **engine_options)
        ranks.send(HEARTBEAT, {})  # waits for every rank to have loaded its share; one that failed is named
        keep_freed_memory()  # after loading: the weights' transient copies are not kept
        server = Server(engine, endpoint, curve=curve, hold_s=hold_s)
        split = f", {tensor_parallel} tensor-parallel ranks" if tensor_parallel > 1 else ""
        print(
            f"tsqp server: {model_dir} on {ranks.device} ({dtype}{split}), loaded in "
            f"{time.perf_counter() - started:.1f} s, listening on {endpoint}{' (CURVE)' if curve else ''}, "
            f"protocol v{PROTOCOL_VERSION}",
            file=sys.stderr,
            flush=True,
        )
        if engine.kernel_timings:
            print(
                f"tsqp server: linear kernels planned in {engine.tuning_s:.1f} s (figures kept in "
                f"{engine.kernel_store.path}): {describe(engine.kernel_timings)}",
                file=sys.stderr,
                flush=True,
            )
        server.serve_forever()
    except RankFailure:
        lost = True
        raise
    finally:
        if lost:
            ranks.abort()  # out of step: the ranks still running are stopped, not sent a last step
        else:
            ranks.close()
