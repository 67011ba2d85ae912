"""TEE models for the API's concurrent requests: one slot per generation in flight, each its own link.

A slot is a `TeeModel` with its own connection to the server, so the server sees each HTTP request as
its own session, interleaved with the others op by op. Slots are opened when the requests need them,
up to `parallel`; a request beyond that waits for one to come free. A slot whose link failed (the
server gone, a result that failed verification) is closed and replaced by a fresh one on the next
request, which is refused at once if the server is still unreachable.

With a fixed arena name (`--arena-name NAME`, as a Gramine manifest lists it), slot k maps the arena
NAME.k, k < parallel: two slots never share one arena, and a manifest can list every name in advance
(`arena_names`).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable
from contextlib import ExitStack

from tsqp.options import RunOptions
from tsqp.tee.forward import TeeModel
from tsqp.tee.generate import Generation, generate
from tsqp.tee.runner import open_model
from tsqp.tee.sampling import SamplingOptions


class ClientGone(Exception):
    """Raised from a token callback when the HTTP client went away: the generation ends, its session freed."""


def arena_names(name: str | None, parallel: int) -> list[str | None]:
    """The arena each of `parallel` slots maps: NAME.k for a fixed name, else None (a fresh name each)."""
    return [f"{name}.{k}" if name else None for k in range(parallel)]


class Slot:
    def __init__(self, options: RunOptions, server, arena_name: str | None):
        self.arena_name = arena_name
        self.stack = ExitStack()
        try:
            slot_options = dataclasses.replace(options, arena_name=arena_name)
            self.tee: TeeModel = self.stack.enter_context(open_model(slot_options, server=server))
        except BaseException:
            self.stack.close()
            raise

    def close(self) -> None:
        self.stack.close()


class ModelSlots:
    def __init__(self, options: RunOptions, eos_ids: tuple[int, ...], parallel: int, server=None):
        """server: the `launcher.ServerProcess` the API started, or None with options.connect set."""
        self.options = options
        self.server = server
        self.eos_ids = eos_ids
        self.parallel = parallel
        self.idle: queue.LifoQueue[Slot] = queue.LifoQueue()  # the warmest slot first
        self.free = threading.Semaphore(parallel)  # at most `parallel` slots exist
        self.names: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # arena names no slot holds
        for name in arena_names(options.arena_name, parallel):
            self.names.put(name)

    def start(self) -> TeeModel:
        """Opens the first slot now, so that a model or server problem is reported before the API listens."""
        slot = self._open()
        self.idle.put(slot)
        return slot.tee

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
                result = generate(slot.tee, prompt_ids, max_tokens, sampling, self.eos_ids, on_token=on_token)
                healthy = True
                return result
            except ClientGone:
                healthy = True  # the session was closed on the way out; the link is fine
                raise
            # any other error (the server gone, a result that failed verification): the slot is closed
            finally:
                slot.tee.stats.tee_spans.clear()  # a long-running API keeps no per-call history
                slot.tee.stats.server_spans.clear()
                self._give_back(slot, healthy)

    def _take(self) -> Slot:
        """An idle slot, else a new one (the semaphore held keeps their number within `parallel`)."""
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            return self._open()

    def _open(self) -> Slot:
        name = self.names.get_nowait()  # never empty: each slot holds one name, and at most `parallel` exist
        try:
            return Slot(self.options, self.server, name)
        except BaseException:
            self.names.put(name)
            raise

    def _close(self, slot: Slot) -> None:
        try:
            slot.close()
        finally:
            self.names.put(slot.arena_name)

    def _give_back(self, slot: Slot, healthy: bool) -> None:
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
                return
