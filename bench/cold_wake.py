"""What waiting costs a doorbell client: a round trip asleep on the futex against one polling, and the
first Python after a wait.

    python bench/cold_wake.py [--rounds 500] [--wait-ms 2]

Round trips: a forked process polls the doorbell (as `tsqp serve` does after a reply), busy-waits `wait`
(a decode call's compute), answers each rung request in the slot and wakes the futex; each round trip's time
beyond that wait is printed; the client either sleeps on the wake word (`Doorbell.sleep`, as
it does on cores it shares with the server) or polls the slot (as it does where the server computes apart
from its cores: `DoorbellWait.adapt`). Then `protocol.parse_header` of a decode call's reply header (what a
client does first with a reply) in a warm loop, right after `time.sleep(wait)` and right after busy-waiting
as long: a decode call's Python after the server's compute. Prints medians and 90th percentiles, us
(docs/benchmarks.md, "A call's cost beyond compute").
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time

import msgpack

from tsqp.wire.doorbell import CONTROL_BYTES, Doorbell, futex_usable
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


def round_trips(rounds: int, asleep: bool, compute_s: float) -> list[float]:
    """Round trips through a doorbell to a forked process that polls it and computes compute_s (a busy wait)
    before it answers, the client asleep or polling: each one's time beyond compute_s."""
    with mmap.mmap(-1, CONTROL_BYTES) as block:
        server, bell = Doorbell(block), Doorbell(block)  # both before the fork: a ring before it is not missed
        pid = os.fork()
        if pid == 0:  # the server's side: poll, answer in the slot, wake
            bell = server
            for _ in range(rounds):
                while (rung := bell.take()) is None:
                    pass
                busy(compute_s)
                bell.answer(rung[0], b"reply")
                bell.wake()
            os._exit(0)
        times = []
        for _ in range(rounds):
            seq = bell.wake_seq()
            start = time.perf_counter()
            flag = bell.ring(b"request")
            while bell.reply(flag) is None:
                if asleep:
                    bell.sleep(seq, 0.005)
                    seq = bell.wake_seq()
            times.append((time.perf_counter() - start - compute_s) * 1e6)
        os.waitpid(pid, 0)
    return times


def report(name: str, times: list[float]) -> None:
    times = sorted(times)
    p90 = times[int(0.9 * len(times))]
    print(f"{name:42s} median {statistics.median(times):6.1f} us   p90 {p90:6.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--wait-ms", type=float, default=2.0, help="the wait before each parse (a decode compute)")
    args = parser.parse_args()
    raw, wait = header(), args.wait_ms / 1000
    assert len(parse_header(raw)["tensors"]) == 2
    if futex_usable():
        report("beyond compute, the client asleep (futex)", round_trips(args.rounds, True, wait))
    report("beyond compute, the client polling", round_trips(args.rounds, False, wait))
    for name, before in [
        ("in a loop", lambda: None),
        ("after a sleep", lambda: time.sleep(wait)),
        ("after a busy wait", lambda: busy(wait)),
    ]:
        report(f"parse_header {name}", timed(raw, args.rounds, before))


if __name__ == "__main__":
    main()
