"""What a call's Python costs right after the process waited: in a loop, after a sleep, after a busy wait.

    python bench/cold_wake.py [--rounds 500] [--wait-ms 2]

Times `protocol.parse_header` of a decode call's reply header (what a client does first with a reply) the
way a waiting client meets it: in a warm loop, right after `time.sleep(wait)` (as a client asleep on the
doorbell's futex through the server's compute), and right after busy-waiting as long (as a client that
polls). On a host whose idle cores are given to others (a VM) the code after a sleep runs on cold caches:
the reason `DoorbellWait.adapt` has a client poll where the server computes apart from its cores
(docs/benchmarks.md, "A call's cost beyond compute"). Prints medians and the 90th percentiles, us.
"""

from __future__ import annotations

import argparse
import statistics
import time

import msgpack

from tsqp.wire.protocol import PROTOCOL_VERSION, parse_header


def header() -> bytes:
    """A fused decode call's reply header as a server sends it: its id, timings and two results in the arena."""
    results = [["float32", [1, 576], 65536], ["float32", [1, 3072], 69632]]
    args = {"compute_start": 12345.678, "compute_s": 0.0012}
    return msgpack.packb({"v": PROTOCOL_VERSION, "id": 1234, "ok": True, "args": args, "tensors": results})


def timed(raw: bytes, rounds: int, before) -> list[float]:
    times = []
    for _ in range(rounds):
        before()
        start = time.perf_counter()
        parse_header(raw)
        times.append((time.perf_counter() - start) * 1e6)
    return times


def busy(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--wait-ms", type=float, default=2.0, help="the wait before each parse (a decode compute)")
    args = parser.parse_args()
    raw, wait = header(), args.wait_ms / 1000
    assert len(parse_header(raw)["tensors"]) == 2
    for name, before in [
        ("in a loop", lambda: None),
        ("after a sleep", lambda: time.sleep(wait)),
        ("after a busy wait", lambda: busy(wait)),
    ]:
        times = sorted(timed(raw, args.rounds, before))
        p90 = times[int(0.9 * len(times))]
        print(f"parse_header {name:18s} median {statistics.median(times):6.1f} us   p90 {p90:6.1f} us")


if __name__ == "__main__":
    main()
