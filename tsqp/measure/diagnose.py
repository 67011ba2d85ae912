"""`tsqp diagnose`: which transport is in use, small round-trip latency and bulk bandwidth (the seed's tool).

Bandwidth is what a result costs the TEE end to end: the request copied in (arena) or sent (zmq), the
server's copy to its reply, and the TEE's copy out of the arena, as `tee.calls.Calls` does it.
"""

from __future__ import annotations

import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from tsqp.options import RunOptions
from tsqp.tee.runner import open_client
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
        doorbell = client.doorbell
        result["ping_by_doorbell"] = doorbell is not None
        result["ping_median_us"], result["ping_p99_us"], rung = _round_trips(client, rounds)
        result["doorbell_share"] = rung / rounds
        if doorbell is not None:  # the same pings by ZeroMQ alone (a server that sleeps on its socket)
            client.ring_doorbell(False)
            result["zmq_ping_median_us"], result["zmq_ping_p99_us"], _ = _round_trips(client, rounds)
            client.ring_doorbell(True)
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
    path = f"doorbell, {100 * result['doorbell_share']:.0f}% rung" if result["ping_by_doorbell"] else "ZeroMQ"
    table.add_row(f"small round trip ({path}), median of {rounds}", f"{result['ping_median_us']:.1f} us")
    table.add_row("small round trip, p99", f"{result['ping_p99_us']:.1f} us")
    if "zmq_ping_median_us" in result:
        table.add_row("small round trip by ZeroMQ alone, median", f"{result['zmq_ping_median_us']:.1f} us")
        table.add_row("small round trip by ZeroMQ alone, p99", f"{result['zmq_ping_p99_us']:.1f} us")
    for size, figures in result["bandwidth"].items():
        table.add_row(
            f"{size} MB there and back", f"{figures['gb_per_s']:.2f} GB/s ({1e3 * figures['round_trip_s']:.1f} ms)"
        )
    console.print(table)
    return result


def _round_trips(client, rounds: int) -> tuple[float, float, int]:
    """(median us, p99 us, how many went by the doorbell) of `rounds` pings."""
    latencies, rung = [], client.doorbell_requests
    for _ in range(rounds):
        start = time.perf_counter()
        client.call("ping")
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    p99 = latencies[int(0.99 * (rounds - 1))]
    return 1e6 * statistics.median(latencies), 1e6 * p99, client.doorbell_requests - rung
