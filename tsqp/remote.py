"""The TEE side's typed view of the server: one method per call, each reply checked before it is used.

`RemoteOps` is the seam between the forward pass and whatever carries the calls: a socket client
(`transport.Client.call`) or the in-process twin (`InProcess`) that tests use. Every reply must hold
exactly the dtype and shape that was asked for; results are converted to float32 copies owned by the
TEE before any math touches them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tsqp.config import LlamaConfig
from tsqp.errors import ServerError, TsqpError
from tsqp.protocol import DEFAULT_QUERY_TILE, DTYPES, FLOAT_DTYPES, Message, expect, query_tiles

Call = Callable[..., Message]  # call(method, args=None, tensors=(), session=None) -> reply Message


class InProcess:
    """Calls an Engine directly, as the socket server would (same validation, no sockets)."""

    def __init__(self, engine, peer: bytes = b"in-process"):  # engine: a tsqp.engine.Engine
        self.engine = engine
        self.peer = peer

    def __call__(
        self, method: str, args: dict | None = None, tensors=(), session: bytes | None = None, reply_bytes: int = 0
    ) -> Message:
        request = Message({"id": 0, "method": method, "session": session, "args": args or {}}, list(tensors))
        try:
            reply_args, results = self.engine.handle(self.peer, request)
        except TsqpError as exc:
            raise ServerError(f"server refused {method}: {exc}") from None
        return Message({"id": 0, "ok": True, "args": reply_args}, results)


class RemoteOps:
    def __init__(self, call: Call, config: LlamaConfig, wire_dtype: str = "float32", tile: int = DEFAULT_QUERY_TILE):
        self.call = call
        self.tile = tile  # query rows per packed score tile
        self.config = config
        self.wire = DTYPES[wire_dtype]
        self.session: bytes | None = None

    @property
    def wire_name(self) -> str:
        return str(self.wire).removeprefix("torch.")

    # -- control -------------------------------------------------------------------------------

    def init(self) -> dict:
        """The server's description of itself; its dtype becomes the wire dtype."""
        info = self.call("init").args
        if info.get("dtype") not in FLOAT_DTYPES:
            raise ServerError(f"server reports an unknown dtype {info.get('dtype')!r}")
        self.wire = DTYPES[info["dtype"]]
        return info

    def open_session(self, capacity: int) -> None:
        session = self.call("open_session", {"capacity": capacity}).args.get("session")
        if not isinstance(session, bytes):
            raise ServerError("server returned no session id")
        self.session = session

    def close_session(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            self.call("close_session", session=session)

    # -- calls ---------------------------------------------------------------------------------

    def _run(
        self, method: str, args: dict, inputs: list[torch.Tensor], shapes: list[tuple[int, ...]], session: bool = True
    ) -> list[torch.Tensor]:
        reply_bytes = sum(math.prod(shape) for shape in shapes) * self.wire.itemsize
        reply = self.call(
            method,
            args,
            [t.to(self.wire) if t.is_floating_point() else t for t in inputs],  # token ids stay int64
            session=self.session if session else None,
            reply_bytes=reply_bytes,
        )
        expect(reply.tensors, [(self.wire, shape) for shape in shapes], method)
        return [t.to(torch.float32, copy=True) for t in reply.tensors]  # copy out, then use

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (T,) int64 -> (T, hidden)."""
        return self._run("embedding", {}, [ids], [(ids.shape[0], self.config.hidden_size)], session=False)[0]

    def qkv(self, layer: int, pos: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (T, hidden) -> q (T, q_dim), k (T, kv_dim); the server caches v."""
        T, c = h.shape[0], self.config
        (qk,) = self._run("qkv", {"layer": layer, "pos": pos}, [h], [(T, c.q_dim + c.kv_dim)])
        q, k = qk.split([c.q_dim, c.kv_dim], dim=1)
        return q, k

    def scores(self, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q (T, heads, hd), k (T, kv_heads, hd) -> scores packed by query tiles (protocol.query_tiles)."""
        _, total = query_tiles(q.shape[0], pos, self.config.num_heads, self.tile)
        return self._run("scores", {"layer": layer, "pos": pos, "tile": self.tile}, [q, k], [(total,)])[0]

    def attn_out(self, layer: int, pos: int, T: int, probs: torch.Tensor) -> torch.Tensor:
        """probs packed like scores -> o_proj(probs @ V) (T, hidden)."""
        return self._run(
            "attn_out", {"layer": layer, "pos": pos, "tile": self.tile}, [probs], [(T, self.config.hidden_size)]
        )[0]

    def gate_up(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T, inter = h.shape[0], self.config.intermediate_size
        (gate_up,) = self._run("gate_up", {"layer": layer}, [h], [(T, 2 * inter)])
        gate, up = gate_up.split([inter, inter], dim=1)
        return gate, up

    def down(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        return self._run("down", {"layer": layer}, [a], [(a.shape[0], self.config.hidden_size)])[0]

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return self._run("lm_head", {}, [x], [(x.shape[0], self.config.vocab_size)], session=False)[0]
