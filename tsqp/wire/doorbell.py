"""The arena's doorbell: a request and its reply header through shared memory, without ZeroMQ.

A ZeroMQ round trip costs about 80 us here (each message passes through an I/O thread on both sides),
and inside an enclave every socket call is an exit from it. A lone small request can instead be
written to the first bytes of the arena, which both processes map, while the other side polls them:

    offset 0     request flag (u8, written last by the TEE), 8: request length (u32)
    offset 64    server awake (u8): the server polls the doorbells now
    offset 128   client waiting (u8): the TEE waits for its reply in the slot (raised as it rings)
    offset 192   reply flag (u8, written last by the server), 200: reply length (u32)
    offset 256   request header (msgpack, as protocol.pack makes it), SLOT_BYTES at most
    256 + SLOT   reply header

Each side spins only for a short while (SPIN_S) after its last message; a side that does not spin says
so in its flag, and the other then uses ZeroMQ instead. The doorbell carries one request at a time
and only headers: tensors lie in the arena anyway (a request with ZeroMQ frames goes by ZeroMQ).
The flags are single bytes (a store of one byte is never torn); a flag changes after the bytes it
announces are written, which x86-64 keeps in order for the reader (on other processors the doorbell
is off, see `supported`).

Both slots are untrusted: each side copies a header out once, with its length bounded, and validates
it (protocol.parse_header) like any message.

Sleeping without ZeroMQ. A client whose reply takes longer than its spin sleeps on a futex over the
wake word (offset 248, u32) instead, and keeps saying it waits: the server answers in the slot, then
bumps the word and wakes it (one system call, no I/O thread in between; a ZeroMQ reply costs three
thread hand-offs, 0.5 to 0.7 ms each way on a loaded 2-core host). The wait compares the word in the
kernel, so a wake that comes first is never lost. Inside a Gramine enclave futexes are the LibOS's
own and a host process cannot wake one: there (`TSQP_DOORBELL_FUTEX=0`, which the manifest sets, or
/dev/attestation present) the client sleeps on ZeroMQ as before. The server polls the doorbells for
SERVER_SPIN_S after each reply, yielding its core to anyone who wants it, so the next request of a
decode step, a TEE step later, finds it awake.

The client polls for its reply the same way, for SPIN_S, calling sched_yield between looks (the
server's threads take the core whenever they have work), then sleeps on the wake word. A sleeping
client costs more than the wake itself on a virtual machine, where an idle vCPU halts: a thread woken
after 2 to 5 ms asleep ran 70 to 140 us later here, against 10 us after 0.1 ms. But a polling client
is a runnable process for as long as it polls, and the cores are shared: with the server's replies now
in the slot and its wake one system call, a short poll won. TinyLlama-1.1B, one client, a CPU server
on the same 2 cores, alternating in one process (docs/benchmarks.md): median 348.5 ms a token polling
for 20 ms (306 ms of client CPU a token), 315.0 for 5 ms, 316.1 for 1 ms (118 ms of CPU), 327.2 for
0.5 ms. With 8 clients on the 2 cores a 20 ms poll cost each client 122-135 ms of CPU a token against
87-91 for 1 ms. `TSQP_DOORBELL_SPIN_MS` sets it (for such measurements).

A reply that takes longer than the poll (gate_up, down and the LM head of a 1.1B model take 2 to 11 ms
on this host) made the client poll for nothing, then sleep anyway. So it naps first, as Linux's block
layer polls a fast disk ("hybrid polling"): it sleeps on the wake word until SPIN_S / 2 before the
reply is due by that method's last replies, then polls. A reply that comes sooner wakes it, so a nap
too long costs only the wake-up. Alternating in one process, 6 rounds of 16 tokens: 318.3 ms a token
napping against 316.0 without (the same, within the host's noise), 103.3 ms of client CPU a token
against 129.7. `TSQP_DOORBELL_NAP=0` turns it off.

With the nap the poll itself no longer paid on a Zen 5 host (2026-12-04): the client now polls for 0 ms
by default, napping until the reply is due and then sleeping until the server's wake. One server, the
clients' setting alternated, 24 decode tokens each: 8 clients 14.48 against 12.60 aggregate tokens/s
(medians of 5 rounds, each round in favour; 57 against 71 ms of client CPU a token) and 17.94 against
16.67 in 4 more rounds (three in favour); one client 4.97 against 4.80 tokens/s (6 rounds, five in
favour or even). A polling client, even one that yields, is a runnable process on cores that eight
clients and the server share. Where the client cannot
sleep on the word (an enclave) it polls for ZMQ_SPIN_S: the reply would otherwise come by ZeroMQ, three
thread hand-offs and, inside an enclave, exits from it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

SLOT_BYTES = 16 * 1024
SPIN_S = float(os.environ.get("TSQP_DOORBELL_SPIN_MS", "0")) / 1000  # the client's poll for its reply, then it sleeps
NAP = os.environ.get("TSQP_DOORBELL_NAP", "1") != "0"  # sleep until a reply is nearly due, then poll
ZMQ_SPIN_S = 0.02  # the same where the client sleeps on ZeroMQ instead (no futex: inside an enclave)
SERVER_SPIN_S = 0.02  # how long the server polls after a reply, yielding its core: a TEE step is shorter
REQUEST_FLAG, REQUEST_LENGTH = 0, 8
SERVER_AWAKE = 64
CLIENT_WAITING = 128
REPLY_FLAG, REPLY_LENGTH = 192, 200
WAKE_WORD = 248  # u32 the server bumps after each reply to a rung request; the client sleeps on it
REQUEST_AT = 256
REPLY_AT = REQUEST_AT + SLOT_BYTES
CONTROL_BYTES = REPLY_AT + SLOT_BYTES  # the arena's first bytes; its regions start after them
_LENGTH = struct.Struct("<I")


def fits(header: bytes) -> bool:
    return len(header) <= SLOT_BYTES


def supported() -> bool:
    """x86-64 keeps stores in order for other cores (TSO); Python has no fences to do it elsewhere."""
    return platform.machine().lower() in ("x86_64", "amd64")


_SYS_FUTEX = 202  # x86-64 Linux
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1  # shared (not FUTEX_PRIVATE): the word lies in memory two processes map


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc() if platform.system() == "Linux" and supported() else None


def futex_usable() -> bool:
    """Whether the client may sleep on the wake word: Linux on x86-64, outside an enclave."""
    if _LIBC is None or os.environ.get("TSQP_DOORBELL_FUTEX", "1") == "0":
        return False
    return not os.path.exists("/dev/attestation")  # Gramine's pseudo-files: the futex would be the LibOS's


class Doorbell:
    """One side's handle on an arena's control block (`buffer`: the arena's mmap)."""

    def __init__(self, buffer):
        self.buffer = buffer
        self.last = buffer[REQUEST_FLAG]  # what is there now was rung before this mapping: not new
        self.word = 0  # the wake word's address in this process (0: no futex here)
        if _LIBC is not None:
            view = ctypes.c_uint32.from_buffer(buffer, WAKE_WORD)
            self.word = ctypes.addressof(view)
            del view  # the buffer can be closed again; the address is only handed to the kernel, which checks it

    # -- the TEE's side --------------------------------------------------------------------------

    def ring(self, header: bytes) -> int:
        """Writes a request header, then its flag; returns the flag its reply will carry. The client says
        it waits before the flag goes up: a reply ready before the client gets to wait for it (a quick
        request, a client preempted in between) goes in the slot, where the wait looks first."""
        flag = self.last % 255 + 1  # 1..255: a change the server can see, never 0
        self.buffer[REPLY_FLAG] = 0  # no reply of 255 requests ago can pass for this one's
        self.buffer[CLIENT_WAITING] = 1
        self.buffer[REQUEST_AT : REQUEST_AT + len(header)] = header
        _LENGTH.pack_into(self.buffer, REQUEST_LENGTH, len(header))
        self.buffer[REQUEST_FLAG] = self.last = flag
        return flag

    def reply(self, flag: int) -> bytes | None:
        """A copy of the reply header once its flag shows up (the server may write there at any time)."""
        if self.buffer[REPLY_FLAG] != flag:
            return None
        return self._copy(REPLY_LENGTH, REPLY_AT)

    def server_awake(self) -> bool:
        return self.buffer[SERVER_AWAKE] == 1

    def waiting(self, on: bool) -> None:
        self.buffer[CLIENT_WAITING] = int(on)

    def wake_seq(self) -> int:
        return _LENGTH.unpack_from(self.buffer, WAKE_WORD)[0]

    def sleep(self, seq: int, timeout_s: float) -> None:
        """Sleeps until the server bumps the wake word past seq (at once if it did already), or timeout_s."""
        if not self.word:
            return
        whole = int(timeout_s)
        limit = _Timespec(whole, int((timeout_s - whole) * 1e9))
        word, expected = ctypes.c_void_p(self.word), ctypes.c_uint32(seq)
        _LIBC.syscall(_SYS_FUTEX, word, _FUTEX_WAIT, expected, ctypes.byref(limit), None, 0)

    # -- the server's side -----------------------------------------------------------------------

    def take(self) -> tuple[int, bytes] | None:
        """(flag, a copy of the request header) when a new request was rung, else None."""
        flag = self.buffer[REQUEST_FLAG]
        if flag == self.last:
            return None
        self.last = flag
        return flag, self._copy(REQUEST_LENGTH, REQUEST_AT)

    def answer(self, flag: int, header: bytes) -> None:
        self.buffer[REPLY_AT : REPLY_AT + len(header)] = header
        _LENGTH.pack_into(self.buffer, REPLY_LENGTH, len(header))
        self.buffer[REPLY_FLAG] = flag

    def client_waiting(self) -> bool:
        return self.buffer[CLIENT_WAITING] == 1

    def wake(self) -> None:
        """After a reply to a rung request (in the slot or by ZeroMQ): bumps the wake word, wakes a sleeper."""
        _LENGTH.pack_into(self.buffer, WAKE_WORD, (self.wake_seq() + 1) & 0xFFFFFFFF)
        if self.word:
            _LIBC.syscall(_SYS_FUTEX, ctypes.c_void_p(self.word), _FUTEX_WAKE, 1, None, None, 0)

    def awake(self, on: bool) -> None:
        self.buffer[SERVER_AWAKE] = int(on)

    def _copy(self, length_at: int, data_at: int) -> bytes:
        (length,) = _LENGTH.unpack_from(self.buffer, length_at)
        return bytes(self.buffer[data_at : data_at + min(length, SLOT_BYTES)])
