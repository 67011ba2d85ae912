"""The TEE client's link to one server: its DEALER socket, the socket's monitor, and the deadlines.

The monitor says when a connection completed its handshake (`up`), was refused (CURVE), or went down
(`down`, the reason). A request sent on a connection that went down gets no reply: the link tells its
owner (`on_lost`), which gives up on those requests; ZeroMQ itself reconnects to a restarted server.
Until a server has completed the handshake, a wait lasts at most the connect timeout: nothing
listening fails in seconds, while a server that is there but busy gets the per-request timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from tsqp.errors import ConnectionLost, LinkRefused
from tsqp.wire.curve import CurveKeys
from tsqp.wire.transport import check_endpoint, ipc_path, make_socket

POLL_MS = 100
RECONNECT_GRACE_S = 1.0  # a call after a disconnect waits this long for the server to come back
LINK_EVENTS = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class Link:
    """A connected DEALER socket and what its monitor said last. on_lost(reason): a connection went
    down (or was refused); on_up(): a new one completed its handshake."""

    def __init__(
        self,
        endpoint: str,
        context: zmq.Context,
        curve: CurveKeys | None,
        connect_timeout_s: float,
        alive: Callable[[], str | None] | None,
        on_lost: Callable[[str], None],
        on_up: Callable[[], None],
    ):
        check_endpoint(endpoint)
        path = ipc_path(endpoint)
        if path is not None and not path.exists():
            raise ConnectionLost(f"no server at {endpoint} (the socket file does not exist): start `tsqp serve` first")
        self.endpoint = endpoint
        self.curve = curve
        self.connect_timeout_s = connect_timeout_s
        self.alive = alive  # returns a reason when the server is known to be gone (a child process that exited)
        self.on_lost, self.on_up = on_lost, on_up
        self.sock = make_socket(context, zmq.DEALER, curve=curve)
        self.monitor = self.sock.get_monitor_socket(LINK_EVENTS)
        self.up = False  # a connection to the server has completed its handshake and is open
        self.down: ConnectionLost | None = None  # why the last connection ended, until another comes up
        self.sock.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)

    def check(self, method: str) -> None:
        """Catches up on connection events that came between calls. After a disconnect the server gets
        RECONNECT_GRACE_S to come back (ZeroMQ retries every 100 ms, so a restarted server is picked up);
        otherwise the call fails now instead of at its deadline."""
        self.events(method, in_flight=False)
        deadline = time.monotonic() + RECONNECT_GRACE_S
        while self.down is not None and time.monotonic() < deadline:
            if self.monitor.poll(min(POLL_MS, max(0.0, deadline - time.monotonic()) * 1000)):
                self.events(method, in_flight=False)
        if isinstance(self.down, LinkRefused):
            raise LinkRefused(str(self.down))
        if self.down is not None:
            raise ConnectionLost(
                f"{self.down} and did not come back within {RECONNECT_GRACE_S:g} s ({method} not sent)"
            )

    def events(self, method: str, in_flight: bool) -> None:
        """Reads the monitor's pending events; during a call, a lost or refused connection fails it."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up, self.down = True, None
                self.on_up()
                continue
            lost = self._lost(kind, event["value"])
            if lost is None:
                continue
            self.down = lost
            self.on_lost(str(lost))
            if in_flight:
                raise lost if isinstance(lost, LinkRefused) else ConnectionLost(f"{lost} during {method}")

    def _lost(self, kind: int, value) -> ConnectionLost | None:
        """What a monitor event means for the connection: refused, closed, or nothing to act on."""
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return LinkRefused(
                f"server at {self.endpoint} refused this client's CURVE key (ZAP status "
                f"{int(value)}): add its client.key to the server's allowed/ folder"
            )
        if kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            hint = (
                "is it running with --curve-keys, and is server.key its public key?"
                if self.curve
                else "it may require CURVE; pass --curve-keys DIR"
            )
            return LinkRefused(f"handshake with server at {self.endpoint} failed: {hint}")
        if kind == zmq.EVENT_DISCONNECTED and self.up:
            self.up = False
            return ConnectionLost(f"server at {self.endpoint} closed the connection")
        return None

    def remaining(self, start: float, method: str, timeout_s: float) -> float:
        """Seconds left of a wait that began at `start` (monotonic): timeout_s once a server took the
        connection, the connect timeout before; a ConnectionLost that says which once none are left."""
        reach_s = min(self.connect_timeout_s, timeout_s)  # for a server to take the connection (self.up)
        remaining = start + (timeout_s if self.up else reach_s) - time.monotonic()
        if remaining <= 0 and not self.up:
            raise ConnectionLost(
                f"nothing answers at {self.endpoint} (it did not answer {method} within {reach_s:g} s): "
                "is `tsqp serve` running there?"
            )
        if remaining <= 0:
            raise ConnectionLost(f"server at {self.endpoint} did not answer {method} within {timeout_s:g} s")
        return remaining

    def poll(self, timeout_ms: float) -> dict:
        """The sockets with something to read within timeout_ms (the socket, the monitor)."""
        return dict(self.poller.poll(timeout_ms))

    def readable(self, events: dict, method: str) -> bool:
        """Whether a reply waits on the socket. A reply that made it wins over the disconnect that may
        follow it; otherwise connection events and a server known gone fail the call."""
        if self.sock in events:
            return True
        if self.monitor in events:
            self.events(method, in_flight=True)
        if self.alive is not None and (reason := self.alive()):
            raise ConnectionLost(f"server stopped during {method}: {reason}")
        return False

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close()
        self.sock.close()
