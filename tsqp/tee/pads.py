"""Where a pad's z W^T comes from: the seam between private mode's masking and its two pad sources.

A pad source hands out, per linear op and number of rows, a `Pad`: a fresh z (rows, in) of standard
Gaussians and, once asked, z W^T (rows, out). `linear.Masked` scales both by the op's pad scale.

    PoolPads    Slalom's way: precomputed in the TEE into encrypted pool files (pad_pool.py); a client
                with too few pads computes what it lacks first, and reports it as offline time
    HelperPads  a second, non-colluding server computes z W^T from the pad's seed (sent over CurveZMQ)
                while the primary computes (x + s z) W^T; nothing is precomputed

and one layer over a pool, `Ahead`: the next op's pad is taken from the pool (its z W^T decrypted, its z
expanded) in a worker thread while the current product is masked, computed and checked.

Every pad is handed out once: a pool's rows are erased as they are taken, a helper's seed is new for
each call, and a Pad's result can be taken only once.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from tsqp.errors import TsqpError
from tsqp.model.checkpoint import Checkpoint
from tsqp.stats import Stats
from tsqp.tee.linear import Checked
from tsqp.tee.op_weights import Op, model_ops, op_dims
from tsqp.tee.pad_pool import PoolClaimed, PoolError, PoolReader, fill, pool_files, pool_key, streams
from tsqp.wire.pad_seeds import expand, new_seed
from tsqp.wire.protocol import MASKED_DTYPE, expect

AHEAD_ROWS = 16  # a short take (a decode step's one row) expands this many rows of its seed at once


class PadReuse(TsqpError):
    """A pad was asked for a second time."""


class Pad:
    """z (rows, in) now; z W^T once, from `finish`."""

    def __init__(
        self, op: Op, z: torch.Tensor, finish: Callable[[], torch.Tensor], cancel: Callable[[], None] = lambda: None
    ):
        self.op, self.z, self._finish, self._cancel = op, z, finish, cancel
        self.used = False

    def result(self) -> torch.Tensor:
        if self.used:
            raise PadReuse(f"the pad of {self.op} was already used: a pad is used once")
        self.used = True
        return self._finish()

    def cancel(self) -> None:
        """The pad will not be used (the product failed): erased, and a helper's reply not waited for."""
        self.z.zero_()
        if not self.used:
            self.used = True
            self._cancel()


