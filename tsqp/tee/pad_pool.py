"""A pool of precomputed pads in a file outside the TEE's memory: encrypted, authenticated, used once.

Slalom's way: the TEE computes z W^T for fresh pads z ahead of time, from its own copy of the weights
(rounded to the server's dtype, as the server holds them), so that online it only adds and subtracts.
Only the seed of each pad and z W^T are stored; z is expanded again from its seed when it is used
(`wire.pad_seeds.expand`).

File layout (every integer little-endian):

    MAGIC (8 bytes) | header length (u32) | nonce (12) | AES-256-GCM(header JSON), AAD = MAGIC
    then, per stream (one linear op of the model, in forward order) and per block of BLOCK_ROWS rows:
        nonce (12) | AES-256-GCM(seed (32) | first row (u64) | z W^T (rows, out) float64),
        AAD = file id | stream | block

A block's z is rows [first row, first row + rows) of its seed's expansion: the blocks of a stream filled
together share one seed at successive rows (no row of a keystream is used twice), so that a long take
is one expansion, not one per block.

The header holds the model fingerprint and the server dtype the pads were made for, the token count,
the block size and every stream's op and shape, so the file's exact size is known once the header is
authenticated: a file of another model, a truncated one and an altered header are refused at open,
before any pad is used, and an altered block is refused when its turn comes, before any of its bytes
are used (its tag fails). The AAD binds each block to its place: blocks cannot be swapped or moved.

A pool is used by one TEE process: `PoolReader` unlinks the file as it opens it (the open descriptor
keeps the data readable), so no later process can be handed the same pads by name. A host that copied
the file can hand it back (rollback); docs/threat-model.md says what that costs and how to avoid it.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tsqp.errors import TsqpError
from tsqp.model.checkpoint import Checkpoint
from tsqp.tee.enclave import in_enclave
from tsqp.tee.op_weights import Op, model_ops, op_dims, product
from tsqp.wire.pad_seeds import SEED_BYTES, expand, new_seed
from tsqp.wire.protocol import DTYPE_NAMES, MASKED_DTYPE

MAGIC = b"TSQPPAD1"
BLOCK_ROWS = 32  # rows per encrypted block: a decode step opens one block per op, not a whole pool
FILL_BYTES = 128 << 20  # z W^T computed at a time while filling (the TEE's peak memory, not its speed)
NONCE = 12
TAG = 16
PREFIX = SEED_BYTES + 8  # a block's seed and first row, before its z W^T (8-byte aligned)
KEY_FILE = "pool.key"
SUFFIX = ".pads"


class PoolError(TsqpError):
    """A pad pool file that cannot be used: altered, truncated, or made for another model."""


class PoolClaimed(PoolError):
    """Another process claimed the pool first (it listed the same folder): not an error, take another."""


_CLAIMED: set[bytes] = set()  # file ids this process has claimed: a copy handed back is refused


def read_at(fd: int, buffer: memoryview, offset: int) -> int:
    """preadv into `buffer` (no copy); pread and a copy where the OS lacks preadv (Gramine's LibOS)."""
    try:
        return os.preadv(fd, [buffer], offset)
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
    data = os.pread(fd, len(buffer), offset)
    buffer[: len(data)] = data
    return len(data)


def write_new_key(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(AESGCM.generate_key(bit_length=256))
        handle.flush()
        os.fsync(handle.fileno())


def pool_key(folder: Path) -> bytes:
    """The 32-byte pool key of a pad folder, made on first use (mode 0600). In an enclave it belongs in
    a Gramine encrypted mount sealed to the enclave (docs/sgx.md), so only the enclave can read it."""
    path = folder / KEY_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not path.exists() and in_enclave():
            # Gramine: the key is an encrypted mount of its own; a draft beside it would be plaintext on
            # the host, and nothing links into that mount. One enclave process makes it.
            write_new_key(path)
        elif not path.exists():  # written whole under a private name, then linked: never seen half-written
            draft = folder / f".{KEY_FILE}.{secrets.token_hex(8)}"
            try:
                write_new_key(draft)
                try:
                    os.link(draft, path)
                except FileExistsError:  # another process made it first: its key is the key
                    pass
            finally:
                draft.unlink(missing_ok=True)
        key = path.read_bytes()
    except OSError as exc:
        raise PoolError(
            f"cannot read or make the pool key {path} ({exc.strerror or exc}); a key sealed to another enclave "
            "cannot be read: remove it and the pools made with it"
        ) from None
    if len(key) != 32:
        raise PoolError(f"{path} is not a 32-byte pool key: remove it and the pools made with it")
    return key


@dataclass(frozen=True)
class Stream:
    op: Op
    width: int  # in
    out: int

    def block_rows(self, tokens: int, block: int) -> int:
        return min(BLOCK_ROWS, tokens - block * BLOCK_ROWS)

    def blocks(self, tokens: int) -> int:
        return -(-tokens // BLOCK_ROWS)

    def block_bytes(self, rows: int) -> int:
        return NONCE + PREFIX + rows * self.out * MASKED_DTYPE.itemsize + TAG


def streams(checkpoint: Checkpoint) -> list[Stream]:
    return [Stream(op, *op_dims(checkpoint.config, op)) for op in model_ops(checkpoint.config)]


def _aad(file_id: bytes, stream: int, block: int) -> bytes:
    return file_id + struct.pack("<II", stream, block)


def fill(
    checkpoint: Checkpoint,
    fingerprint: str,
    wire: torch.dtype,
    tokens: int,
    folder: Path,
    progress=None,
    publish: bool = True,
) -> tuple[Path, float]:
    """Computes pads for `tokens` rows of every op (the LM head's too) into a new pool file in folder.

    Each op's weight is streamed in chunks (`op_weights.weight_rows`), once per group of blocks (at most
    FILL_BYTES of pads at a time). Written to a temporary name: an interrupted fill leaves no pool behind.
    publish: rename it to a pool name any client may claim (`tsqp pads`); else its `.partial` path is
    returned for the caller to claim at once (a client filling for itself: no other client can take it).
    Returns (path, seconds)."""
    if tokens < 1:
        raise TsqpError("a pad pool holds at least one token")
    start = time.perf_counter()
    key, file_id = pool_key(folder), secrets.token_bytes(16)
    aead = AESGCM(key)
    layout = streams(checkpoint)
    header = {
        "v": 1,
        "fingerprint": fingerprint,
        "dtype": DTYPE_NAMES[wire],
        "tokens": tokens,
        "block_rows": BLOCK_ROWS,
        "file_id": file_id.hex(),
        "streams": [[s.op.name, s.op.layer, s.width, s.out] for s in layout],
    }
    nonce = secrets.token_bytes(NONCE)
    sealed = aead.encrypt(nonce, json.dumps(header).encode(), MAGIC)
    name = f"{fingerprint[:16]}-{DTYPE_NAMES[wire]}-{time.strftime('%Y%m%d%H%M%S')}-{file_id.hex()[:8]}{SUFFIX}"
    path, partial = folder / name, folder / (name + ".partial")
    try:
        with partial.open("wb") as handle:
            handle.write(MAGIC + struct.pack("<I", len(sealed)) + nonce + sealed)
            largest = PREFIX + BLOCK_ROWS * max(s.out for s in layout) * MASKED_DTYPE.itemsize
            plain, sealed_block = bytearray(largest), bytearray(largest + TAG)  # reused for every block
            for index, stream in enumerate(layout):
                # blocks in groups of at most FILL_BYTES of z or z W^T: one pass over the weight per group
                group = max(1, FILL_BYTES // (BLOCK_ROWS * max(stream.width, stream.out) * MASKED_DTYPE.itemsize))
                for first in range(0, stream.blocks(tokens), group):
                    blocks = range(first, min(first + group, stream.blocks(tokens)))
                    seed, rows = new_seed(), sum(stream.block_rows(tokens, b) for b in blocks)
                    zw = product(checkpoint, stream.op, expand(seed, rows, stream.width), wire, bias=False)
                    for block in blocks:
                        at = (block - first) * BLOCK_ROWS
                        part = zw[at : at + stream.block_rows(tokens, block)]
                        size = PREFIX + part.numel() * MASKED_DTYPE.itemsize
                        plain[:PREFIX] = seed + struct.pack("<Q", at)
                        torch.frombuffer(plain, dtype=MASKED_DTYPE, count=part.numel(), offset=PREFIX).copy_(
                            part.reshape(-1)
                        )
                        block_nonce = secrets.token_bytes(NONCE)
                        out = memoryview(sealed_block)[: size + TAG]
                        aead.encrypt_into(block_nonce, memoryview(plain)[:size], _aad(file_id, index, block), out)
                        handle.write(block_nonce)
                        handle.write(out)
                    del zw
                if progress:
                    progress(index + 1, len(layout))
        plain[:] = bytes(len(plain))  # the last block's plaintext is erased
        if publish:
            partial.rename(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise PoolError(f"cannot write the pad pool {partial} ({exc.strerror or exc})") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return (path if publish else partial), time.perf_counter() - start


class PoolReader:
    """One claimed pool file: its streams read block by block, each row handed out once."""

    def __init__(self, path: Path, key: bytes, fingerprint: str, wire: torch.dtype, layout: list[Stream]):
        self.path = path
        self.aead = AESGCM(key)
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise PoolClaimed(f"pad pool {path.name} was claimed by another process") from None
        except OSError as exc:
            raise PoolError(f"pad pool {path.name}: cannot open it ({exc.strerror})") from None
        try:
            try:
                os.unlink(path)  # claimed: this process alone uses these pads
            except FileNotFoundError:
                raise PoolClaimed(f"pad pool {path.name} was claimed by another process") from None
            except OSError as exc:
                raise PoolError(f"pad pool {path.name}: cannot claim it ({exc.strerror})") from None
            self._open(fingerprint, wire, layout)
        except BaseException:
            os.close(self.fd)
            raise

    def _open(self, fingerprint: str, wire: torch.dtype, layout: list[Stream]) -> None:
        name = self.path.name
        size = os.fstat(self.fd).st_size
        fixed = os.pread(self.fd, len(MAGIC) + 4 + NONCE, 0)
        if len(fixed) < len(MAGIC) + 4 + NONCE or fixed[: len(MAGIC)] != MAGIC:
            raise PoolError(f"pad pool {name} is not a TSQP pad pool (or is truncated): refused, nothing used")
        (length,) = struct.unpack("<I", fixed[len(MAGIC) : len(MAGIC) + 4])
        if length > 1 << 20:
            raise PoolError(f"pad pool {name} has an implausible header: refused, nothing used")
        sealed = os.pread(self.fd, length, len(fixed))
        try:
            header = json.loads(self.aead.decrypt(fixed[-NONCE:], sealed, MAGIC))
        except (InvalidTag, ValueError):
            raise PoolError(
                f"pad pool {name} failed authentication (altered, truncated, or made with another pool key): "
                "refused, nothing used"
            ) from None
        if header.get("fingerprint") != fingerprint:
            raise PoolError(f"pad pool {name} was made for another model (fingerprint differs): refused, nothing used")
        if header.get("dtype") != DTYPE_NAMES[wire]:
            raise PoolError(
                f"pad pool {name} was made for a {header.get('dtype')} server, this one is {DTYPE_NAMES[wire]}: "
                "refused, nothing used"
            )
        expected = [[s.op.name, s.op.layer, s.width, s.out] for s in layout]
        if header.get("streams") != expected or header.get("block_rows") != BLOCK_ROWS:
            raise PoolError(f"pad pool {name} does not match this model's layout: refused, nothing used")
        self.tokens, self.file_id = int(header["tokens"]), bytes.fromhex(header["file_id"])
        if self.file_id in _CLAIMED:
            raise PoolError(f"pad pool {name} was already used by this process (a copy handed back): refused")
        _CLAIMED.add(self.file_id)
        self.layout = layout
        self.offsets: list[int] = []  # each stream's first block
        offset = len(fixed) + length
        for stream in layout:
            self.offsets.append(offset)
            blocks = range(stream.blocks(self.tokens))
            offset += sum(stream.block_bytes(stream.block_rows(self.tokens, b)) for b in blocks)
        if size != offset:
            raise PoolError(f"pad pool {name} is {size} bytes, its header says {offset}: truncated or padded, refused")
        self.used = [0] * len(layout)  # rows handed out, per stream
        self.open_block: dict[int, tuple[int, bytes, int, torch.Tensor]] = {}  # stream -> (block, seed, row, z W^T)
        self.buffers: dict[int, bytearray] = {}  # stream -> its decrypted block
        self.sealed = bytearray()  # the block being read, before it is authenticated and decrypted

    def left(self, stream: int) -> int:
        return self.tokens - self.used[stream]

    def spent(self) -> bool:
        """Every layer's pads are used (the LM head's may be left: a generation takes one row a step)."""
        return all(self.left(i) == 0 for i, s in enumerate(self.layout) if s.op.name != "lm_head")

    @torch.inference_mode()  # the blocks are made and erased in inference mode, whoever calls
    def take(self, stream: int, rows: int) -> tuple[list[tuple[bytes, int, int]], torch.Tensor]:
        """The next `rows` rows of a stream: [(seed, first row of its expansion, rows)] (runs of one seed
        merged), z W^T (rows, out)."""
        if rows > self.left(stream):
            raise TsqpError(f"pad pool {self.path.name}: stream {stream} has {self.left(stream)} rows left")
        spec = self.layout[stream]
        zw = torch.empty(rows, spec.out, dtype=MASKED_DTYPE)
        seeds, done = [], 0
        while done < rows:
            block, first = divmod(self.used[stream], BLOCK_ROWS)
            _, seed, seed_row, block_zw = self._block(stream, block)
            n = min(rows - done, block_zw.shape[0] - first)
            zw[done : done + n] = block_zw[first : first + n]
            block_zw[first : first + n].zero_()  # erased: no row is handed out twice
            if seeds and seeds[-1][0] == seed and seeds[-1][1] + seeds[-1][2] == seed_row + first:
                seeds[-1] = (seed, seeds[-1][1], seeds[-1][2] + n)
            else:
                seeds.append((seed, seed_row + first, n))
            done += n
            self.used[stream] += n
            if first + n == block_zw.shape[0]:
                del self.open_block[stream]
        return seeds, zw

    def _block(self, stream: int, block: int) -> tuple[int, bytes, int, torch.Tensor]:
        held = self.open_block.get(stream)
        if held is not None and held[0] == block:
            return held
        spec = self.layout[stream]
        offset = self.offsets[stream] + block * spec.block_bytes(BLOCK_ROWS)
        rows = spec.block_rows(self.tokens, block)
        size = spec.block_bytes(rows)
        if len(self.sealed) < size:
            self.sealed = bytearray(size)
        raw = memoryview(self.sealed)[:size]
        if read_at(self.fd, raw, offset) != size:
            raise PoolError(f"pad pool {self.path.name}: block {block} of {spec.op} is cut short: refused")
        if stream not in self.buffers:  # one per stream, reused block after block: no fresh pages each time
            self.buffers[stream] = bytearray(PREFIX + BLOCK_ROWS * spec.out * MASKED_DTYPE.itemsize)
        payload = memoryview(self.buffers[stream])[: size - NONCE - TAG]
        try:
            self.aead.decrypt_into(bytes(raw[:NONCE]), raw[NONCE:], _aad(self.file_id, stream, block), payload)
        except (InvalidTag, ValueError):
            raise PoolError(
                f"pad pool {self.path.name}: block {block} of {spec.op} failed authentication (altered or "
                "truncated): refused, none of its pads used"
            ) from None
        zw = torch.frombuffer(payload, dtype=MASKED_DTYPE, offset=PREFIX).view(rows, spec.out)
        (seed_row,) = struct.unpack("<Q", payload[SEED_BYTES:PREFIX])
        self.open_block[stream] = (block, bytes(payload[:SEED_BYTES]), seed_row, zw)  # erased as rows are taken
        return self.open_block[stream]

    def close(self) -> None:
        for buffer in self.buffers.values():
            buffer[:] = bytes(len(buffer))  # erased: nothing of the pads outlives the reader
        self.open_block.clear()
        self.buffers.clear()
        os.close(self.fd)


def pool_files(folder: Path, fingerprint: str, wire: torch.dtype) -> list[Path]:
    """Complete pools of this model and server dtype in folder, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob(f"{fingerprint[:16]}-{DTYPE_NAMES[wire]}-*{SUFFIX}"):
        try:
            found.append((path.stat().st_mtime_ns, path.name, path))
        except FileNotFoundError:  # claimed meanwhile
            continue
    return [path for _, _, path in sorted(found)]
