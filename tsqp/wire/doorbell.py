"""The arena's doorbell: a request and its reply header through shared memory, without ZeroMQ.

A ZeroMQ round trip passes through an I/O thread on both sides, and inside an enclave every socket
call is an exit from it. A lone small request can instead be
written to the first bytes of the arena, which both processes map, while the other side polls them:

    offset 0     request flag (u8, written last by the TEE), 8: request length (u32)
    offset 64    server awake (u8): the server polls the doorbells now
    offset 128   client waiting (u8): the TEE waits for its reply in the slot (raised as it rings)
    offset 192   reply flag (u8, written last by the server), 200: reply length (u32)
    offset 256   request header (msgpack, as protocol.pack makes it), SLOT_BYTES at most
    256 + SLOT   reply header

Each side polls only for a short while after its last message; a side that does not spin says
so in its flag, and the other then uses ZeroMQ instead. The doorbell carries one request at a time
and only headers: tensors lie in the arena anyway (a request with ZeroMQ frames goes by ZeroMQ).
The flags are single bytes (a store of one byte is never torn); a flag changes after the bytes it
announces are written, which x86-64 keeps in order for the reader (on other processors the doorbell
is off, see `supported`).

Both slots are untrusted: each side copies a header out once, with its length bounded, and validates
it (protocol.parse_header) like any message.

Sleeping without ZeroMQ. A client whose reply is not there yet sleeps on a futex over the wake word
(offset 248, u32) and keeps saying it waits: the server answers in the slot, then bumps the word and
wakes it (one system call; a ZeroMQ reply costs three thread hand-offs). The wait compares the word in
the kernel, so a wake that comes first is never lost. Inside a Gramine enclave futexes are the LibOS's
own and a host process cannot wake one: there (`TSQP_DOORBELL_FUTEX=0`, which the manifest sets, or
/dev/attestation present) the client sleeps on ZeroMQ instead, after polling a while (waiting.py). The
server polls the doorbells for SERVER_SPIN_S after each reply, yielding its core to anyone who wants
it, so the next request of a decode step, a TEE step later, finds it awake.

The client first naps, as Linux's block layer polls a fast disk ("hybrid polling"): it sleeps on the
wake word until shortly before the reply is due by that method's last replies (waiting.py), then polls for the spin
time (`TSQP_DOORBELL_SPIN_MS`), then sleeps until the server's wake. A polling client is a runnable
process on cores the server and other clients share, so there it does not poll; a reply that comes
during the nap wakes it, so a nap too long costs only the wake-up (`TSQP_DOORBELL_NAP=0` turns the nap
off). Where the server computes on cores the client does not run on (`attach_arena`'s reply names
them: another core set, or none for a GPU), the client polls 20 ms without a nap, as a CUDA host thread
spins on its device: it takes nothing the server wants, and it does not wake on cold caches
(waiting.py, `DoorbellWait.adapt`). The figures behind these choices are in docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

from tsqp import env

SLOT_BYTES = 16 * 1024
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
    if _LIBC is None or not env.read("TSQP_DOORBELL_FUTEX"):
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