class PoolPads:
    def __init__(self, checkpoint: Checkpoint, fingerprint: str, wire: torch.dtype, folder: Path, stats: Stats):
        self.checkpoint, self.fingerprint, self.wire = checkpoint, fingerprint, wire
        self.folder, self.stats = folder, stats
        self.layout = streams(checkpoint)
        self.index = {s.op: i for i, s in enumerate(self.layout)}
        self.readers: list[PoolReader] = []
        self.offline_s = 0.0  # computing pads this client lacked
        self.computed_tokens = 0
        self.claimed_tokens = 0  # pads made ahead of time (`tsqp pads`) that this client took
        self.ahead: dict[int, tuple[bytes, int, torch.Tensor]] = {}  # stream -> (seed, first row, z rows)

    @property
    def bytes_per_token(self) -> int:
        """Pool bytes a token's pads take (z W^T of every op, LM head included; seeds are per block)."""
        return sum(s.out for s in self.layout) * MASKED_DTYPE.itemsize

    def left(self) -> int:
        """Rows every stream has left, over the claimed pools."""
        return min(sum(r.left(i) for r in self.readers) for i in range(len(self.layout)))

    def reserve(self, tokens: int) -> None:
        """Makes sure every op has pads for `tokens` rows: claims pools made ahead of time, then computes
        what is still missing (offline work, timed apart)."""
        for reader in [r for r in self.readers if r.spent()]:  # a generation's leftover LM head rows
            reader.close()
            self.readers.remove(reader)
        key = None
        for path in pool_files(self.folder, self.fingerprint, self.wire):
            if self.left() >= tokens:
                return
            key = key or pool_key(self.folder)
            try:
                reader = PoolReader(path, key, self.fingerprint, self.wire, self.layout)
            except PoolClaimed:
                continue
            self.readers.append(reader)
            self.claimed_tokens += reader.tokens
        missing = tokens - self.left()
        if missing > 0:  # filled for this client alone: claimed before any other client can see it
            path, seconds = fill(self.checkpoint, self.fingerprint, self.wire, missing, self.folder, publish=False)
            self.offline_s += seconds
            self.computed_tokens += missing
            self.readers.append(PoolReader(path, pool_key(self.folder), self.fingerprint, self.wire, self.layout))

    def start(self, op: Op, rows: int, label: str = "pads") -> Pad:
        """The next `rows` rows of the op's stream; `label` names the time in Stats."""
        stream = self.index[op]
        if sum(r.left(stream) for r in self.readers) < rows:
            self.reserve(rows)  # a forward pass outside a reserved session
        with self.stats.tee(label):
            width = self.layout[stream].width
            zs, zws, done = [], [], 0
            for reader in self.readers:
                take = min(rows - done, reader.left(stream))
                if take <= 0:
                    continue
                try:
                    seeds, zw = reader.take(stream, take)
                except PoolError:  # an altered block: this pool is done for, the error says why
                    self.readers.remove(reader)
                    reader.close()
                    raise
                zs += [self._z(stream, seed, first, n, width) for seed, first, n in seeds]
                zws.append(zw)
                done += take
                if done == rows:
                    break
            self.readers = [r for r in self.readers if _keep(r)]  # used up: closed now
            z = torch.cat(zs) if len(zs) > 1 else zs[0]
            zw = torch.cat(zws) if len(zws) > 1 else zws[0]
        return Pad(op, z, lambda: zw, cancel=zw.zero_)

    def _z(self, stream: int, seed: bytes, first: int, rows: int, width: int) -> torch.Tensor:
        """Rows [first, first + rows) of the seed's pad. A short run is cut from AHEAD_ROWS rows expanded at
        once (the keystream's set-up and the transform's per-call cost shared by a decode's next steps), each
        row erased as it is handed out: the pool hands out a seed's row once, so no row is handed out twice."""
        held = self.ahead.get(stream)
        if held is None or held[0] != seed or not held[1] <= first <= held[1] + held[2].shape[0] - rows:
            if held is not None:  # rows past, or rows a long take hands out now: erased
                with torch.inference_mode():  # the rows held are made and erased in inference mode
                    held[2].zero_()
                del self.ahead[stream]
            if rows >= AHEAD_ROWS:
                return expand(seed, rows, width, start_row=first)
            with torch.inference_mode():
                held = self.ahead[stream] = (seed, first, expand(seed, AHEAD_ROWS, width, start_row=first))
        rows_held = held[2][first - held[1] : first - held[1] + rows]
        z = rows_held.clone()  # outside inference mode, a tensor its caller may erase
        with torch.inference_mode():
            rows_held.zero_()
        return z

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.readers = []
        with torch.inference_mode():
            for _, _, z in self.ahead.values():
                z.zero_()  # erased: rows expanded ahead and never used
        self.ahead.clear()


def _keep(reader: PoolReader) -> bool:
    if any(reader.left(i) for i in range(len(reader.layout))):
        return True
    reader.close()
    return False


