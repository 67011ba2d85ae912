"""Starting a private server subprocess for a client that was given no --connect, and stopping it."""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from threading import Thread

from tsqp import env
from tsqp.errors import ConnectionLost, LinkRefused
from tsqp.wire.client import Client
from tsqp.wire.curve import client_keys
from tsqp.wire.serve_command import serve_command
from tsqp.wire.transport import ipc_path, private_endpoint

DEFAULT_START_TIMEOUT_S = 600.0
PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None  # resolved before any fork


class ServerProcess:
    """`with ServerProcess(model, device, dtype) as server:` runs `tsqp serve` on a private ipc endpoint."""

    def __init__(
        self,
        model_dir: str,
        device: str = "cpu",
        dtype: str = "float32",
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        endpoint: str | None = None,
        extra_args: list[str] = (),
        curve_keys: str | Path | None = None,
    ):
        """curve_keys: the server runs with --curve-keys DIR; the readiness probe uses DIR's client keys."""
        self.endpoint = endpoint or private_endpoint()
        self.command = serve_command(model_dir, device, dtype, "--listen", self.endpoint, *extra_args)
        if curve_keys is not None:
            self.command += ["--curve-keys", str(curve_keys)]
        self.curve = client_keys(curve_keys) if curve_keys is not None else None
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        self.stderr_tail: deque[str] = deque(maxlen=20)

    def __enter__(self) -> ServerProcess:
        die_with_client = functools.partial(_exit_with_parent, os.getpid()) if _prctl else None
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            preexec_fn=die_with_client,
        )
        Thread(target=self._relay_stderr, daemon=True).start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _relay_stderr(self) -> None:
        """Shows the server's progress lines to the user and keeps the last ones for error messages."""
        quiet = env.read("TSQP_QUIET_SERVER")
        for line in self.process.stderr:
            self.stderr_tail.append(line.rstrip())
            if not quiet:
                sys.stderr.write(line)

    def exit_reason(self) -> str | None:
        """None while the process runs; its exit code and last error line once it has exited."""
        if self.process is None or self.process.poll() is None:
            return None
        time.sleep(0.05)  # let the relay thread catch the last lines
        last = next((line for line in reversed(self.stderr_tail) if line.strip()), "").removeprefix("tsqp: error: ")
        return f"exit code {self.process.returncode}" + (f": {last}" if last else "")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        path = ipc_path(self.endpoint)
        while time.monotonic() < deadline:
            if reason := self.exit_reason():
                raise ConnectionLost(f"the server process exited before it was ready ({reason})")
            if path is None or path.exists():
                try:
                    with Client(self.endpoint, timeout_s=1.0, curve=self.curve) as probe:
                        probe.call("ping")
                    return
                except LinkRefused:
                    raise
                except ConnectionLost:
                    pass
            time.sleep(0.1)
        raise ConnectionLost(
            f"the server was not ready after {self.start_timeout_s:.0f} s; "
            "raise --start-timeout for a large model or start `tsqp serve` yourself and pass --connect"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        path = ipc_path(self.endpoint)
        if path is not None:
            path.unlink(missing_ok=True)
            if path.parent.name.startswith("tsqp-"):
                shutil.rmtree(path.parent, ignore_errors=True)


def _exit_with_parent(parent: int) -> None:
    """Runs in the server child before exec: when the client dies, even by kill -9, the kernel sends the
    server SIGTERM (PR_SET_PDEATHSIG), so no orphaned private server keeps holding the GPU. Linux ties
    this to the thread that started the server: start it from the thread that outlives its use."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the client died before prctl took effect
        os._exit(0)
