"""The TEE's own cost per token and per call, by op, and the floor: the same run with its replies replayed.

A run's own time is its wall time less the time the TEE sat waiting on the server's compute
(`Stats.waited_on_server_s`): the TEE's elementwise work, its checks, its copies, and the calls' cost
(packing, transfer, waking). Divided by the tokens and by the round trips it gives the figures the
issue's targets are stated in. `--replay` then runs the same prompt twice more: once against the server with
its replies recorded (untimed: the recording's copies would slow the run they measured), once over the
recorded replies (measure/replay.py): with a server that costs nothing, the wall time itself is the floor.

JSON (`tsqp bench --json`): `tee_cost.prefill` and `tee_cost.decode` for the run, and with --replay
`floor.prefill` and `floor.decode` in the same layout, each:

    seconds, tokens, rpc_calls         wall time, tokens it covered, round trips
    own_s                              seconds less the wait on the server's compute
    own_ms_per_token, own_us_per_call  own_s per token and per round trip
    ops                                op -> {seconds, count, us_per_token, us_per_call} (the TEE's timed ops;
                                       private mode's `pads ahead` runs in a worker thread beside the others,
                                       its wait in `pads`)
    call_us                            a round trip's parts, mean us a call: send, to_server, compute, back,
                                       between (tsqp/stats.py, PHASES; the floor's server parts are 0)
    beyond_compute_us                  send + to_server + back: what a call costs beyond the server's compute

plus `floor.same_tokens` (the timed, the recorded and the replayed generations' tokens are the same) and
`floor.recorded_bytes` (what the recording held).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from tsqp.stats import PHASES, Stats

BEYOND_COMPUTE = ("send", "to_server", "back")  # a call's cost beyond the server's compute: issue 32's per-call figure


@dataclass
class Snapshot:
    """The counters a cost is the difference of."""

    ops: dict[str, tuple[int, float]]  # op -> (count, seconds)
    calls: int
    waited_s: float
    at: float
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))  # Stats.phase_s

    @classmethod
    def of(cls, stats: Stats) -> Snapshot:
        ops = {name: (op.count, op.seconds) for name, op in stats.tee_ops.items()}
        return cls(ops, stats.rpc_calls, stats.waited_on_server_s, time.perf_counter(), dict(stats.phase_s))


EMPTY = Snapshot({}, 0, 0.0, 0.0)


def cost(seconds: float, tokens: int, start: Snapshot, end: Snapshot) -> dict:
    """The figures of one span of a run (module docstring), from the counters at its start and end."""
    calls = end.calls - start.calls
    own_s = max(seconds - (end.waited_s - start.waited_s), 0.0)
    ops = {}
    for name, (count, total) in end.ops.items():
        count0, total0 = start.ops.get(name, (0, 0.0))
        if count > count0:
            s = total - total0
            ops[name] = {
                "seconds": s,
                "count": count - count0,
                "us_per_token": 1e6 * s / max(tokens, 1),
                "us_per_call": 1e6 * s / max(calls, 1),
            }
    parts = {name: 1e6 * (end.phases[name] - start.phases[name]) / max(calls, 1) for name in PHASES}
    return {
        "seconds": seconds,
        "tokens": tokens,
        "rpc_calls": calls,
        "own_s": own_s,
        "own_ms_per_token": 1e3 * own_s / max(tokens, 1),
        "own_us_per_call": 1e6 * own_s / max(calls, 1),
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["seconds"])),
        "call_us": parts,
        "beyond_compute_us": sum(parts[name] for name in BEYOND_COMPUTE),
    }


def prefill_cost(seconds: float, tokens: int, stats: Stats) -> dict:
    """A timed prefill's figures: its stats hold that prefill alone (bench.timed_prefill)."""
    return cost(seconds, tokens, EMPTY, Snapshot.of(stats))


class DecodeMark:
    """A generation's token callback that takes the counters at the first token: what follows is decode."""

    def __init__(self, stats: Stats):
        self.stats = stats
        self.first: Snapshot | None = None

    def __call__(self, token: int) -> None:
        if self.first is None:
            self.first = Snapshot.of(self.stats)
            self.stats.last_done = self.first.at  # `between` counts from here: the prefill's tail is not decode's

    def cost(self, tokens: int) -> dict:
        end = Snapshot.of(self.stats)
        return cost(end.at - self.first.at, tokens, self.first, end)


def print_costs(costs: dict[str, dict], console: Console) -> None:
    """Each run's (the split, the floor) prefill and decode: own time per token and per call, then by op."""
    table = Table(title="The TEE's own time (wall time less the wait on server compute)", title_justify="left")
    for col in ("run", "wall s", "tokens", "calls", "own ms/token", "own us/call"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, f in costs.items():
        table.add_row(
            name, f"{f['seconds']:.3f}", str(f["tokens"]), str(f["rpc_calls"]),
            f"{f['own_ms_per_token']:.3f}", f"{f['own_us_per_call']:.1f}",
        )  # fmt: skip
    console.print(table)
    ops = Table(title="The TEE's ops: us per round trip", title_justify="left")
    ops.add_column("op")
    for name in costs:
        ops.add_column(name, justify="right")
    names = dict.fromkeys(op for f in costs.values() for op in f["ops"])
    for op in names:
        ops.add_row(op, *(f"{f['ops'][op]['us_per_call']:.1f}" if op in f["ops"] else "-" for f in costs.values()))
    console.print(ops)
    parts = Table(title="A round trip's parts: us a call (mean; tsqp/stats.py PHASES)", title_justify="left")
    parts.add_column("run")
    for name in PHASES:
        parts.add_column(name, justify="right")
    parts.add_column("beyond compute", justify="right")
    for name, f in costs.items():
        parts.add_row(name, *(f"{f['call_us'][phase]:.1f}" for phase in PHASES), f"{f['beyond_compute_us']:.1f}")
    console.print(parts)
