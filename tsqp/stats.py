"""Per-op timing and traffic counters, and the statistics table the benchmark prints (the seed's layout)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table


@dataclass
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
    rpc_s: float = 0.0
    serialize_s: float = 0.0
    deserialize_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0

    def rpc(self, method: str, *, sent: int, received: int, total_s: float, serialize_s: float,
            deserialize_s: float, server_s: float) -> None:
        self.rpc_calls += 1
        self.rpc_s += total_s
        self.serialize_s += serialize_s
        self.deserialize_s += deserialize_s
        self.bytes_sent += sent
        self.bytes_received += received
        self.server_ops[method].add(server_s)

    @contextmanager
    def tee(self, op: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.tee_ops[op].add(time.perf_counter() - start)

    def reset(self) -> None:
        self.__init__()

    @property
    def server_s(self) -> float:
        return sum(op.seconds for op in self.server_ops.values())

    @property
    def communication_s(self) -> float:
        """RPC time not spent computing on the server: transfer, queueing and (de)serialization."""
        return max(self.rpc_s - self.server_s, 0.0)

    def summary(self) -> dict:
        return {"rpc_calls": self.rpc_calls, "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "rpc_s": self.rpc_s, "server_compute_s": self.server_s, "communication_s": self.communication_s,
                "serialize_s": self.serialize_s, "deserialize_s": self.deserialize_s,
                "tee_ops": {k: v.seconds for k, v in self.tee_ops.items()},
                "server_ops": {k: v.seconds for k, v in self.server_ops.items()}}

    def print_table(self, wall_s: float, console: Console | None = None) -> None:
        console = console or Console()
        ops = Table(title="Time by op", title_justify="left")
        for col in ("side", "op", "count", "total s", "avg ms", "share"):
            ops.add_column(col, justify="left" if col in ("side", "op") else "right")
        for side, table in (("server", self.server_ops), ("tee", self.tee_ops)):
            for name, op in sorted(table.items(), key=lambda kv: -kv[1].seconds):
                ops.add_row(side, name, str(op.count), f"{op.seconds:.3f}", f"{1000 * op.seconds / max(op.count, 1):.2f}",
                            f"{100 * op.seconds / wall_s:.1f}%" if wall_s else "-")
        console.print(ops)
        wire = Table(title="Communication", title_justify="left")
        wire.add_column("metric")
        wire.add_column("value", justify="right")
        rows = [
            ("RPC calls", f"{self.rpc_calls}"),
            ("RPC time (round trips, incl. server compute)", f"{self.rpc_s:.3f} s"),
            ("server compute", f"{self.server_s:.3f} s"),
            ("communication (RPC time minus server compute)", f"{self.communication_s:.3f} s"),
            ("  serialize", f"{self.serialize_s:.3f} s"),
            ("  deserialize", f"{self.deserialize_s:.3f} s"),
            ("bytes sent", _bytes(self.bytes_sent)),
            ("bytes received", _bytes(self.bytes_received)),
            ("communication share of wall time", f"{100 * self.communication_s / wall_s:.1f}%" if wall_s else "-"),
        ]
        for row in rows:
            wire.add_row(*row)
        console.print(wire)


def _bytes(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"
