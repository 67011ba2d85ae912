"""The one place where the run's modes become compositions of ops (`ops.Ops`) for a `TeeModel`.

    plain, verified     RemoteOps(Calls(link, Verifier), ServerAttention)
    plain, unverified   RemoteOps(Calls(link, Unchecked), ServerAttention)
    plain, --attention tee   RemoteOps(Calls(...), TeeAttention(o_proj: OProj(calls))): qkv returns v
    plain, rows         RemoteOps(Calls(...), RowsAttention(o_proj: OProj(calls))): the API's batched decode
                        steps, each row attended over its own generation's cache (api/batcher.py)
    plain, --attention decode   RemoteOps(Calls(...), DecodeAttention(ServerAttention, TeeAttention)): a
                        fresh prompt's prefill attends on the server, every later step in the TEE
    private             PrivateOps: Masked(Checked(Remote)) linears (Masked(Remote) unverified), TeeAttention,
                        pads from the pool or from a helper (PrivateOptions.helper)

`attach` meets the server (TeeModel.attach: the fingerprint) and then, in private mode, runs the
calibration here (`calibrate`): a TeeModel over `LinearOps` whose linear is `Recording(Local)`, in the
TEE alone, whose largest inputs set the pad scales that open the masked seam.
"""

from __future__ import annotations

import time
from pathlib import Path

from tsqp.errors import TsqpError
from tsqp.model.checkpoint import Checkpoint
from tsqp.stats import Stats
from tsqp.tee.attention import TeeAttention
from tsqp.tee.calls import Calls
from tsqp.tee.checks import Unchecked
from tsqp.tee.decode_attention import DecodeAttention
from tsqp.tee.forward import TeeModel
from tsqp.tee.linear import Local, Recording
from tsqp.tee.ops import Call, Link, Ops
from tsqp.tee.private import LinearOps, PrivateOps, PrivateOptions, calibration_ids
from tsqp.tee.remote import OProj, RemoteOps, link_of
from tsqp.tee.rows_attention import RowsAttention
from tsqp.tee.server_attention import ServerAttention
from tsqp.tee.verify import Verifier

ATTENTION = ("server", "tee", "decode")  # where attention runs: ServerAttention, TeeAttention, DecodeAttention
AUTO_PLAIN = "decode"  # `--attention auto` in the plain split: a prompt's prefill on the server, later steps here
ROWS = "rows"  # a step of many sequences' decode rows (RowsAttention): the API's batcher, not a user's choice


def build_ops(
    checkpoint: Checkpoint,
    call: Link | Call,
    stats: Stats,
    verify: bool = True,
    pipeline: str = "auto",
    private: PrivateOptions | None = None,
    attention: str | None = None,
    fuse: bool = True,
) -> Ops:
    """call: a `wire.client.Client`, a `remote.InProcess`, or a call function.

    verify: check every result (Freivalds); off only for measurements. pipeline: on, off, or auto (on when
    the server reports a GPU device): the server's attention by chunks (server_attention.py) and a prefill's
    checks while the server computes the next call (checks.Overlapped). private: private mode's options;
    None: the plain split. attention: server, tee or decode (prefill on the server, decode in the TEE): the
    plain split's (private mode's is always in the TEE); by default where the mode runs it. fuse: the plain
    split sends fused calls (several products a call, server/fused_calls.py) when the server computes them."""
    attention = attention or ("tee" if private is not None else "server")
    if attention not in ATTENTION and not (attention == ROWS and private is None):
        raise TsqpError(f"--attention must be one of {', '.join(ATTENTION)}, not {attention!r}")
    if attention == "server" and private is not None:
        raise TsqpError("private mode runs attention in the TEE: the server never sees q, k or v")
    link = link_of(call)
    if private is not None:
        return PrivateOps(link, checkpoint, private, stats, verify=verify)
    checker = Verifier(checkpoint, stats, overlap=pipeline) if verify else Unchecked()
    calls = Calls(link, checkpoint.config, checker, stats)
    if attention == "server":
        return RemoteOps(calls, ServerAttention(calls, pipeline), fuse)
    if attention == ROWS:
        return RemoteOps(calls, RowsAttention(checkpoint.config, OProj(calls), stats), fuse)
    here = TeeAttention(checkpoint.config, OProj(calls), stats)
    where = here if attention == "tee" else DecodeAttention(ServerAttention(calls, pipeline), here)
    return RemoteOps(calls, where, fuse)


def run_attention(attention: str, private: bool) -> str:
    """Where a run of the command line attends (`--attention`): as asked, and for `auto` in the TEE in private
    mode, else AUTO_PLAIN. Decode steps in the TEE save a round trip a layer (the scores, 5 calls a layer -> 4;
    1 on a fused server) and half a token's bytes, and a prompt of more than SHORT_STEP_ROWS tokens still
    attends on the server, whose T^2 products a fast server does far quicker (docs/benchmarks.md, "Attention
    in the TEE").
    build_ops' own default (None) stays the complete server path: the checks of every server product."""
    if attention != "auto":
        return attention
    return "tee" if private else AUTO_PLAIN


def tee_model(model: str | Path | Checkpoint, call: Link | Call, stats: Stats | None = None, **modes) -> TeeModel:
    """A TeeModel over the ops the modes compose (`build_ops`'s keywords), not yet attached."""
    checkpoint = model if isinstance(model, Checkpoint) else Checkpoint(model)
    stats = stats or Stats()
    return TeeModel(checkpoint, build_ops(checkpoint, call, stats, **modes), stats)


def attach(tee: TeeModel) -> dict:
    """TeeModel.attach (the server's fingerprint), then private mode's calibration: nothing is sent before."""
    info = tee.attach()
    if isinstance(tee.ops, PrivateOps):
        calibrate(tee.ops, tee.stats)
    return info


def calibrate(ops: PrivateOps, stats: Stats) -> None:
    """The pad scales from the largest input of each linear on the calibration text, computed in the TEE
    alone (its own weights, streamed), installed into ops."""
    start = time.perf_counter()
    checkpoint = ops.checkpoint
    recording = Recording(Local(checkpoint, ops.wire))
    alone = LinearOps(checkpoint.config, ops.embed, recording, stats)
    ids = calibration_ids(checkpoint.dir, checkpoint.config)
    alone.open_session(ids.shape[0])
    TeeModel(checkpoint, alone, stats).forward(ids)
    ops.install_scales(recording.largest, time.perf_counter() - start)
