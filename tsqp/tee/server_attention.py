"""Attention on the server, softmax in the TEE: the plain split's attention seam (`ops.Attention`).

The server holds the KV cache (v from qkv, the post-RoPE keys from each scores call). Per query chunk,
two round trips: `scores` (q k^T / sqrt(hd), packed by query tiles, protocol.query_tiles), then, once
the TEE has run the causal softmax on each tile, `attn_out` (o_proj(P V)). A sliding-window layer's
calls carry its window: the server scores and reads only the keys inside it. Pipelined by query chunks:
the server scores the next chunks while the TEE runs the softmax of this one, and each chunk's attn_out
queues behind them, so neither side waits for the other while there is work. A chunk is a run of whole
query tiles, so the bytes are those of one call. Every tile passes the checker's chunk check (checks.py).
"""

from __future__ import annotations

import itertools
from collections import deque

import torch

from tsqp.errors import TsqpError
from tsqp.tee.calls import Calls, Request
from tsqp.tee.ops import Softmax
from tsqp.wire import cores
from tsqp.wire.protocol import DEFAULT_QUERY_TILE, expect, query_tiles

PIPELINE_CHUNKS = 8  # query chunks per attention call, when it is large enough to split
MIN_CHUNK_SCORES = 1 << 20  # packed scores per chunk at least: a smaller call is one chunk (a decode step)
LOOKAHEAD = 3  # score chunks submitted ahead: two in flight while the TEE works on one
PIPELINE_MODES = ("auto", "on", "off")


class ServerAttention:
    keeps_values = False  # the server caches v (qkv returns q and k only)

    def __init__(self, calls: Calls, pipeline: str = "auto", tile: int = DEFAULT_QUERY_TILE):
        """pipeline: on, off, or auto: on when the server computes apart from the TEE's cores (a GPU, another
        host, other CPUs: wire/cores.py); on the TEE's own cores overlapping the two only makes them compete."""
        if pipeline not in PIPELINE_MODES:
            raise TsqpError(f"pipeline must be one of {', '.join(PIPELINE_MODES)}, not {pipeline!r}")
        self.calls, self.config = calls, calls.config
        self.tile = tile  # query rows per packed score tile
        self.pipeline = pipeline
        self.pipelined = pipeline == "on"
        self.min_chunk_scores = MIN_CHUNK_SCORES

    def init(self, info: dict) -> None:
        if self.pipeline == "auto":
            self.pipelined = cores.apart(info)

    def attends_here(self, pos: int, T: int) -> bool:
        """Whether the step's attention runs in the TEE: never."""
        return False

    def open_session(self, capacity: int) -> None:
        """The server's session holds the cache."""

    def close_session(self) -> None: ...

    def __call__(self, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor, softmax_: Softmax, residual=None):
        """o_proj(softmax(q k^T / sqrt(hd)) V) (T, hidden) for q (T, heads, hd), k (T, kv_heads, hd) post-RoPE
        (residual: unused, attn_out fuses no later product)
        at positions [pos, pos+T); softmax_ runs on the TEE, in place on each query tile of scores.

        While the TEE works on one chunk the server has the next two chunks' scores to compute (LOOKAHEAD),
        and each chunk's attn_out is submitted as soon as its probabilities are ready.
        """
        chunks = self.chunks(q.shape[0], pos, self.window(layer))
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
                    self.calls.link.discard(request.id)
            raise

    def attend(self, scores: Request, T: int, softmax_: Softmax) -> Request:
        """A chunk's scores in, its probabilities out: the attn_out request, submitted.

        One pass per query tile while it is in cache: the tile is copied out of the reply (the arena is
        untrusted; never read twice), checked, softmaxed in place, written into the attn_out request's
        inputs (in the arena, drafted before the scores are read) and folded into the attn_out check.
        """
        calls, layer, pos, heads = self.calls, scores.layer, scores.pos, self.config.num_heads
        link, wire = calls.link, calls.wire
        window = self.window(layer)
        tiles, total = query_tiles(T, pos, heads, self.tile, window)
        draft = None
        try:
            draft = link.draft([(wire, (total,))], reply_bytes=T * self.config.hidden_size * wire.itemsize)
            check = calls.step.attention(layer, pos, *scores.sent, self.tile)  # from what was sent: while it computes
            scores.collected = True
            reply = link.wait(scores.id)
            expect(reply.tensors, [(wire, (total,))], "scores")
            (received,), (probs,) = reply.tensors, draft.tensors
            buffer = torch.empty(max(heads * t.rows * t.keys for t in tiles))
            for t in tiles:
                span = slice(t.offset, t.offset + heads * t.rows * t.keys)
                block = buffer[: span.stop - span.start].view(heads, t.rows, t.keys)
                with calls.stats.tee("copy"):
                    block.view(-1).copy_(received[span])  # scaled by 1/sqrt(hd), packed
                check.scores(t, block)
                softmax_(block)
                with calls.stats.tee("copy"):
                    if wire == torch.float32:
                        probs[span].copy_(block.view(-1))
                    else:  # round once, privately: the check must see what the server gets
                        rounded = block.to(wire)
                        probs[span].copy_(rounded.view(-1))
                        block.copy_(rounded)
                check.probs(t, block)
            check.scores_done()
            args = {"layer": layer, "pos": pos, "tile": self.tile, "tokens": T} | self.window_arg(layer)
            request_id = link.submit("attn_out", args, session=calls.session, draft=draft)
        except BaseException:
            if draft is not None:
                link.drop(draft)
            if not scores.collected:
                link.discard(scores.id)
            raise
        return Request(request_id, "attn_out", [(T, self.config.hidden_size)], [], layer, pos, check=check)

    def window(self, layer: int) -> int | None:
        """The layer's sliding window, as the family declares it (None: every earlier key)."""
        return self.config.family.windows[layer]

    def window_arg(self, layer: int) -> dict:
        """scores' and attn_out's `window` argument: absent for a global layer (the server's default)."""
        window = self.window(layer)
        return {} if window is None else {"window": window}

    def chunks(self, T: int, pos: int, window: int | None = None) -> list[tuple[int, int]]:
        """Query rows [start, end) per chunk: runs of whole tiles of about equal packed size."""
        if not self.pipelined:
            return [(0, T)]
        tiles, total = query_tiles(T, pos, self.config.num_heads, self.tile, window)
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
        _, total = query_tiles(q.shape[0], pos, self.config.num_heads, self.tile, self.window(layer))
        args = {"layer": layer, "pos": pos, "tile": self.tile} | self.window_arg(layer)
        return self.calls.submit("scores", args, [q, k], [(total,)])

    def collect_attn_out(self, request: Request) -> torch.Tensor:
        (y,) = self.calls.collect(request)
        request.check.attn_out(y)
        return y
