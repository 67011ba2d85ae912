"""The TEE side's typed view of the server: one method per call, each reply checked before it is used.

`RemoteOps` is the seam between the forward pass and whatever carries the calls: a socket client
(`transport.Client`, which can keep several requests in flight), the in-process twin (`InProcess`)
that tests use, or any call function (wrapped in `Synchronous`). Every reply must hold exactly the
dtype and shape that was asked for; results are converted to float32 copies owned by the TEE before
any math touches them.

Attention is pipelined by query chunks (`RemoteOps.attention`): the server scores the next chunks
while the TEE runs the softmax of this one, and each chunk's attn_out queues behind them, so neither
side waits for the other while there is work. A chunk is a run of whole query tiles, so the bytes
are those of one call.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tsqp.errors import ServerError, TsqpError
from tsqp.model.config import LlamaConfig
from tsqp.stats import Stats
from tsqp.wire.placement import Draft
from tsqp.wire.protocol import DEFAULT_QUERY_TILE, DTYPES, FLOAT_DTYPES, Message, Tile, expect, query_tiles

Call = Callable[..., Message]  # call(method, args=None, tensors=(), session=None, reply_bytes=0) -> reply
Softmax = Callable[[torch.Tensor], torch.Tensor]  # a tile's scores (heads, rows, keys) -> probs, in place

PIPELINE_CHUNKS = 8  # query chunks per attention call, when it is large enough to split
MIN_CHUNK_SCORES = 1 << 20  # packed scores per chunk at least: a smaller call is one chunk (a decode step)
LOOKAHEAD = 3  # score chunks submitted ahead: two in flight while the TEE works on one
PIPELINE_MODES = ("auto", "on", "off")


class Synchronous:
    """A link over a plain call function: each request runs when it is submitted, one at a time in
    order, as the server answers them; its reply (or error) is handed out by `wait`."""

    def __init__(self, call: Call):
        self.call = call
        self.ids = itertools.count(1)
        self.replies: dict[int, Message | Exception] = {}

    def submit(
        self, method: str, args=None, tensors=(), session=None, reply_bytes: int = 0, draft: Draft | None = None
    ) -> int:
        request_id = next(self.ids)
        if draft is not None:
            tensors = draft.tensors
        try:
            self.replies[request_id] = self.call(method, args, tensors, session=session, reply_bytes=reply_bytes)
        except Exception as exc:  # raised when the request is waited for, like a server's refusal
            self.replies[request_id] = exc
        return request_id

    def draft(self, specs: list[tuple[torch.dtype, tuple[int, ...]]], reply_bytes: int = 0) -> Draft:
        return Draft(0, [torch.empty(shape, dtype=dtype) for dtype, shape in specs])

    def drop(self, draft: Draft) -> None:
        pass

    def wait(self, request_id: int) -> Message:
        reply = self.replies.pop(request_id)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def discard(self, request_id: int) -> None:
        self.replies.pop(request_id, None)


@dataclass
class Request:
    """A request in flight, with what its reply must hold and what was sent (verification needs it)."""

    id: int
    method: str
    shapes: list[tuple[int, ...]]
    sent: list[torch.Tensor]
    layer: int | None = None
    pos: int = 0
    collected: bool = False
    check: ChunkCheck | None = None  # attn_out: what its result must match (verified mode)


class ChunkCheck:
    """Checks one attention chunk tile by tile, while each tile is in cache (verify.AttentionCheck);
    this one, for unverified mode, checks nothing."""

    def scores(self, tile: Tile, block: torch.Tensor) -> None:
        """block (heads, rows, keys): a tile of scores as the server sent it, before it is used."""

    def probs(self, tile: Tile, block: torch.Tensor) -> None:
        """block (heads, rows, keys): the tile's probabilities exactly as sent to the server."""

    def scores_done(self) -> None:
        """Every tile of the chunk's scores passed."""

    def attn_out(self, y: torch.Tensor) -> None:
        """y (T, hidden): the server's o_proj(P V) for the chunk."""


