"""Tensor parallelism: the server's weights split over several ranks (GPUs, or hosts) with torch.distributed.

    rank 0      speaks the protocol (loop.py), owns the sessions and validates every request; then it sends
                the step (its name, and the args and input tensors of each request it runs: one, or several
                clients' batched) to the other ranks and runs its own share
    followers   `follow`: receive a step, run the same Engine step method on their share, join its
                collectives; they never see a client

What a rank holds, and how rank 0 assembles the results: sharded.py.

Collectives run over NCCL between GPUs and gloo on CPUs; the steps themselves always go over gloo, so a rank
that died is noticed at the next step by its connection closing, not after NCCL's timeout. When rank 0 has
nothing to send for HEARTBEAT_S it sends a heartbeat: a follower never waits long enough to time out, and a
dead rank is noticed while the server is idle. A rank lost is fatal (`RankFailure`): the ranks are out of
step, so rank 0 answers its clients with the error and exits, and the followers exit with it.

Launch: `tsqp serve --tensor-parallel N` on one host starts ranks 1..N-1 itself, with the environment
torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
across hosts torchrun starts every rank and each reads those variables (README, "Several GPUs").
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import timedelta

import msgpack
import torch
import torch.distributed as dist

from tsqp.errors import TsqpError
from tsqp.wire.protocol import DTYPE_NAMES, DTYPES
from tsqp.wire.serve_command import serve_command

STEP_HEADER_BYTES = 4096  # one gloo broadcast per step header (a name, its calls' args, descriptors); a longer one: two
HEARTBEAT_S = 1.0
RANK_TIMEOUT_S = 600.0  # a collective waits this long for a rank that is alive but stuck (a dead one: at once)
STOP, HEARTBEAT = "stop", "heartbeat"


class RankFailure(TsqpError):
    """A tensor-parallel rank died or stopped answering: the ranks are out of step, the server stops."""


# -- this process among the ranks ----------------------------------------------------------------------


class Ranks:
    """This process's place among the tensor-parallel ranks, and the collectives the engine's steps use.

    The default, one rank, is the unsharded server: every collective is the identity."""

    def __init__(
        self,
        rank: int = 0,
        world: int = 1,
        device: str = "cpu",
        control=None,
        children: dict[int, subprocess.Popen] | None = None,
    ):
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.control = control  # the gloo group the steps travel on (None: the default group, gloo already)
        self.children = children or {}  # rank -> process, for the ranks this process started
        self.last_sent = time.monotonic()

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # -- rank 0 -> followers -----------------------------------------------------------------------

    def send(self, step: str, args: dict, tensors: Sequence[torch.Tensor] = ()) -> None:
        """Rank 0: the next step for every follower, its input tensors broadcast after its header."""
        if self.world == 1:
            return
        tensors = [t.contiguous() for t in tensors]
        descriptors = [[DTYPE_NAMES[t.dtype], list(t.shape)] for t in tensors]
        header = msgpack.packb({"step": step, "args": args, "tensors": descriptors}, use_bin_type=True)
        packed = torch.frombuffer(bytearray(len(header).to_bytes(4, "little") + header), dtype=torch.uint8)
        buffer = torch.zeros(STEP_HEADER_BYTES, dtype=torch.uint8)
        buffer[: min(len(packed), STEP_HEADER_BYTES)] = packed[:STEP_HEADER_BYTES]
        with self._collective(step):
            dist.broadcast(buffer, src=0, group=self.control)
            if len(packed) > STEP_HEADER_BYTES:  # a batch of many clients' calls: the rest of its header
                dist.broadcast(packed[STEP_HEADER_BYTES:].clone(), src=0, group=self.control)
            for tensor in tensors:
                dist.broadcast(_bytes(tensor), src=0)
        self.last_sent = time.monotonic()

    def receive(self) -> tuple[str, dict, list[torch.Tensor]]:
        """A follower: the next step (heartbeats skipped) as (name, args, input tensors)."""
        while True:
            buffer = torch.empty(STEP_HEADER_BYTES, dtype=torch.uint8)
            with self._collective("waiting for the next step"):
                dist.broadcast(buffer, src=0, group=self.control)
            size = int.from_bytes(buffer[:4].numpy().tobytes(), "little")
            if 4 + size > STEP_HEADER_BYTES:
                rest = torch.empty(4 + size - STEP_HEADER_BYTES, dtype=torch.uint8)
                with self._collective("waiting for the next step"):
                    dist.broadcast(rest, src=0, group=self.control)
                buffer = torch.cat([buffer, rest])
            header = msgpack.unpackb(buffer[4 : 4 + size].numpy().tobytes(), raw=False)
            tensors = []
            for name, shape in header["tensors"]:
                dtype = DTYPES[name]
                flat = torch.empty(math.prod(shape) * dtype.itemsize, dtype=torch.uint8, device=self.device)
                with self._collective(header["step"]):
                    dist.broadcast(flat, src=0)
                tensors.append(flat.view(dtype).view(shape))
            if header["step"] != HEARTBEAT:
                return header["step"], header["args"], tensors

    def heartbeat(self) -> None:
        """Rank 0, between requests: a heartbeat if nothing was sent for HEARTBEAT_S."""
        if self.world > 1 and self.leader and time.monotonic() - self.last_sent >= HEARTBEAT_S:
            self.send(HEARTBEAT, {})

    # -- the collectives of a step -----------------------------------------------------------------

    def gather(self, local: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `local` (same shape and dtype on all) at rank 0, in rank order; None elsewhere."""
        if self.world == 1:
            return [local]
        flat = _bytes(local.contiguous())
        parts = [torch.empty_like(flat) for _ in range(self.world)] if self.leader else None
        with self._collective("gather"):
            dist.gather(flat, parts, dst=0)
        if parts is None:
            return None
        return [part.view(local.dtype).view(local.shape) for part in parts]

    def reduce(self, tensor: torch.Tensor) -> None:
        """Sums every rank's `tensor` into rank 0's, in float32 at least (16-bit partial sums are upcast)."""
        if self.world == 1:
            return
        exact = tensor.dtype in (torch.float32, torch.float64)
        total = tensor if exact else tensor.float()
        with self._collective("reduce"):
            dist.reduce(total, dst=0)
        if not exact and self.leader:
            tensor.copy_(total)

    @contextmanager
    def _collective(self, what: str):
        """A collective's failure (gloo: the connection closed, or the timeout) as a RankFailure."""
        try:
            yield
        except RuntimeError as exc:  # dist.DistError is one
            raise RankFailure(self._reason(what, exc)) from None

    # -- faults and the end ------------------------------------------------------------------------

    def lost(self) -> str | None:
        """Why a rank this process started has exited, if one has (rank 0 polls this between requests)."""
        for rank, child in self.children.items():
            code = child.poll()
            if code is not None:
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                return f"tensor-parallel rank {rank} (pid {child.pid}) {how}: the server stops; start it again"
        return None

    def _reason(self, what: str, exc: BaseException) -> str:
        detail = " ".join(str(exc).split("] ", 1)[-1].split(". ")[0].split())  # gloo: "Connection closed by peer"
        if not self.leader:
            return f"rank {self.rank}: rank 0 is gone ({what}: {detail})"
        deadline = time.monotonic() + 2.0  # a child that died closed its connections first: let it be reaped
        while time.monotonic() < deadline and self.children:
            if reason := self.lost():
                return reason
            time.sleep(0.02)
        return f"a tensor-parallel rank stopped answering during {what} ({detail}): the server stops"

    def close(self) -> None:
        """Rank 0 stops the followers (a clean exit); any rank leaves the group."""
        if self.world == 1:
            return
        if self.leader:
            try:
                self.send(STOP, {})
            except RankFailure:
                pass
        self.abort(grace_s=10.0)
        if dist.is_initialized():
            dist.destroy_process_group()

    def abort(self, grace_s: float = 0.0) -> None:
        """Waits grace_s for the ranks this process started, then stops those still running."""
        deadline = time.monotonic() + grace_s
        for child in self.children.values():
            try:
                child.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                child.terminate()
        for child in self.children.values():
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view: collectives carry any dtype alike."""
    return tensor.reshape(-1).view(torch.uint8)


# -- starting the ranks --------------------------------------------------------------------------------


def rank_device(device: str, local_rank: int) -> str:
    """cuda or cuda:K -> cuda:(K + LOCAL_RANK): each rank of a host on its own GPU; cpu stays cpu."""
    if not device.startswith("cuda"):
        return device
    first = int(device.partition(":")[2] or 0)
    index = first + local_rank
    if index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise TsqpError(f"the rank with LOCAL_RANK {local_rank} needs cuda:{index}, but this host has {count} GPUs")
    return f"cuda:{index}"


def follower_command(model_dir: str, device: str, dtype: str, world: int, private_only: bool) -> list[str]:
    """What rank 0 runs for each other rank on its host: the same `tsqp serve`, without an endpoint."""
    flags = ["--tensor-parallel", str(world)] + (["--private-only"] if private_only else [])
    return serve_command(model_dir, device, dtype, *flags)


def join(world: int, device: str, command: list[str]) -> Ranks:
    """This process's Ranks among `world`: from the environment when it has RANK and WORLD_SIZE (a
    torchrun worker, or a rank that rank 0 of this host started), else as rank 0, starting ranks
    1..world-1 on this host with `command`."""
    env = os.environ
    launched = "RANK" in env and "WORLD_SIZE" in env
    if launched:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank, local_world = int(env.get("LOCAL_RANK", "0")), int(env.get("LOCAL_WORLD_SIZE", str(size)))
        if size != world:
            raise TsqpError(f"WORLD_SIZE is {size} but --tensor-parallel is {world}: start as many ranks as shards")
    else:
        rank, local_rank, local_world = 0, 0, world
        rank_device(device, world - 1)  # this host has a GPU for each rank
    device = rank_device(device, local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    else:  # the host's cores shared among its ranks
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    timeout = timedelta(seconds=RANK_TIMEOUT_S)
    children: dict[int, subprocess.Popen] = {}
    if launched:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    else:  # the variables torchrun would set, for this process and the ranks it starts
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        for follower in range(1, world):
            variables = {
                "RANK": str(follower),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(follower),
                "LOCAL_WORLD_SIZE": str(world),
            }
            children[follower] = subprocess.Popen(command, env={**os.environ, **variables}, stdin=subprocess.DEVNULL)
        met = threading.Event()
        threading.Thread(target=_exit_if_lost_while_joining, args=(Ranks(children=children), met), daemon=True).start()
        dist.init_process_group(backend, init_method="env://", rank=0, world_size=world, timeout=timeout)
        met.set()
    control = dist.new_group(backend="gloo") if backend == "nccl" else None
    return Ranks(rank, world, device, control=control, children=children)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _exit_if_lost_while_joining(ranks: Ranks, met: threading.Event) -> None:
    """init_process_group waits RANK_TIMEOUT_S for a rank that never comes: a child that died meanwhile
    (a bad flag, a model folder it cannot read) ends rank 0 at once, with that child's reason."""
    while not met.wait(0.1):
        if reason := ranks.lost():
            print(f"tsqp: error: {reason.split(':')[0]} before the ranks met", file=sys.stderr, flush=True)
            ranks.abort()
            os._exit(1)


def follow(engine) -> None:
    """A follower's life: run each step rank 0 sends, until it sends stop. engine: a server.engine.Engine."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank of a terminal: rank 0 stops us
    ranks = engine.ranks
    while True:
        step, args, tensors = ranks.receive()
        if step == STOP:
            break
        try:
            engine.step(step, args, tensors)
        except RankFailure:
            raise
        except Exception as exc:  # out of memory, a bug: the ranks are out of step now
            raise RankFailure(f"rank {ranks.rank} failed in {step}: {type(exc).__name__}: {exc}") from None
