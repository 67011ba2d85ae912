"""Attention split by step (`--attention decode`): a prompt's prefill attends on the server, decode in the TEE.

A prefill's attention is a large product (T^2 per head) that a fast server does far quicker than the TEE,
and its scores round trip is one call among many large ones; a decode step's attention is a few
microseconds of work behind a whole extra round trip (scores, then attn_out). So the prefill at position 0
runs `ServerAttention` (five calls a layer) and every later step `TeeAttention` (four). qkv returns v on
every step, so the TEE's KVCache holds every value, and the prefill's post-RoPE keys are copied into it as
they are sent to the server; after that the server's cache is never read again (a later chunk of a
prompt, at a position past 0, attends in the TEE too: the server does not hold the decoded keys).
"""

from __future__ import annotations

import torch

from tsqp.tee.attention import TeeAttention
from tsqp.tee.ops import Softmax
from tsqp.tee.server_attention import ServerAttention
from tsqp.tuning import SHORT_STEP_ROWS


class DecodeAttention:
    """`ops.Attention` over both sides: the server's for a fresh prompt's prefill, the TEE's for the rest."""

    keeps_values = True  # qkv returns v on every step: the TEE's cache must hold the prefill's too

    def __init__(self, server: ServerAttention, tee: TeeAttention, rows: int = SHORT_STEP_ROWS):
        """rows: a step of more tokens than this at position 0 attends on the server."""
        self.server, self.tee, self.rows = server, tee, rows

    @property
    def pipelined(self) -> bool:
        return self.server.pipelined

    @property
    def tile(self) -> int:
        return self.server.tile

    def chunks(self, T: int, pos: int, window: int | None = None) -> list[tuple[int, int]]:
        return self.server.chunks(T, pos, window)

    def attends_here(self, pos: int, T: int) -> bool:
        return pos > 0 or T <= self.rows

    def init(self, info: dict) -> None:
        self.server.init(info)

    def open_session(self, capacity: int) -> None:
        self.server.open_session(capacity)
        self.tee.open_session(capacity)

    def close_session(self) -> None:
        self.server.close_session()
        self.tee.close_session()

    def put_values(self, layer: int, pos: int, v: torch.Tensor) -> None:
        self.tee.put_values(layer, pos, v)

    def __call__(self, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor, softmax_: Softmax, residual=None):
        if self.attends_here(pos, q.shape[0]):
            return self.tee(layer, pos, q, k, residual=residual)
        self.tee.cache.put_keys(layer, pos, k)  # for the decode steps after this prefill
        return self.server(layer, pos, q, k, softmax_)