class InProcess:
    """Calls an Engine directly, as the socket server would (same validation, no sockets)."""

    def __init__(self, engine, peer: bytes = b"in-process"):  # engine: a tsqp.server.engine.Engine
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
    def __init__(
        self,
        call,
        config: LlamaConfig,
        wire_dtype: str = "float32",
        tile: int = DEFAULT_QUERY_TILE,
        pipeline: str = "auto",
        stats: Stats | None = None,
    ):
        """call: a `transport.Client`, an `InProcess`, or a call function.

        pipeline: on, off, or auto: on when the server reports a device other than the CPU (a CPU server
        on the TEE's host computes on the TEE's cores, where overlapping the two only makes them compete).
        """
        if pipeline not in PIPELINE_MODES:
            raise TsqpError(f"pipeline must be one of {', '.join(PIPELINE_MODES)}, not {pipeline!r}")
        self.link = call if hasattr(call, "submit") else Synchronous(call)
        self.tile = tile  # query rows per packed score tile
        self.pipeline = pipeline
        self.pipelined = pipeline == "on"
        self.min_chunk_scores = MIN_CHUNK_SCORES
        self.config = config
        self.wire = DTYPES[wire_dtype]
        self.session: bytes | None = None
        self.stats = stats or Stats()

    @property
    def wire_name(self) -> str:
        return str(self.wire).removeprefix("torch.")

    # -- control -------------------------------------------------------------------------------

    def init(self) -> dict:
        """The server's description of itself; its dtype becomes the wire dtype."""
        info = self._control("init").args
        if info.get("dtype") not in FLOAT_DTYPES:
            raise ServerError(f"server reports an unknown dtype {info.get('dtype')!r}")
        self.wire = DTYPES[info["dtype"]]
        if self.pipeline == "auto":
            self.pipelined = not str(info.get("device", "cpu")).startswith("cpu")
        return info

    def open_session(self, capacity: int) -> None:
        session = self._control("open_session", {"capacity": capacity}).args.get("session")
        if not isinstance(session, bytes):
            raise ServerError("server returned no session id")
        self.session = session

    def close_session(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            self._control("close_session", session=session)

    def begin_step(self, pos: int, T: int) -> None:
        """A forward pass of T tokens at pos begins (verified mode may wait for its end to check it)."""

    def _control(self, method: str, args: dict | None = None, session: bytes | None = None) -> Message:
        return self.link.wait(self.link.submit(method, args, session=session))

    # -- calls ---------------------------------------------------------------------------------

    def _submit(
        self,
        method: str,
        args: dict,
        inputs: list[torch.Tensor],
        shapes: list[tuple[int, ...]],
        session: bool = True,
    ) -> Request:
        sent = [t.to(self.wire) if t.is_floating_point() else t for t in inputs]  # token ids stay int64
        request_id = self.link.submit(
            method,
            args,
            sent,
            session=self.session if session else None,
            reply_bytes=sum(math.prod(shape) for shape in shapes) * self.wire.itemsize,
        )
        return Request(request_id, method, shapes, sent, args.get("layer"), args.get("pos", 0))

    def _collect(self, request: Request) -> list[torch.Tensor]:
        request.collected = True
        reply = self.link.wait(request.id)
        expect(reply.tensors, [(self.wire, shape) for shape in request.shapes], request.method)
        with self.stats.tee("copy"):
            return [t.to(torch.float32, copy=True) for t in reply.tensors]  # copy out, then use

    def _run(
        self, method: str, args: dict, inputs: list[torch.Tensor], shapes: list[tuple[int, ...]], session: bool = True
    ) -> list[torch.Tensor]:
        return self._collect(self._submit(method, args, inputs, shapes, session))

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (T,) int64 -> (T, hidden)."""
        return self._run("embedding", {}, [ids], [(ids.shape[0], self.config.hidden_size)], session=False)[0]

    def qkv(self, layer: int, pos: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (T, hidden) -> q (T, q_dim), k (T, kv_dim); the server caches v."""
        T, c = h.shape[0], self.config
        (qk,) = self._run("qkv", {"layer": layer, "pos": pos}, [h], [(T, c.q_dim + c.kv_dim)])
        q, k = qk.split([c.q_dim, c.kv_dim], dim=1)
        return q, k

    def attention(self, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor, softmax_: Softmax) -> torch.Tensor:
        """o_proj(softmax(q k^T / sqrt(hd)) V) (T, hidden) for q (T, heads, hd), k (T, kv_heads, hd) post-RoPE
        at positions [pos, pos+T); softmax_ runs on the TEE, in place on each query tile of scores.

        Two round trips per query chunk, pipelined: while the TEE works on one chunk the server has the
        next two chunks' scores to compute (LOOKAHEAD), and each chunk's attn_out is submitted as soon as
        its probabilities are ready.
        """
        chunks = self.chunks(q.shape[0], pos)
        upcoming = iter(chunks)
        scoring: deque[Request] = deque()
        outputs: list[Request] = []

        def score_next() -> None:
            for start, end in itertools.islice(upcoming, 1):
                scoring.append(self.submit_scores(layer, pos + start, q[start:end], k[start:end]))

        try:
            for _ in range(LOOKAHEAD):
                score_next()
            for start, end in chunks:
                outputs.append(self.attend(scoring.popleft(), end - start, softmax_))
                score_next()  # after the chunk's attn_out: the scores reply was read in place until then
            return torch.cat([self.collect_attn_out(request) for request in outputs])
        except BaseException:
            for request in (*scoring, *outputs):
                if not request.collected:
                    self.link.discard(request.id)
            raise

    def attend(self, scores: Request, T: int, softmax_: Softmax) -> Request:
        """A chunk's scores in, its probabilities out: the attn_out request, submitted.

        One pass per query tile while it is in cache: the tile is copied out of the reply (the arena is
        untrusted; never read twice), checked, softmaxed in place, written into the attn_out request's
        inputs (in the arena, drafted before the scores are read) and folded into the attn_out check.
        """
        layer, pos, heads, wire = scores.layer, scores.pos, self.config.num_heads, self.wire
        tiles, total = query_tiles(T, pos, heads, self.tile)
        draft = None
        try:
            draft = self.link.draft([(wire, (total,))], reply_bytes=T * self.config.hidden_size * wire.itemsize)
            check = self.chunk_check(scores, T)  # from the TEE's own q, k: while the server computes
            scores.collected = True
            reply = self.link.wait(scores.id)
            expect(reply.tensors, [(wire, (total,))], "scores")
            (received,), (probs,) = reply.tensors, draft.tensors
            buffer = torch.empty(max(heads * t.rows * t.keys for t in tiles))
            for t in tiles:
                span = slice(t.offset, t.offset + heads * t.rows * t.keys)
                block = buffer[: span.stop - span.start].view(heads, t.rows, t.keys)
                with self.stats.tee("copy"):
                    block.view(-1).copy_(received[span])  # scaled by 1/sqrt(hd), packed
                check.scores(t, block)
                softmax_(block)
                with self.stats.tee("copy"):
                    if wire == torch.float32:
                        probs[span].copy_(block.view(-1))
                    else:  # round once, privately: the check must see what the server gets
                        rounded = block.to(wire)
                        probs[span].copy_(rounded.view(-1))
                        block.copy_(rounded)
                check.probs(t, block)
            check.scores_done()
            args = {"layer": layer, "pos": pos, "tile": self.tile, "tokens": T}
            request_id = self.link.submit("attn_out", args, session=self.session, draft=draft)
        except BaseException:
            if draft is not None:
                self.link.drop(draft)
            if not scores.collected:
                self.link.discard(scores.id)
            raise
        return Request(request_id, "attn_out", [(T, self.config.hidden_size)], [], layer, pos, check=check)

    def chunk_check(self, scores: Request, T: int) -> ChunkCheck:
        """What the tiles of a chunk are checked against (nothing, unless verified)."""
        return ChunkCheck()

    def chunks(self, T: int, pos: int) -> list[tuple[int, int]]:
        """Query rows [start, end) per chunk: runs of whole tiles of about equal packed size."""
        if not self.pipelined:
            return [(0, T)]
        tiles, total = query_tiles(T, pos, self.config.num_heads, self.tile)
        budget = max(total / PIPELINE_CHUNKS, self.min_chunk_scores)
        chunks, start, size = [], 0, 0
        for t in tiles:
            size += self.config.num_heads * t.rows * t.keys
            if size >= budget or t is tiles[-1]:
                chunks.append((start, t.row + t.rows))
                start, size = t.row + t.rows, 0
        return chunks

    def submit_scores(self, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor) -> Request:
        """q (T, heads, hd), k (T, kv_heads, hd) -> scores packed by query tiles (protocol.query_tiles)."""
        _, total = query_tiles(q.shape[0], pos, self.config.num_heads, self.tile)
        return self._submit("scores", {"layer": layer, "pos": pos, "tile": self.tile}, [q, k], [(total,)])

    def collect_attn_out(self, request: Request) -> torch.Tensor:
        (y,) = self._collect(request)
        request.check.attn_out(y)
        return y

    def gate_up(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T, inter = h.shape[0], self.config.intermediate_size
        (gate_up,) = self._run("gate_up", {"layer": layer}, [h], [(T, 2 * inter)])
        gate, up = gate_up.split([inter, inter], dim=1)
        return gate, up

    def down(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        return self._run("down", {"layer": layer}, [a], [(a.shape[0], self.config.hidden_size)])[0]

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return self._run("lm_head", {}, [x], [(x.shape[0], self.config.vocab_size)], session=False)[0]
