"""The arena's doorbell: a request and its reply header through shared memory, without ZeroMQ.

A ZeroMQ round trip costs about 80 us here (each message passes through an I/O thread on both sides),
and inside an enclave every socket call is an exit from it. A lone small request can instead be
written to the first bytes of the arena, which both processes map, while the other side polls them:

    offset 0     request flag (u8, written last by the TEE), 8: request length (u32)
    offset 64    server awake (u8): the server polls the doorbells now
    offset 128   client waiting (u8): the TEE polls for its reply now
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
"""

from __future__ import annotations

import platform
import struct

SLOT_BYTES = 16 * 1024
SPIN_S = 0.0005  # how long a side polls after its last message before it sleeps on ZeroMQ
REQUEST_FLAG, REQUEST_LENGTH = 0, 8
SERVER_AWAKE = 64
CLIENT_WAITING = 128
REPLY_FLAG, REPLY_LENGTH = 192, 200
REQUEST_AT = 256
REPLY_AT = REQUEST_AT + SLOT_BYTES
CONTROL_BYTES = REPLY_AT + SLOT_BYTES  # the arena's first bytes; its regions start after them
_LENGTH = struct.Struct("<I")


def fits(header: bytes) -> bool:
    return len(header) <= SLOT_BYTES


def supported() -> bool:
    """x86-64 keeps stores in order for other cores (TSO); Python has no fences to do it elsewhere."""
    return platform.machine().lower() in ("x86_64", "amd64")


class Doorbell:
    """One side's handle on an arena's control block (`buffer`: the arena's mmap)."""

    def __init__(self, buffer):
        self.buffer = buffer
        self.last = buffer[REQUEST_FLAG]  # what is there now was rung before this mapping: not new

    # -- the TEE's side --------------------------------------------------------------------------

    def ring(self, header: bytes) -> int:
        """Writes a request header, then its flag; returns the flag its reply will carry."""
        flag = self.last % 255 + 1  # 1..255: a change the server can see, never 0
        self.buffer[REPLY_FLAG] = 0  # no reply of 255 requests ago can pass for this one's
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

    def awake(self, on: bool) -> None:
        self.buffer[SERVER_AWAKE] = int(on)

    def _copy(self, length_at: int, data_at: int) -> bytes:
        (length,) = _LENGTH.unpack_from(self.buffer, length_at)
        return bytes(self.buffer[data_at : data_at + min(length, SLOT_BYTES)])
