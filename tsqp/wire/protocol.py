"""The wire protocol between the TEE client and the GPU server. Nothing else builds or parses frames.

A request is one ZeroMQ multipart message from the client's DEALER socket:

    frame 0        header: msgpack map
                     v        PROTOCOL_VERSION
                     id       request id (int), echoed by the reply; a reply with another id is stale
                     method   name of the call (see METHODS)
                     session  session id (bytes) or nil
                     args     map of scalars and lists of scalars
                     tensors  one descriptor per tensor: [dtype, shape] for a tensor carried in the next
                              frame, [dtype, shape, offset] for one placed in the shared-memory arena
                              (arena.py); a request's results go to the arena from args.reply_at on
    frame 1..n     raw bytes of each framed tensor, C order, sent zero-copy; never pickle

The server's ROUTER socket sees the peer identity in front of these frames and replies in the same
layout with header keys v, id, ok, error (when not ok), args and tensors.

With an arena, a lone request whose tensors all lie in the arena is one frame, its header; it may go
through the arena's doorbell instead of the socket (doorbell.py), and so may its reply. The bytes are
the same header either way.

Every header is validated before any tensor byte is touched: types, version, frame count, dtype
names, shape rank and size, and that each frame's length equals its declared shape times item size.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from tsqp.errors import ProtocolError
from tsqp.wire.arena import Arena

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 8
MAX_NDIM = 4
MAX_MESSAGE_BYTES = 4 << 30  # zmq.MAXMSGSIZE on both sides; a 2048-token prefill of a 32-head model stays far below

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,  # private mode's masked products
    "int64": torch.int64,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")

# Every call and the number of tensors it takes. The seed's vocabulary (embedding, linear,
# batch_linear, matmul, lm_head) stays for tools that drive the server op by op; the TEE forward pass
# uses the fused per-layer calls, one round trip between two TEE steps: five a layer (four with attention
# in the TEE: qkv returns v too, args values, and o_proj takes the TEE's attention output; two on a server
# whose init reply says `fused`: o_proj_gate_up and down_qkv, each with the TEE's float32 residual stream).
METHODS: dict[str, int] = {
    "init": 0,
    "ping": 0,
    "open_session": 0,
    "close_session": 0,
    "attach_arena": 0,  # control
    "echo": 1,  # diagnosis: returns its input
    "embedding": 1,
    "linear": 1,
    "batch_linear": 1,
    "matmul": 2,
    "lm_head": 1,  # the seed's calls
    "qkv": 1,
    "scores": 2,
    "attn_out": 1,
    "o_proj": 1,
    "gate_up": 1,
    "down": 1,  # fused, per layer, need a session
    "o_proj_gate_up": 2,  # o_proj, then gate_up from the TEE's residual stream (server/fused_calls.py)
    "down_qkv": 2,  # down, then the next layer's qkv from the residual stream: two calls a layer
    "masked_linear": 1,  # private mode: (x + r) W^T + b in float64, no session
    "pad": 0,  # private mode, helper server: z W^T for the pad z expanded from a seed (pad_seeds.py)
}
CONTROL_METHODS = ("init", "ping", "open_session", "close_session", "attach_arena")
SESSION_METHODS = ("qkv", "scores", "attn_out", "o_proj", "gate_up", "down", "o_proj_gate_up", "down_qkv")
# The linears of private mode (args op, and layer for all but lm_head): qkv is q, k and v fused.
MASKED_LINEARS = ("qkv", "o_proj", "gate_up", "down", "lm_head")
MASKED_DTYPE = torch.float64

# Scores and probabilities travel packed by query tiles: tile i holds rows [row, row+rows) of every
# head against keys [first, pos+row+rows) only, so the future half of the causal square never crosses.
# first is 0, or with a sliding window (the scores and attn_out args' optional `window`: a query at i
# sees keys (i - window, i]) the first key the tile's first row sees: older keys are neither scored
# nor read, and a decode step's tile stays `window` keys long however long the context grows. Without
# the argument a server scores every earlier key, as before it existed: the version stays 1 (a server
# that predates it sends the unwindowed size, which the client's shape check refuses).
DEFAULT_QUERY_TILE = 64
MAX_QUERY_TILE = 4096


@dataclass(frozen=True)
class Tile:
    row: int  # first query row (relative to the call's first token)
    rows: int
    keys: int  # pos + row + rows - first: every earlier key in the window and the tile's own
    offset: int  # element offset of the tile's (heads, rows, keys) block in the packed tensor
    first: int = 0  # position of the tile's first key: 0, or where its first row's window starts

    @property
    def end(self) -> int:
        """One past the tile's last key position (and its last query's)."""
        return self.first + self.keys


def query_tiles(T: int, pos: int, heads: int, tile: int, window: int | None = None) -> tuple[list[Tile], int]:
    """The tiles of a call with T queries at positions [pos, pos+T), and the packed length in elements.
    window: the layer's sliding window (None: every earlier key).

    Its callers bound T and pos first (a list of T / tile tiles is built)."""
    if T < 0 or pos < 0 or tile < 1 or (window is not None and window < 1):
        raise ValueError(f"query_tiles needs T >= 0, pos >= 0, tile >= 1 and window >= 1, got {T, pos, tile, window}")
    tiles, offset = [], 0
    for row in range(0, T, tile):
        rows, end = min(tile, T - row), pos + row + min(tile, T - row)
        first = 0 if window is None else max(0, pos + row - window + 1)
        tiles.append(Tile(row, rows, end - first, offset, first))
        offset += heads * rows * (end - first)
    return tiles, offset


# torch.frombuffer warns on read-only buffers (zmq frames are); the tensors built here are never written.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


@dataclass
class Message:
    header: dict[str, Any]
    tensors: list[torch.Tensor] = field(default_factory=list)

    @property
    def args(self) -> dict[str, Any]:
        return self.header.get("args") or {}


def tensor_bytes(tensor: torch.Tensor):
    """A zero-copy buffer over a contiguous tensor's bytes (any dtype, bfloat16 included)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def descriptor(tensor: torch.Tensor) -> list:
    if tensor.dtype not in DTYPE_NAMES:
        raise ProtocolError(f"dtype {tensor.dtype} cannot travel")
    return [DTYPE_NAMES[tensor.dtype], list(tensor.shape)]


