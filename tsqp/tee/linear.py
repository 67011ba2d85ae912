"""Private mode's linear seam: one call, `linear(op, x) -> x W^T + b`, through small layers that each own
one thing, the way tinygrad hands its model the linear layer:

    Masked(pads, scales, Checked(keys, Remote(link)))   the default: pad, send, check, unpad
    Recording(Local(checkpoint))                        the TEE alone (calibrating the pad scales)

`Op` names one linear of the model: qkv (q, k and v fused), o_proj, gate_up, down (each with its layer)
and lm_head. `Remote` sends an op to the server as `masked_linear`; the server computes in float64 and
never sees an unmasked activation. `Checked` runs a Freivalds check on every product, masked or not
(the TEE knows the x + r it sent), with float64 keys (`freivalds.masked_keys`) and a float64 tolerance.
`Masked` adds the pad r = s z and removes s (z W^T) from the result: (x + r) W^T + b - r W^T.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tsqp.errors import IntegrityError, TsqpError
from tsqp.model.checkpoint import Checkpoint
from tsqp.model.config import ModelConfig
from tsqp.stats import Stats
from tsqp.tee.freivalds import LAMBDA, U64, LinearKey, compare_difference, linear_gains, times
from tsqp.tee.op_weights import Op, op_dims, product
from tsqp.wire.protocol import MASKED_DTYPE, expect

Linear = Callable[[Op, torch.Tensor], torch.Tensor]  # (op, x (T, in)) -> x W^T + b (T, out)


class Remote:
    """The server computes the product (`masked_linear`, float64): it sees only what it is given."""

    def __init__(self, link, config: ModelConfig, stats: Stats):
        self.link, self.config, self.stats = link, config, stats

    def submit(self, op: Op, x: torch.Tensor) -> int:
        rows, out = x.shape[0], op_dims(self.config, op)[1]
        return self.link.submit("masked_linear", op.args, [x], reply_bytes=rows * out * MASKED_DTYPE.itemsize)

    def collect(self, op: Op, request_id: int, rows: int) -> torch.Tensor:
        reply = self.link.wait(request_id)
        expect(reply.tensors, [(MASKED_DTYPE, (rows, op_dims(self.config, op)[1]))], "masked_linear")
        with self.stats.tee("copy"):
            return reply.tensors[0].clone()  # copy out of the arena, then check and use

    def __call__(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        return self.collect(op, self.submit(op, x), x.shape[0])


class Checked:
    """Every product passes a float64 Freivalds check before it is used: y s == x w + b s.

    Tolerance per row and vector, as in verify.py with float64 rounding throughout (the server's
    product and the TEE's check): LAMBDA [(u + U64 sqrt(out)) S_MAX ||y|| + U64 (sqrt(in) + sqrt(out))
    omega ||x||], ||y|| measured (one pass over the result; the bound ||x|| ||W||_F + ||b|| is about
    sqrt(in) times looser on a masked row, whose pad dominates it). For a masked product x is x + r, so
    what the check lets through is of the size of the float64 rounding of the masked product: about
    2^-53 sqrt(in) times |r| |W|, 2^(k-53) sqrt(in) of the unmasked result for pads 2^k larger than x.
    """

    def __init__(self, inner: Linear, keys: dict[Op, LinearKey], stats: Stats):
        self.inner, self.keys, self.stats = inner, keys, stats
        self.checks = 0
        self.margin: dict[str, float] = {}  # op name -> largest |lhs - rhs| / tolerance seen
        self.failure: str | None = None

    def __call__(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        self.usable()
        y = self.inner(op, x)
        self.check(op, x, y, bias=True)
        return y

    def usable(self) -> None:
        if self.failure is not None:
            raise IntegrityError(f"an earlier {self.failure}")

    def check(self, op: Op, x: torch.Tensor, y: torch.Tensor, bias: bool, who: str = "server") -> None:
        """y (T, out) against x (T, in), both float64; bias: y includes the op's bias (a pad does not)."""
        with self.stats.tee("verify"):  # in as few tensor operations as it takes: a decode step makes ~120
            key = self.keys[op]
            rounding, accumulation = linear_gains(U64, U64, x.shape[1], y.shape[1])
            # LAMBDA (rounding ||y|| + accumulation omega ||x||), the bound times LAMBDA, per row
            tolerance = torch.linalg.vector_norm(y, dim=1, keepdim=True).mul_(LAMBDA * rounding)
            tolerance.add_(torch.linalg.vector_norm(x, dim=1, keepdim=True), alpha=LAMBDA * accumulation * key.omega)
            difference = times(y, key.s).sub_(times(x, key.w))  # y s - (x w + b s)
            if bias:
                difference.sub_(key.bias_s)
            self.checks += 1
            try:
                what = f"{'pad for ' if who == 'helper' else ''}{op}"
                worst = compare_difference(difference, tolerance, what, who)
            except IntegrityError as exc:
                self.failure = str(exc)
                raise
            self.margin[op.name] = max(self.margin.get(op.name, 0.0), worst)


