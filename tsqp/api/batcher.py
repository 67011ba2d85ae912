"""The API's concurrent generations run as one forward pass a step (`tsqp api --slots batched`).

Slots that are threads share one interpreter lock: four generations at once make four times the TEE's
Python work per token (every call packed, sent, unpacked and checked once per generation), one at a
time. Here a generation holds only its KV cache (in the TEE) and its sampling; each of its forward
passes, its prompt's and each decode step's, is a request to one `StepBatcher`, whose thread runs the
requests waiting as the rows of one step (`TeeModel.forward_rows`): one server call per linear for all
of them, one Freivalds check of each (the batch model's own Verifier: same keys and bounds per row),
each request's rows attended over its own cache (tee/rows_attention.py).

A step takes the decode steps waiting first, then prompts, in arrival order, up to `STEP_TOKENS` rows; a
longer prompt runs in chunks over several steps (its generation waits for the last). Once a request
waits, a step waits for every open generation to hand in its next request, at most `GATHER_S` (one busy
sending its token to its HTTP client does not hold the others back). A step that fails (the server
gone, a result that failed verification) fails every request in it; the batch model is then closed and
the next step opens a fresh one (new keys, a new link and session), as a slot would be replaced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field

import torch

from tsqp.errors import TsqpError
from tsqp.stats import Stats
from tsqp.tee.attention import KVCache
from tsqp.tee.forward import TeeModel, check_token_ids
from tsqp.tee.rows_attention import Segment
from tsqp.tuning import SHORT_STEP_ROWS

OpenModel = AbstractContextManager[TeeModel]
GATHER_S = 0.005  # the longest a step waits for the open generations' next requests
STEP_TOKENS = SHORT_STEP_ROWS  # the most rows a step takes (a longer prompt runs in chunks): each step is short


@dataclass(eq=False)
class Request:
    """One forward pass of a generation: ids at [pos, pos + len(ids)) over its cache, and what came of it."""

    cache: KVCache
    ids: torch.Tensor  # (T,) int64
    pos: int
    ran: int = 0  # rows run so far (a prompt in chunks)
    done: threading.Event = field(default_factory=threading.Event)
    logits: torch.Tensor | None = None  # (1, vocab): its last row's
    error: BaseException | None = None

    @property
    def left(self) -> int:
        return self.ids.shape[0] - self.ran


class StepBatcher:
    def __init__(self, open_model: Callable[[], OpenModel], step_tokens: int = STEP_TOKENS, gather_s: float = GATHER_S):
        """open_model: an attached TeeModel whose attention is `RowsAttention` (compose ROWS), opened now and
        again after a failed step."""
        self.open_model, self.step_tokens, self.gather_s = open_model, step_tokens, gather_s
        self.ready = threading.Condition()
        self.pending: list[Request] = []
        self.open = 0  # generations between open_session and close_session
        self.closed = False
        self.steps = 0  # forward passes run, and the rows they held
        self.rows = 0
        self.stack = ExitStack()
        self.tee: TeeModel | None = None
        self.in_session = False
        self._open()  # a model or server problem is reported at start
        self.config, self.fingerprint = self.tee.config, self.tee.fingerprint
        self.thread = threading.Thread(target=self._loop, name="tsqp-batch", daemon=True)
        self.thread.start()

    def run(self, cache: KVCache, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """ids (T,) at [pos, pos + T) of the generation whose cache this is -> its last row's (1, vocab) logits,
        from the next steps; raises the error of a step it took part in."""
        request = Request(cache, ids, pos)
        with self.ready:
            if self.closed:
                raise TsqpError("the API is shutting down")
            self.pending.append(request)
            self.ready.notify_all()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.logits

    def joined(self, change: int) -> None:
        """A generation opens (+1) or closes (-1): the steps wait for the open ones' requests."""
        with self.ready:
            self.open += change
            self.ready.notify_all()

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify_all()
        self.thread.join(timeout=30)
        self.stack.close()

    # -- the batch thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._steps()
        except BaseException as exc:  # a bug here must not leave generations waiting for ever
            with self.ready:
                self.closed = True
                waiting = list(self.pending)
            self._settle([(r, 0) for r in waiting], error=TsqpError(f"the batcher stopped: {exc!r}"))
            raise

    def _steps(self) -> None:
        while (plan := self._gather()) is not None:
            try:
                logits = self._forward(plan)
            except BaseException as exc:  # every request of the step sees it; a fresh model next time
                self._settle(plan, error=exc)
                self._reset()
                continue
            self._settle(plan, logits)
            with self.ready:
                idle = not self.pending and self.open == 0
            if idle:  # no session held open while nothing runs (the server's idle timeout would free it)
                try:
                    self._end_session()
                except Exception:  # noqa: BLE001 - the link broke: the next step opens a fresh model
                    self._reset()

    def _gather(self) -> list[tuple[Request, int]] | None:
        """The next step: (request, rows of it) once one waits and every open generation's has come or
        GATHER_S passed; decode steps first, then prompts in arrival order, up to step_tokens rows."""
        with self.ready:
            while not self.pending and not self.closed:
                self.ready.wait()
            if self.closed:
                self._settle([(r, 0) for r in self.pending], error=TsqpError("the API is shutting down"))
                return None
            deadline = time.monotonic() + self.gather_s
            while len(self.pending) < self.open and (left := deadline - time.monotonic()) > 0:
                self.ready.wait(left)
            plan, budget = [], self.step_tokens
            for request in sorted(self.pending, key=lambda r: r.left > 1):  # stable: arrival order within each
                if budget == 0:
                    break
                plan.append((request, min(request.left, budget)))
                budget -= plan[-1][1]
            return plan

    def _forward(self, plan: list[tuple[Request, int]]) -> torch.Tensor:
        if self.tee is None:
            self._open()
        tee = self.tee
        if not self.in_session:
            tee.ops.open_session(self.step_tokens)
            self.in_session = True
        segments = [Segment(r.cache, r.pos + r.ran, rows) for r, rows in plan]
        ids = torch.cat([r.ids[r.ran : r.ran + rows] for r, rows in plan])
        positions = torch.cat([torch.arange(s.pos, s.pos + s.rows) for s in segments])
        last = torch.tensor([s.rows for s in segments]).cumsum(0) - 1
        tee.ops.attention.segments = segments
        try:
            return tee.forward_rows(ids, positions, last)
        finally:
            tee.ops.attention.segments = []
            tee.stats.tee_spans.clear()  # a long-running API keeps no per-call history
            tee.stats.server_spans.clear()
            self.steps += 1
            self.rows += ids.shape[0]

    def _settle(self, plan: list[tuple[Request, int]], logits: torch.Tensor | None = None, error=None) -> None:
        """Hands out what the step gave: a finished request's logits, or the error to every request in it."""
        finished = []
        for i, (request, rows) in enumerate(plan):
            request.ran += rows
            if error is None and request.left:
                continue  # a prompt with chunks to go stays pending
            request.logits, request.error = (logits[i : i + 1], None) if error is None else (None, error)
            finished.append(request)
        with self.ready:
            self.pending = [r for r in self.pending if r not in finished]
        for request in finished:
            request.done.set()

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


class BatchedSequence:
    """One generation over the batcher: what `generate.generate` asks of a TeeModel (config, check_ids,
    stats, ops.open_session/close_session, forward), with only its KV cache held here. Its stats count
    nothing: the traffic is the batch model's, shared by every generation in a step."""

    def __init__(self, batcher: StepBatcher):
        self.batcher, self.config = batcher, batcher.config
        self.stats = Stats()
        self.ops = self
        self.cache: KVCache | None = None

    def check_ids(self, ids: torch.Tensor) -> None:
        check_token_ids(ids, self.config.vocab_size)

    def open_session(self, capacity: int) -> None:
        self.cache = KVCache(self.config, capacity)
        self.batcher.joined(+1)

    def close_session(self) -> None:
        if self.cache is not None:
            self.cache = None
            self.batcher.joined(-1)

    def forward(self, ids: torch.Tensor, pos: int = 0, last_only: bool = True) -> torch.Tensor:
        """The last row's logits only (a generation asks no more)."""
        if not last_only:
            raise TsqpError("a batched generation's forward returns its last row's logits only")
        if self.cache is None:
            raise TsqpError("open a session first")
        self.check_ids(ids)
        return self.batcher.run(self.cache, ids, pos)