def pack(header: dict[str, Any], tensors: list[torch.Tensor] = (), arena: Arena | None = None) -> list:
    """Header dict + tensors -> frames. The header's `tensors` entry is filled in here; a tensor that
    lies in the arena is described by its offset and sends no frame."""
    descriptors, frames = [], []
    for tensor in tensors:
        offset = arena.offset_of(tensor) if arena is not None else None
        if offset is None:
            descriptors.append(descriptor(tensor))
            frames.append(tensor_bytes(tensor))
        else:
            descriptors.append(descriptor(tensor) + [offset])
    header = {**header, "v": PROTOCOL_VERSION, "tensors": descriptors}
    return [msgpack.packb(header, use_bin_type=True)] + frames


def nbytes_of(dtype_name: str, shape: list[int]) -> int:
    return math.prod(shape) * DTYPES[dtype_name].itemsize


def unpack(
    frames: list, arena: Arena | None = None, max_bytes: int = MAX_MESSAGE_BYTES, header: dict | None = None
) -> Message:
    """Frames -> validated Message; tensors are views of the frames or of the arena (no copy).
    header: frame 0 already parsed by `parse_header` (the server reads the id first)."""
    if not frames:
        raise ProtocolError("empty message")
    if header is None:
        header = parse_header(bytes(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]))
    descriptors = header["tensors"]
    framed = sum(len(desc) == 2 for desc in descriptors)
    if len(frames) - 1 != framed:
        raise ProtocolError(f"header declares {framed} framed tensors but {len(frames) - 1} frames follow")
    tensors, total, next_frame = [], 0, iter(frames[1:])
    for desc in descriptors:
        dtype_name, shape = desc[0], desc[1]
        expected = nbytes_of(dtype_name, shape)
        total += expected
        if total > max_bytes:
            raise ProtocolError(f"message larger than the {max_bytes}-byte bound")
        if len(desc) == 3:
            if arena is None:
                raise ProtocolError("tensor placed in a shared-memory arena, but no arena is attached")
            tensors.append(arena.view(DTYPES[dtype_name], shape, desc[2]))
            continue
        frame = next(next_frame)
        buffer = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        if buffer.nbytes != expected:
            raise ProtocolError(f"tensor {dtype_name}{shape} needs {expected} bytes, frame has {buffer.nbytes}")
        if expected == 0:
            tensors.append(torch.empty(shape, dtype=DTYPES[dtype_name]))
        else:
            tensors.append(torch.frombuffer(buffer, dtype=DTYPES[dtype_name]).view(shape))
    return Message(header, tensors)


def parse_header(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=1024, max_str_len=MAX_HEADER_BYTES)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    if not _is_int(header.get("v")) or header["v"] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r} is not {PROTOCOL_VERSION}")
    if not isinstance(header.get("id"), int) or isinstance(header.get("id"), bool):
        raise ProtocolError("header id is not an integer")
    args = header.get("args", {})
    if args is not None and not isinstance(args, dict):
        raise ProtocolError("header args is not a map")
    session = header.get("session")
    if session is not None and not isinstance(session, bytes):
        raise ProtocolError("header session is not bytes")
    descriptors = header.get("tensors")
    if not isinstance(descriptors, list) or len(descriptors) > MAX_TENSORS:
        raise ProtocolError(f"header tensors is not a list of at most {MAX_TENSORS} descriptors")
    for desc in descriptors:
        _check_descriptor(desc)
    return header


def _check_descriptor(desc: Any) -> None:
    if not isinstance(desc, list) or len(desc) not in (2, 3):
        raise ProtocolError("tensor descriptor is not [dtype, shape] or [dtype, shape, offset]")
    dtype_name, shape = desc[0], desc[1]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ProtocolError(f"dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise ProtocolError(f"shape is not a list of at most {MAX_NDIM} dimensions")
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 <= dim < 1 << 32:
            raise ProtocolError(f"bad dimension {dim!r} in shape")
    if len(desc) == 3 and (not isinstance(desc[2], int) or isinstance(desc[2], bool) or desc[2] < 0):
        raise ProtocolError("arena offset is not a non-negative integer")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def expect(tensors: list[torch.Tensor], specs: list[tuple[torch.dtype, tuple[int, ...]]], method: str) -> None:
    """Client side: a reply must hold exactly the tensors that were asked for."""
    if len(tensors) != len(specs):
        raise ProtocolError(f"{method}: server returned {len(tensors)} tensors, expected {len(specs)}")
    for i, (tensor, (dtype, shape)) in enumerate(zip(tensors, specs, strict=True)):
        if tensor.dtype != dtype or tensor.shape != tuple(shape):  # torch.Size is a tuple
            raise ProtocolError(
                f"{method}: result {i} is {DTYPE_NAMES.get(tensor.dtype)}{list(tensor.shape)}, "
                f"expected {DTYPE_NAMES[dtype]}{list(shape)}"
            )