class Local:
    """The product computed in the TEE from its own checkpoint, the weight streamed (`product`), in `dtype`.
    Calibration uses it (in float32: it only needs the inputs' magnitudes)."""

    def __init__(self, checkpoint: Checkpoint, wire: torch.dtype = torch.float32, dtype: torch.dtype = torch.float32):
        self.checkpoint, self.wire, self.dtype = checkpoint, wire, dtype

    def __call__(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        return product(self.checkpoint, op, x.to(self.dtype), self.wire).to(x.dtype)


class Recording:
    """Passes every call through, keeping the largest |x| each op saw."""

    def __init__(self, inner: Linear):
        self.inner = inner
        self.largest: dict[Op, float] = {}

    def __call__(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        self.largest[op] = max(self.largest.get(op, 0.0), float(x.abs().max()))
        return self.inner(op, x)


class Masked:
    """x leaves the TEE as x + r, r = s z a fresh pad (never used twice); the result is unpadded here.

    scales: the pad scale s per op (a power of two: s z and s (z W^T) are exact). The largest |x| / s of
    every call is kept: the leakage bound 1/2 log2(1 + (max|x| / s)^2) bits a coordinate follows from it."""

    def __init__(self, inner: Linear, pads, scales: dict[Op, float], stats: Stats):
        self.inner, self.pads, self.scales, self.stats = inner, pads, scales, stats
        self.ratio = 0.0  # largest max|x| / s over every masked input so far

    def __call__(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        """x (T, in) -> x W^T + b (T, out) in x's dtype: unpadded in float64 and rounded once, in one pass."""
        largest = float(torch.linalg.vector_norm(x, ord=math.inf))  # max |x|; NaN or infinity too
        if not math.isfinite(largest):
            raise TsqpError(f"private mode: the input of {op} is not finite")
        scale = self.scales[op]
        pending = self.pads.start(op, x.shape[0])  # a helper computes its part while the server computes
        try:
            with self.stats.tee("mask"):
                masked = torch.add(x, pending.z, alpha=scale)  # x + s z in float64 (x exact in it; s z too)
                self.ratio = max(self.ratio, largest / scale)
            y = self.inner(op, masked)
            zw = pending.result()  # z W^T (T, out), from the pool or the helper (checked there)
            with self.stats.tee("mask"):
                # (x + r) W^T + b - s (z W^T), subtracted in float64, written rounded to x's dtype
                unmasked = torch.sub(y, zw, alpha=scale, out=torch.empty(y.shape, dtype=x.dtype))
                zw.zero_()  # the pad is erased once used (x + r is what the server saw: no secret)
        finally:
            pending.cancel()  # erases z; a helper's reply not waited for is dropped
        return unmasked


def leak_bits(ratio: float) -> float:
    """Gaussian pads of scale s on inputs with |x| <= ratio s: at most 1/2 log2(1 + ratio^2) bits a coordinate."""
    return 0.5 * math.log2(1.0 + ratio * ratio)
