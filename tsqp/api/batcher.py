"""The decode steps of the API's concurrent generations, run as one forward pass (`tsqp api --slots batched`).

Slots that are threads share one interpreter lock: four generations decoding at once make four times the
TEE's Python work per token (every call packed, sent, unpacked and checked once per generation), one at a
time. Here each generation still runs its prefill on its own slot (its own session and KV cache, in the
TEE), but every decode step is handed to one `DecodeBatcher`, whose thread gathers the steps waiting
and runs them as the rows of one step (`TeeModel.forward_rows`): one call per linear for all of them,
one check of each (the batch's own Verifier, same keys and bounds per row), each row attended over its
own generation's cache (tee/rows_attention.py). Sampling stays with each generation.

A step waits for the generations that are decoding (between their first decode step and their end) to
hand in their next token, at most `GATHER_S`, so that one busy sending its token to its HTTP client does
not hold the others back. A step that fails (the server gone, a result that failed verification) fails
every row in it; the batch model is then closed, and the next step opens a fresh one (new keys, a new
link and session), as a slot is replaced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from tsqp.tee.attention import KVCache
from tsqp.tee.forward import TeeModel

OpenModel = AbstractContextManager[TeeModel]
GATHER_S = 0.005  # the longest a step waits for the decoding generations' next tokens


@dataclass(eq=False)
class Row:
    """One generation's decode step: its token at pos over its cache, and what came of it."""

    cache: KVCache
    token: int
    pos: int
    done: threading.Event = field(default_factory=threading.Event)
    logits: torch.Tensor | None = None
    error: BaseException | None = None


class DecodeBatcher:
    def __init__(self, open_model: Callable[[], OpenModel], rows: int, gather_s: float = GATHER_S):
        """open_model: an attached TeeModel whose attention is `RowsAttention` (compose ROWS), opened now and
        again after a failed step; rows: the most rows a step takes (the API's --parallel)."""
        self.open_model, self.max_rows, self.gather_s = open_model, rows, gather_s
        self.ready = threading.Condition()
        self.pending: list[Row] = []
        self.decoding = 0  # generations between their first decode step and their end
        self.closed = False
        self.steps = 0  # forward passes run, and their rows: the mean batch is rows / steps
        self.rows = 0
        self.stack = ExitStack()
        self.tee: TeeModel | None = None
        self.in_session = False
        self._open()  # a model or server problem is reported at start
        self.thread = threading.Thread(target=self._loop, name="tsqp-batch", daemon=True)
        self.thread.start()

    @contextmanager
    def generation(self, cache: Callable[[], KVCache]):
        """A generation's `decode` function for `generate`, while the block runs. cache: its KV cache once its
        prefill has filled it."""
        joined = False

        def decode(token: int, pos: int) -> torch.Tensor:
            nonlocal joined
            if not joined:
                with self.ready:
                    self.decoding += 1
                joined = True
            return self.step(Row(cache(), token, pos))

        try:
            yield decode
        finally:
            if joined:
                with self.ready:
                    self.decoding -= 1
                    self.ready.notify_all()

    def step(self, row: Row) -> torch.Tensor:
        """row's (1, vocab) logits, from the next batched step; raises that step's error."""
        with self.ready:
            if self.closed:
                raise RuntimeError("the API is shutting down")
            self.pending.append(row)
            self.ready.notify_all()
        row.done.wait()
        if row.error is not None:
            raise row.error
        return row.logits

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify_all()
        self.thread.join(timeout=30)
        self.stack.close()

    # -- the batch thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            rows = self._gather()
            if rows is None:
                return
            try:
                logits = self._forward(rows)
            except BaseException as exc:  # every row's generation sees it; a fresh model next time
                for row in rows:
                    row.error = exc
                    row.done.set()
                self._reset()
                continue
            for i, row in enumerate(rows):
                row.logits = logits[i : i + 1]
                row.done.set()
            with self.ready:
                idle = not self.pending and self.decoding == 0
            if idle:  # no session held open while nothing decodes (the server's idle timeout would free it)
                try:
                    self._end_session()
                except Exception:  # noqa: BLE001 - the link broke: the next step opens a fresh model
                    self._reset()

    def _gather(self) -> list[Row] | None:
        """The rows of the next step: once one waits, every decoding generation's or what came in GATHER_S."""
        with self.ready:
            while not self.pending and not self.closed:
                self.ready.wait()
            if self.closed:
                for row in self.pending:
                    row.error = RuntimeError("the API is shutting down")
                    row.done.set()
                return None
            deadline = time.monotonic() + self.gather_s
            while len(self.pending) < min(self.decoding, self.max_rows):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.ready.wait(left)
            rows, self.pending = self.pending[: self.max_rows], self.pending[self.max_rows :]
            return rows

    def _forward(self, rows: list[Row]) -> torch.Tensor:
        if self.tee is None:
            self._open()
        tee = self.tee
        if not self.in_session:
            tee.ops.open_session(self.max_rows)
            self.in_session = True
        tee.ops.attention.rows = [(row.cache, row.pos) for row in rows]
        ids = torch.tensor([row.token for row in rows], dtype=torch.int64)
        positions = torch.tensor([row.pos for row in rows], dtype=torch.int64)
        try:
            return tee.forward_rows(ids, positions)
        finally:
            tee.ops.attention.rows = []
            tee.stats.tee_spans.clear()  # a long-running API keeps no per-call history
            tee.stats.server_spans.clear()
            self.steps += 1
            self.rows += len(rows)

    def _open(self) -> None:
        self.tee = self.stack.enter_context(self.open_model())

    def _end_session(self) -> None:
        if self.in_session:
            self.in_session = False
            self.tee.ops.close_session()

    def _reset(self) -> None:
        self.in_session = False
        self.tee = None
        stack, self.stack = self.stack, ExitStack()
        try:
            stack.close()
        except Exception:  # noqa: BLE001 - a broken link may fail to close; the next step opens a new one
            pass
