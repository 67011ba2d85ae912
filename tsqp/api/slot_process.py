"""An API slot in a process of its own: the TEE model opened in a child, its generations asked over a pipe.

Slots that are threads of one process share its interpreter lock, so concurrent generations' Python work
(the TEE's elementwise ops, checks, packing and unpacking of calls) runs one at a time, whatever the
cores. A slot per process runs them on every core. The child is started by `spawn` (the parent holds
ZeroMQ sockets and OpenMP threads that a fork would copy in a broken state) and connects to the API's
server by its endpoint, each slot its own session as before.

Pipe messages, parent to child: ("generate", prompt_ids, max_tokens, sampling, eos_ids), then after each
token "go", "stop" (the parent's on_token returned True) or "gone" (it raised: the HTTP client left); None
ends the child. Child to parent: ("ready", (config, fingerprint)) once the model is open, ("token", id), then ("done",
Generation), ("gone", None) after a generation cut by "gone" (its session freed), or ("error", exception)
after which the child exits. A token waits for the parent's answer, so a generation stops at the same
token as it does in a thread.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
from collections.abc import Callable
from dataclasses import replace

from tsqp.errors import TsqpError
from tsqp.model.config import ModelConfig
from tsqp.options import RunOptions
from tsqp.tee.generate import Generation, generate
from tsqp.tee.sampling import SamplingOptions

CLOSE_TIMEOUT_S = 10.0


class ClientGone(Exception):
    """Raised from a token callback when the HTTP client went away: the generation ends, its session freed."""


class ProcessSlot:
    """A slot whose TeeModel lives in a child process (module docstring); `server`: the API's own
    `launcher.ServerProcess`, or None with options.connect set."""

    def __init__(self, options: RunOptions, server):
        context = multiprocessing.get_context("spawn")
        self.pipe, child_end = context.Pipe()
        if server is not None:
            options = replace(options, connect=server.endpoint)
        self.process = context.Process(target=serve_slot, args=(options, child_end), name="tsqp-slot", daemon=True)
        self.process.start()
        child_end.close()
        try:
            self.config: ModelConfig
            self.fingerprint: str
            self.config, self.fingerprint = self._receive("ready")
        except BaseException:
            self.close()
            raise

    def generate(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: SamplingOptions,
        eos_ids: tuple[int, ...],
        on_token: Callable[[int], bool | None],
    ) -> Generation:
        self.pipe.send(("generate", prompt_ids, max_tokens, sampling, eos_ids))
        while True:
            kind, value = self._message()
            if kind == "done":
                return value
            if kind == "gone":
                raise ClientGone()
            try:
                self.pipe.send("stop" if on_token(value) else "go")
            except ClientGone:
                self.pipe.send("gone")  # the child frees the session and answers "gone"

    def _receive(self, expected: str):
        kind, value = self._message()
        if kind != expected:
            raise TsqpError(f"the slot's process sent {kind!r} where {expected!r} was due")
        return value

    def _message(self) -> tuple[str, object]:
        """The child's next message; its error raised here, its exit a one-line error."""
        try:
            kind, value = self.pipe.recv()
        except (EOFError, OSError):
            self.process.join(CLOSE_TIMEOUT_S)
            raise TsqpError(f"the slot's process exited (status {self.process.exitcode})") from None
        if kind == "error":
            raise value
        return kind, value

    def close(self) -> None:
        try:
            self.pipe.send(None)
        except OSError:
            pass
        self.process.join(CLOSE_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.pipe.close()


def serve_slot(options: RunOptions, pipe) -> None:
    """The child: opens the model, then runs the parent's generations until told to end (None) or an error."""
    from tsqp.tee.runner import open_model  # here: the parent needs none of the TEE's start-up

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes the slots
    try:
        with open_model(options) as tee:
            pipe.send(("ready", (tee.config, tee.fingerprint)))
            while (request := pipe.recv()) is not None:
                _, prompt_ids, max_tokens, sampling, eos_ids = request
                try:
                    result = generate(tee, prompt_ids, max_tokens, sampling, eos_ids, on_token=asker(pipe))
                except ClientGone:
                    pipe.send(("gone", None))
                    continue
                finally:
                    tee.stats.tee_spans.clear()  # a long-running API keeps no per-call history
                    tee.stats.server_spans.clear()
                pipe.send(("done", result))
    except (EOFError, KeyboardInterrupt):
        return  # the parent went away
    except Exception as exc:
        pipe.send(("error", picklable(exc)))


def asker(pipe) -> Callable[[int], bool]:
    """A generation's token callback that hands the token to the parent and does what it answers."""

    def on_token(token: int) -> bool:
        pipe.send(("token", token))
        answer = pipe.recv()
        if answer == "gone":
            raise ClientGone()
        return answer == "stop"

    return on_token


def picklable(exc: Exception) -> Exception:
    """exc itself when it crosses the pipe intact, else a TsqpError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return TsqpError(f"{type(exc).__name__}: {exc}")
