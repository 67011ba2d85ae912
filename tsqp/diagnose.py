"""`tsqp diagnose`: which transport is in use, small round-trip latency and bulk bandwidth (the seed's tool).

Bandwidth is what a result costs the TEE end to end: the request copied in (arena) or sent (zmq), the
server's copy to its reply, and the TEE's copy out of the arena, as `remote.RemoteOps` does it.
"""

from __future__ import annotations

import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from tsqp.runner import RunOptions, open_client
from tsqp.tuning import keep_freed_memory


def run_diagnose(options: RunOptions, sizes_mb: list[int], rounds: int, console: Console | None = None) -> dict:
    console = console or Console()
    result: dict = {"bandwidth": {}}
    with open_client(options) as client:
        keep_freed_memory()
        result["endpoint"] = client.endpoint
        result["transport"] = "shm" if client.use_shm else "zmq"
        for _ in range(50):  # warm-up: connection, arena
            client.call("ping")
        latencies = []
        for _ in range(rounds):
            start = time.perf_counter()
            client.call("ping")
            latencies.append(time.perf_counter() - start)
        result["ping_median_us"] = 1e6 * statistics.median(latencies)
        result["ping_p99_us"] = 1e6 * sorted(latencies)[int(0.99 * (len(latencies) - 1))]
        for size in sizes_mb:
            payload = torch.rand(size * (1 << 20) // 4)
            times = []
            for _ in range(6):
                start = time.perf_counter()
                reply = client.call("echo", {}, [payload], reply_bytes=payload.nbytes)
                received = reply.tensors[0].clone()  # copy out, as the TEE does before using a result
                times.append(time.perf_counter() - start)
            if not torch.equal(received, payload):
                raise RuntimeError("echo returned different bytes")  # a broken transport, not a user error
            best = min(times[1:])
            result["bandwidth"][size] = {"round_trip_s": best, "gb_per_s": 2 * payload.nbytes / best / 1e9}
    table = Table(title=f"Transport: {result['transport']} ({result['endpoint']})", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(f"small round trip, median of {rounds}", f"{result['ping_median_us']:.1f} us")
    table.add_row("small round trip, p99", f"{result['ping_p99_us']:.1f} us")
    for size, figures in result["bandwidth"].items():
        table.add_row(
            f"{size} MB there and back", f"{figures['gb_per_s']:.2f} GB/s ({1e3 * figures['round_trip_s']:.1f} ms)"
        )
    console.print(table)
    return result
