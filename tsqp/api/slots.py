"""TEE models for the API's concurrent requests: one slot per generation in flight, each its own link.

A slot is a `TeeModel` with its own connection to the server, so the server sees each HTTP request as
its own session, interleaved with the others op by op. Slots are opened when the requests need them,
up to `parallel`; a request beyond that waits for one to come free. A slot whose link failed (the
server gone, a result that failed verification) is closed and replaced by a fresh one on the next
request, which is refused at once if the server is still unreachable.

With a fixed arena name (`--arena-name NAME`, as a Gramine manifest lists it), slot k maps the arena
NAME.k, k < parallel: two slots never share one arena, and a manifest can list every name in advance
(`arena_names`, gramine/arena_names.py).

A slot is a thread of this process (`ThreadSlot`, the default) or a process of its own
(`slot_process.ProcessSlot`, `tsqp api --slots processes`): threads share one interpreter lock, so their
generations' Python work runs one at a time; processes can run it on every core, but each costs a start
(slow under Gramine) and its own copy of the keys. On two shared cores, where the server's products and
the other sessions already take the cores, processes measured no faster (docs/benchmarks.md).

`--slots batched`: threads that hold only their generation's KV cache (in the TEE) and sampling, every
forward pass of theirs run with the others' as the rows of one step (`BatchedSlot`, api/batcher.py): one
TEE model, one link (arena NAME.0), one server session, attention in the TEE.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from collections.abc import Callable
from contextlib import ExitStack

from tsqp.api.batcher import BatchedSequence, StepBatcher
from tsqp.api.slot_process import ClientGone, ProcessSlot
from tsqp.errors import TsqpError
from tsqp.model.config import ModelConfig
from tsqp.options import RunOptions
from tsqp.tee.compose import ROWS
from tsqp.tee.forward import TeeModel
from tsqp.tee.generate import Generation, generate
from tsqp.tee.runner import open_model
from tsqp.tee.sampling import SamplingOptions


class ThreadSlot:
    """A slot run by the API's worker threads, in this process."""

    def __init__(self, options: RunOptions, server):
        self.stack = ExitStack()
        try:
            self.tee: TeeModel = self.stack.enter_context(open_model(options, server=server))
        except BaseException:
            self.stack.close()
            raise
        self.config: ModelConfig = self.tee.config
        self.fingerprint: str = self.tee.fingerprint

    def generate(self, prompt_ids, max_tokens, sampling, eos_ids, on_token) -> Generation:
        """`ProcessSlot.generate`, on this process's model."""
        try:
            return generate(self.tee, prompt_ids, max_tokens, sampling, eos_ids, on_token=on_token)
        finally:
            self.tee.stats.tee_spans.clear()  # a long-running API keeps no per-call history
            self.tee.stats.server_spans.clear()

    def close(self) -> None:
        self.stack.close()


class BatchedSlot:
    """A slot whose generation holds only its KV cache: every forward pass of it runs in the batcher's steps."""

    def __init__(self, options: RunOptions, server, batcher: StepBatcher):
        """options, server: unused (the batcher holds the one link)."""
        self.batcher = batcher
        self.config: ModelConfig = batcher.config
        self.fingerprint: str = batcher.fingerprint

    def generate(self, prompt_ids, max_tokens, sampling, eos_ids, on_token) -> Generation:
        sequence = BatchedSequence(self.batcher)
        try:
            return generate(sequence, prompt_ids, max_tokens, sampling, eos_ids, on_token=on_token)
        finally:
            sequence.close_session()  # after a lost connection too, which generate leaves open

    def close(self) -> None:
        pass


def slots_kind(options) -> str:
    """`--slots` as given, or auto's choice: batched, unless the run is private or attends on the server
    (which batched slots cannot do: they attend in the TEE, each generation over its own cache)."""
    run = options.run
    if options.slots != "auto":
        return options.slots
    return "threads" if run.private or run.attention in ("server", "decode") else "batched"


