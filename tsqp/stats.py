"""Per-op timing and traffic counters, and the statistics table the benchmark prints (the seed's layout)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

TEE_PID, SERVER_PID = 1, 2
# A round trip's parts, summed over the calls (Stats.phase_s; floor.py reports them per call):
#   send       submit to the request being out (placing tensors in the arena, the header, the doorbell)
#   to_server  out to the server's compute starting (its wake, reading and checking the request)
#   compute    the server's compute
#   back       compute done (or the TEE waiting, if later) to the reply in the TEE's hands (the reply's
#              header, the wake, reading and checking it)
#   between    the TEE's own work from one call's reply to the next call's submit
# to_server, compute and back need the server's clock (the same host); `between` skips overlapping calls.
PHASES = ("send", "to_server", "compute", "back", "between")


@dataclass(slots=True)
class OpTotal:
    count: int = 0
    seconds: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds


@dataclass
class Stats:
    server_ops: dict[str, OpTotal] = field(default_factory=lambda: defaultdict(OpTotal))
    tee_ops: dict[str, OpTotal] = field(default_factory=lambda: defaultdict(OpTotal))
    rpc_calls: int = 0
    rpc_s: float = 0.0  # TEE time inside round trips: sending, and waiting for replies
    serialize_s: float = 0.0
    deserialize_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    tee_spans: list[tuple[float, float]] = field(default_factory=list)  # the TEE in a round trip
    server_spans: list[tuple[float, float]] = field(default_factory=list)  # the server computing
    unclocked_server_s: float = 0.0  # server compute on another clock (another host): not placed in time
    trace: list[dict] | None = None  # Chrome trace events (perf_counter clock, shared by both processes)
    lanes: list[float] = field(default_factory=list)  # per round-trip lane of the trace: when its last call ended
    layer: int | None = None  # the layer the TEE is in, for trace annotations
    phase_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))  # see PHASES
    last_done: float | None = None  # when the last reply was in hand (for `between`)

    def rpc(
        self,
        method: str,
        *,
        sent: int,
        received: int,
        serialize_s: float,
        deserialize_s: float,
        server_s: float,
        start: float,
        sent_at: float,
        waiting: float,
        done: float,
        server_start: float | None = None,
    ) -> None:
        """One request, on the TEE's perf_counter: submitted at start, out at sent_at, waited for from
        `waiting` (later than sent_at when the TEE worked meanwhile, a pipelined call) until done.
        server_start: the server's perf_counter when it began computing (CLOCK_MONOTONIC, the same clock
        in both processes on one host)."""
        clocked = server_start is not None and start <= server_start <= done
        if self.trace is not None:
            self._trace_rpc(method, start, done, server_start if clocked else None, server_s, sent + received, waiting)
        self.rpc_calls += 1
        self.rpc_s += (sent_at - start) + (done - waiting)
        self.tee_spans += [(start, sent_at), (waiting, done)]
        self._phases(start, sent_at, waiting, done, server_start if clocked else None, server_s)
        if clocked:
            self.server_spans.append((server_start, server_start + server_s))
        else:
            self.unclocked_server_s += server_s
        self.serialize_s += serialize_s
        self.deserialize_s += deserialize_s
        self.bytes_sent += sent
        self.bytes_received += received
        self.server_ops[method].add(server_s)

    def _phases(self, start, sent_at, waiting, done, server_start: float | None, server_s: float) -> None:
        phase = self.phase_s
        phase["send"] += sent_at - start
        if server_start is not None:
            server_end = server_start + server_s
            phase["to_server"] += max(server_start - sent_at, 0.0)
            phase["compute"] += server_s
            phase["back"] += max(done - max(server_end, waiting), 0.0)
        if self.last_done is not None and start >= self.last_done:
            phase["between"] += start - self.last_done
        self.last_done = done

    @property
    def waited_on_server_s(self) -> float:
        """Server compute during the TEE's round trips (the TEE had nothing else to do)."""
        return _intersection(sorted(self.tee_spans), sorted(self.server_spans)) + self.unclocked_server_s

    @property
    def communication_s(self) -> float:
        """TEE time in round trips not covered by server compute: transfers, copies, queueing, (de)serialization."""
        return max(self.rpc_s - self.waited_on_server_s, 0.0)

    @property
    def hidden_s(self) -> float:
        """Server compute while the TEE worked on something else (the overlap of pipelined calls)."""
        return max(self.server_s - self.waited_on_server_s, 0.0)

    def tee(self, op: str) -> TeeSpan:
        """`with stats.tee(op):` times the block as one of the TEE's ops."""
        return TeeSpan(self, op)

    def reset(self) -> None:
        tracing = self.trace is not None
        self.__init__()
        if tracing:
            self.start_trace()

    # -- timeline ------------------------------------------------------------------------------

    def start_trace(self) -> None:
        self.trace = []

    def _event(self, name: str, pid: int, tid: int, start: float, seconds: float, **args) -> None:
        if self.layer is not None:
            args["layer"] = self.layer
        self.trace.append(
            {
                "name": name,
                "ph": "X",
                "pid": pid,
                "tid": tid,
                "ts": start * 1e6,
                "dur": max(seconds, 0.0) * 1e6,
                "args": args,
            }
        )

    def _trace_rpc(
        self,
        method: str,
        start: float,
        done: float,
        server_start: float | None,
        server_s: float,
        nbytes: int,
        waiting: float,
    ) -> None:
        """A round trip on the first lane free at its start (pipelined calls overlap), the server's work
        on its own lane, and the transfers: request out, and reply back once the TEE waits for it."""
        lane = next((i for i, busy_until in enumerate(self.lanes) if busy_until <= start), len(self.lanes))
        self.lanes[lane : lane + 1] = [done]
        self._event(f"rpc {method}", TEE_PID, 2 + 2 * lane, start, done - start, bytes=nbytes)
        if server_start is None:
            return  # another host's clock, or a server that gives none: no server lane
        self._event(method, SERVER_PID, 1, server_start, server_s)
        self._event("request transfer", TEE_PID, 3 + 2 * lane, start, server_start - start)
        reply_from = max(server_start + server_s, waiting)
        self._event("reply transfer", TEE_PID, 3 + 2 * lane, reply_from, done - reply_from)

    def write_trace(self, path: str) -> None:
        """A Chrome / Perfetto trace (chrome://tracing, ui.perfetto.dev): TEE and server on one clock."""
        names = [
            (TEE_PID, "TEE (trusted)", {1: "TEE ops", **self._lane_names()}),
            (SERVER_PID, "server (untrusted)", {1: "server ops"}),
        ]
        meta = []
        for pid, name, threads in names:
            meta.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}})
            meta += [
                {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": label}}
                for tid, label in threads.items()
            ]
        with open(path, "w") as handle:
            json.dump({"traceEvents": meta + (self.trace or []), "displayTimeUnit": "ms"}, handle)

    def _lane_names(self) -> dict[int, str]:
        names = {}
        for lane in range(max(len(self.lanes), 1)):
            suffix = f" {lane + 1}" if lane else ""
            names[2 + 2 * lane], names[3 + 2 * lane] = f"round trips{suffix}", f"transfers{suffix}"
        return names

    @property
    def server_s(self) -> float:
        return sum(op.seconds for op in self.server_ops.values())

    def summary(self) -> dict:
        return {
            "rpc_calls": self.rpc_calls,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "rpc_s": self.rpc_s,
            "server_compute_s": self.server_s,
            "communication_s": self.communication_s,
            "server_hidden_s": self.hidden_s,
            "serialize_s": self.serialize_s,
            "deserialize_s": self.deserialize_s,
            "tee_ops": {k: v.seconds for k, v in self.tee_ops.items()},
            "server_ops": {k: v.seconds for k, v in self.server_ops.items()},
        }

    def print_table(self, wall_s: float, console: Console | None = None) -> None:
        console = console or Console()
        ops = Table(title="Time by op", title_justify="left")
        for col in ("side", "op", "count", "total s", "avg ms", "share"):
            ops.add_column(col, justify="left" if col in ("side", "op") else "right")
        for side, table in (("server", self.server_ops), ("tee", self.tee_ops)):
            for name, op in sorted(table.items(), key=lambda kv: -kv[1].seconds):
                ops.add_row(
                    side,
                    name,
                    str(op.count),
                    f"{op.seconds:.3f}",
                    f"{1000 * op.seconds / max(op.count, 1):.2f}",
                    f"{100 * op.seconds / wall_s:.1f}%" if wall_s else "-",
                )
        console.print(ops)
        wire = Table(title="Communication", title_justify="left")
        wire.add_column("metric")
        wire.add_column("value", justify="right")
        rows = [
            ("RPC calls", f"{self.rpc_calls}"),
            ("RPC time (the TEE sending and waiting, incl. server compute)", f"{self.rpc_s:.3f} s"),
            ("server compute", f"{self.server_s:.3f} s"),
            ("  of it while the TEE worked (overlap)", f"{self.hidden_s:.3f} s"),
            ("communication (RPC time not covered by server compute)", f"{self.communication_s:.3f} s"),
            ("  serialize", f"{self.serialize_s:.3f} s"),
            ("  deserialize", f"{self.deserialize_s:.3f} s"),
            ("bytes sent", _bytes(self.bytes_sent)),
            ("bytes received", _bytes(self.bytes_received)),
            ("communication share of wall time", f"{100 * self.communication_s / wall_s:.1f}%" if wall_s else "-"),
        ]
        for row in rows:
            wire.add_row(*row)
        console.print(wire)


class TeeSpan:
    """`Stats.tee`'s context manager: a small class rather than a generator (`contextlib.contextmanager`),
    which cost several microseconds each, and a decode step times some 450 ops (SmolLM2)."""

    __slots__ = ("stats", "op", "start")

    def __init__(self, stats: Stats, op: str):
        self.stats, self.op = stats, op

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        elapsed = time.perf_counter() - self.start
        stats = self.stats
        total = stats.tee_ops[self.op]  # OpTotal.add inlined: some 450 spans a decode step
        total.count += 1
        total.seconds += elapsed
        if stats.trace is not None:
            stats._event(self.op, TEE_PID, 1, self.start, elapsed)


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the overlap of two lists of disjoint intervals, each sorted."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        low, high = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(high - low, 0.0)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _bytes(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"
