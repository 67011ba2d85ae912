"""The seams of the TEE side, as interfaces: what the forward pass calls, and what the ops call.

`Ops` is what `forward.TeeModel` is handed, the way tinygrad's Transformer is handed its linear layer.
Its compositions (compose.py builds them from the options):

    plain split     remote.RemoteOps(Calls(link, checker), ServerAttention)   the plain protocol
                    remote.RemoteOps(Calls(...), TeeAttention(o_proj: OProj))  --attention tee (or decode:
                    decode_attention.DecodeAttention over both)
                    remote.RemoteOps(Calls(...), RowsAttention(o_proj: OProj))  the API's batches: each
                    sequence's rows over its own cache (rows_attention.py, api/batcher.py)
    private         private.PrivateOps: Masked(Checked(Remote)) linears, TeeAttention, the TEE's embedding
    calibration     private.LinearOps: Recording(Local) linears, TeeAttention (the TEE alone)

`Attention` is where attention runs: `server_attention.ServerAttention` (the server scores and applies
the values, the TEE runs the softmax between) or `attention.TeeAttention` (the TEE's own KV cache, o_proj
through the linear seam or the plain split's o_proj call). The checker handed to `RemoteOps` (none,
immediate, or at the end of a decode step) is checks.py's. `Link` is what carries requests: a
`wire.client.Client` or `remote.Synchronous`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from tsqp.wire.protocol import Message

Call = Callable[..., Message]  # call(method, args=None, tensors=(), session=None, reply_bytes=0) -> reply
Residual = torch.Tensor | None  # the residual stream (T, hidden) a product's result is added to, if given
Softmax = Callable[[torch.Tensor], torch.Tensor]  # a tile's scores (heads, rows, keys) -> probs, in place


class Ops(Protocol):
    """The forward pass's view of everything but its own elementwise work; shapes are float32 (T, ...)."""

    def init(self) -> dict:
        """Meets the server (or nothing); returns its description (`fingerprint`, `dtype`, `device`)."""

    def open_session(self, capacity: int) -> None:
        """A sequence of up to capacity positions begins: a fresh KV cache (wherever it lives)."""

    def close_session(self) -> None: ...

    def begin_step(self, pos: int, T: int) -> None:
        """A forward pass of T tokens at pos begins (a checker may wait for its end to check it)."""

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (T,) int64 -> (T, hidden)."""

    def qkv(self, layer: int, pos: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (T, hidden) -> q (T, q_dim), k (T, kv_dim) before RoPE; v is kept where attention runs."""

    def attention(
        self, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor, softmax_: Softmax, residual: Residual = None
    ) -> torch.Tensor:
        """o_proj(softmax(q k^T / sqrt(hd)) V) (T, hidden) for q (T, heads, hd), k (T, kv_heads, hd) post-RoPE.
        residual: the stream (T, hidden) the result is added to; ops that fuse calls send it with o_proj, and
        the server computes the layer's later products from it (server/fused_calls.py): the next `gate_up`,
        `down` and `qkv` then return its results, each checked against the input the forward pass gives."""

    def gate_up(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (T, hidden) -> gate, up (T, intermediate) each."""

    def down(self, layer: int, a: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """a (T, intermediate) -> (T, hidden). residual: as attention's; the next layer's qkv comes with it."""

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, hidden) -> logits (T, vocab)."""


class Attention(Protocol):
    """Where attention runs: o_proj(softmax(q K^T / sqrt(hd)) V) over the session's cached keys and values."""

    def open_session(self, capacity: int) -> None: ...

    def close_session(self) -> None: ...

    def __call__(
        self, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor, softmax_: Softmax, residual: Residual = None
    ) -> torch.Tensor:
        """q (T, heads, hd), k (T, kv_heads, hd) post-RoPE at [pos, pos + T) -> (T, hidden); residual: handed to
        o_proj where the seam calls it (`remote.OProj` may fuse the layer's later products into that call)."""


class Draft(Protocol):
    """A request's input tensors, made before they are filled (in the arena when the link has one)."""

    tensors: list[torch.Tensor]


class Link(Protocol):
    """What carries requests to the server: several may be in flight, answered in order."""

    def submit(
        self,
        method: str,
        args: dict | None = None,
        tensors: Sequence[torch.Tensor] = (),
        session: bytes | None = None,
        reply_bytes: int = 0,
        draft: Draft | None = None,
    ) -> int:
        """Sends a request (its inputs: tensors, or a filled draft); returns its id for `wait`."""

    def wait(self, request_id: int) -> Message: ...

    def discard(self, request_id: int) -> None:
        """The reply will not be waited for."""

    def draft(self, specs: list[tuple[torch.dtype, tuple[int, ...]]], reply_bytes: int = 0) -> Draft:
        """Input tensors (dtype, shape) to fill before `submit(..., draft=)`."""

    def drop(self, draft: Draft) -> None:
        """The draft will not be submitted."""