def batched_options(options: RunOptions) -> RunOptions:
    """The batch model's options: the plain split, each generation attended over its own cache in the TEE."""
    if options.private:
        raise TsqpError("--slots batched runs the plain split: private mode's slots are threads or processes")
    if options.attention not in ("auto", "tee"):
        raise TsqpError("--slots batched attends in the TEE, each generation over its own cache: --attention tee")
    return dataclasses.replace(options, attention=ROWS)


def arena_names(name: str | None, parallel: int) -> list[str | None]:
    """The arena each of `parallel` slots maps: NAME.k for a fixed name, else None (a fresh name each)."""
    return [f"{name}.{k}" if name else None for k in range(parallel)]


class ModelSlots:
    def __init__(self, options: RunOptions, eos_ids: tuple[int, ...], parallel: int, server=None, kind="threads"):
        """server: the `launcher.ServerProcess` the API started, or None with options.connect set.
        kind: threads, processes or batched (module docstring)."""
        self.options = options
        self.slot = ProcessSlot if kind == "processes" else ThreadSlot
        self.batcher: StepBatcher | None = None
        if kind == "batched":  # one link, the batch model's, on the first arena name
            batch = dataclasses.replace(batched_options(options), arena_name=arena_names(options.arena_name, 1)[0])
            self.batcher = StepBatcher(functools.partial(open_model, batch, server=server))
            self.slot = functools.partial(BatchedSlot, batcher=self.batcher)
        self.server = server
        self.eos_ids = eos_ids
        self.parallel = parallel
        self.idle: queue.LifoQueue[ThreadSlot | ProcessSlot] = queue.LifoQueue()  # the warmest slot first
        self.free = threading.Semaphore(parallel)  # at most `parallel` slots exist
        self.names: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # arena names no slot holds
        for name in arena_names(options.arena_name, parallel):
            self.names.put(name)

    def start(self) -> ThreadSlot | ProcessSlot:
        """Opens the first slot now, so that a model or server problem is reported before the API listens;
        its `config` and `fingerprint` describe the model every slot runs."""
        slot = self._open()
        self.idle.put(slot)
        return slot

    def run(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: SamplingOptions,
        on_token: Callable[[int], bool | None],
    ) -> Generation:
        """One generation on a free slot (waits for one); runs in a worker thread."""
        with self.free:
            slot = self._take()
            healthy = False
            try:
                result = slot.generate(prompt_ids, max_tokens, sampling, self.eos_ids, on_token)
                healthy = True
                return result
            except ClientGone:
                healthy = True  # the session was closed on the way out; the link is fine
                raise
            # any other error (the server gone, a result that failed verification): the slot is closed
            finally:
                self._give_back(slot, healthy)

    def _take(self) -> ThreadSlot | ProcessSlot:
        """An idle slot, else a new one (the semaphore held keeps their number within `parallel`)."""
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            return self._open()

    def _open(self) -> ThreadSlot | ProcessSlot:
        name = self.names.get_nowait()  # never empty: each slot holds one name, and at most `parallel` exist
        try:
            slot = self.slot(dataclasses.replace(self.options, arena_name=name), self.server)
        except BaseException:
            self.names.put(name)
            raise
        slot.arena_name = name  # given back to `names` when the slot closes
        return slot

    def _close(self, slot: ThreadSlot | ProcessSlot) -> None:
        try:
            slot.close()
        finally:
            self.names.put(slot.arena_name)

    def _give_back(self, slot: ThreadSlot | ProcessSlot, healthy: bool) -> None:
        if healthy:
            self.idle.put(slot)
        else:
            self._close(slot)

    def server_gone(self) -> str | None:
        """Why the API's own server exited, or None while it runs (or when it is someone else's)."""
        return self.server.exit_reason() if self.server is not None else None

    def close(self) -> None:
        while True:
            try:
                self._close(self.idle.get_nowait())
            except queue.Empty:
                break
        if self.batcher is not None:
            self.batcher.close()