class Ahead:
    """A pool source whose next pad is made while the current one is in use: when the step asks for an
    op's pad, the following op of the same step (the forward order, `model_ops`) with as many rows is
    taken from the pool in a worker thread (AES-GCM and the keystream's expansion leave the interpreter
    lock; so do the TEE's waits on the server), and handed out when asked for.

    Only what the step surely asks for next is taken ahead: the ops of one step run in order with the
    same rows, up to the last layer's down; the LM head (its rows vary) and a step's first op are taken
    when asked. So are short takes (fewer than AHEAD_ROWS rows: a decode step's): their cost is mostly
    the interpreter's, which a thread only moves under the step's own Python (one interpreter lock: a
    decode's `mask` went from 48 to 105 us a call when its one-row pads were taken ahead). A pad taken
    ahead and not asked for (a failed step, another order) is erased unused: the pool rows it took are
    spent, never handed out. The source is used by one thread at a time: the worker's take is waited for
    before anything else touches it."""

    def __init__(self, source: PoolPads, config):
        self.source, self.stats = source, source.stats
        ops = model_ops(config)
        self.following = {op: ops[i + 1] for i, op in enumerate(ops[:-2])}  # down of the last layer: none
        self.worker: ThreadPoolExecutor | None = None  # started at the first take ahead, ended at close
        self.pending: tuple[Op, int, Future] | None = None

    # what the benchmark reads of the source
    offline_s = property(lambda self: self.source.offline_s)
    computed_tokens = property(lambda self: self.source.computed_tokens)
    claimed_tokens = property(lambda self: self.source.claimed_tokens)
    bytes_per_token = property(lambda self: self.source.bytes_per_token)

    def start(self, op: Op, rows: int) -> Pad:
        pad = self._settle(op, rows)
        if pad is None:
            pad = self.source.start(op, rows)
        following = self.following.get(op)
        if following is not None and rows >= AHEAD_ROWS:
            self.worker = self.worker or ThreadPoolExecutor(1, thread_name_prefix="tsqp-pads")
            self.pending = (following, rows, self.worker.submit(self.source.start, following, rows, "pads ahead"))
        return pad

    def _settle(self, op: Op, rows: int | None = None) -> Pad | None:
        """The pad taken ahead if it is the one asked for; otherwise it is erased unused."""
        if self.pending is None:
            return None
        ahead_op, ahead_rows, future = self.pending
        self.pending = None
        with self.stats.tee("pads"):
            pad = future.result()  # the pool's error, if it failed, is raised here
        if (ahead_op, ahead_rows) == (op, rows):
            return pad
        with torch.inference_mode():  # the pool's z W^T is an inference tensor, whoever erases it
            pad.cancel()
        return None

    def reserve(self, tokens: int) -> None:
        self._settle(None)
        self.source.reserve(tokens)

    def close(self) -> None:
        try:
            self._settle(None)
        finally:
            self.source.close()
            if self.worker is not None:
                self.worker.shutdown(wait=True)
                self.worker = None


class HelperPads:
    """z W^T from a helper server (`tsqp serve` run by another party), checked like any product."""

    def __init__(self, link, config, checked: Checked | None, stats: Stats):
        self.link, self.config, self.checked, self.stats = link, config, checked, stats
        self.offline_s = 0.0
        self.computed_tokens = self.claimed_tokens = 0
        self.bytes_per_token = 0  # nothing is stored

    def reserve(self, tokens: int) -> None:
        pass

    def start(self, op: Op, rows: int) -> Pad:
        width, out = op_dims(self.config, op)
        seed = new_seed()
        request = self.link.submit(
            "pad", {**op.args, "seed": seed, "rows": rows}, reply_bytes=rows * out * MASKED_DTYPE.itemsize
        )
        with self.stats.tee("pads"):
            z = expand(seed, rows, width)  # while the helper computes

        def finish() -> torch.Tensor:
            reply = self.link.wait(request)
            expect(reply.tensors, [(MASKED_DTYPE, (rows, out))], "pad")
            with self.stats.tee("copy"):
                zw = reply.tensors[0].clone()
            if self.checked is not None:
                self.checked.check(op, z, zw, bias=False, who="helper")
            return zw

        return Pad(op, z, finish, cancel=lambda: self.link.discard(request))

    def close(self) -> None:
        pass
