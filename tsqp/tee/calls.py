"""The plain split's requests to the server, typed: `Calls` (the link, the wire dtype, the open session, the
checker's hooks of the open step) and what a request in flight holds.

Every reply must hold exactly the dtype and shape that was asked for; results are converted to float32 copies
owned by the TEE before any math touches them. A fused call's later products (server/fused_calls.py) wait in
`Calls.next` until the forward pass asks for each with its own input, which is what it is checked against.
Over a 16-bit wire the server also returns each later product's input as it rounded it (`Next.input`): the
product is checked against that input, and that input against the TEE's own (`StepCheck.inputs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tsqp.errors import ServerError, TsqpError
from tsqp.model.config import ModelConfig
from tsqp.stats import Stats
from tsqp.tee.checks import ChunkCheck, StepCheck, Unchecked
from tsqp.tee.ops import Link
from tsqp.tuning import SHORT_STEP_ROWS
from tsqp.wire import cores
from tsqp.wire.protocol import DTYPES, FLOAT_DTYPES, Message, expect


@dataclass(slots=True)
class Next:
    """A fused call's later product, computed by the server from the residual stream the TEE sent."""

    op: str  # gate_up, down or qkv
    layer: int
    results: list[torch.Tensor]
    input: torch.Tensor | None = None  # over a 16-bit wire: the input the server computed it from, as it rounded it


@dataclass(slots=True)
class Request:
    """A request in flight, with what its reply must hold and what was sent (verification needs it)."""

    id: int
    method: str
    shapes: list[tuple[int, ...]]
    sent: list[torch.Tensor]
    layer: int | None = None
    pos: int = 0
    collected: bool = False
    raw: int = 0  # the reply's last results kept in the wire dtype (a fused call's echoed inputs)
    check: ChunkCheck | None = None  # attn_out: what its result must match (verified mode)


def server_dtype(info: dict) -> torch.dtype:
    """The dtype the server's init reply names, which the TEE's keys and pads are rounded to."""
    if info.get("dtype") not in FLOAT_DTYPES:
        raise ServerError(f"server reports an unknown dtype {info.get('dtype')!r}")
    return DTYPES[info["dtype"]]


class Calls:
    """Requests to the server, typed: the link, the wire dtype, the open session and the checker."""

    def __init__(self, link: Link, config: ModelConfig, checker=None, stats: Stats | None = None):
        """checker: `checks.Unchecked` (the default) or `verify.Verifier`."""
        self.link = link
        self.config = config
        self.checker = checker or Unchecked()
        self.wire = torch.float32
        self.session: bytes | None = None
        self.step: StepCheck = self.checker.immediate  # the open step's checks (call by call outside one)
        self.stats = stats or Stats()
        self.fused = False  # the server computes fused calls (its init says so) and the ops may send them
        self.next: list[Next] = []  # the last fused call's later products, until the forward asks for each
        self.pos = 0  # the open step's first position: a fused call's qkv is at it

    @property
    def wire_name(self) -> str:
        return str(self.wire).removeprefix("torch.")

    def control(self, method: str, args: dict | None = None, session: bytes | None = None) -> Message:
        return self.link.wait(self.link.submit(method, args, session=session))

    def init(self) -> dict:
        """The server's description of itself; its dtype becomes the wire dtype (and the checker's keys')."""
        info = self.control("init").args
        self.wire = server_dtype(info)
        self.checker.init(self.wire, cores.apart(info))
        return info

    def submit(
        self,
        method: str,
        args: dict,
        inputs: list[torch.Tensor],
        shapes: list[tuple[int, ...]],
        session: bool = True,
        exact: tuple[torch.Tensor, ...] = (),
    ) -> Request:
        """exact: inputs sent as they are, after `inputs` (a fused call's float32 residual stream)."""
        if self.checker.failure is not None:  # nothing more is sent after a failed check
            self.checker.usable()
        self.next = []  # a fused result not asked for before the next call is not used
        sent = [self.to_wire(t) for t in inputs] + list(exact)
        reply_bytes = sum(math.prod(shape) for shape in shapes) * self.wire.itemsize
        session_id = self.session if session else None
        request_id = self.link.submit(method, args, sent, session=session_id, reply_bytes=reply_bytes)
        return Request(request_id, method, shapes, sent, args.get("layer"), args.get("pos", 0))

    def to_wire(self, x: torch.Tensor) -> torch.Tensor:
        """x in the wire dtype: x itself when it already is (float32 on a float32 server); token ids stay int64."""
        return x if x.dtype == self.wire or not x.is_floating_point() else x.to(self.wire)

    def collect(self, request: Request) -> list[torch.Tensor]:
        """The request's reply, copied out; the step's held checks run first, while the server computes it."""
        request.collected = True
        try:
            self.step.waiting()
        except BaseException:
            self.link.discard(request.id)
            raise
        reply = self.link.wait(request.id)
        wire = self.wire
        expect(reply.tensors, [(wire, shape) for shape in request.shapes], request.method)
        with self.stats.tee("copy"):  # copy out, then use: the arena is the server's to rewrite
            if wire == torch.float32:
                return [t.clone() for t in reply.tensors]
            cut = len(reply.tensors) - request.raw
            return [t.to(torch.float32) for t in reply.tensors[:cut]] + [t.clone() for t in reply.tensors[cut:]]

    def run(self, method: str, args: dict, inputs: list[torch.Tensor], shapes, **options) -> list[torch.Tensor]:
        """submit (options: session, exact), then collect."""
        return self.collect(self.submit(method, args, inputs, shapes, **options))

    @property
    def echoed(self) -> bool:
        """Whether a fused call returns its later products' inputs too (a 16-bit server: fused_calls.py)."""
        return self.wire.itemsize == 2

    def run_fused(self, method: str, args: dict, inputs, shapes, residual, echoes) -> tuple[list, list]:
        """A fused call: (its products, the inputs it computed the later ones from: [] over a float32 wire).
        echoes: those inputs' shapes, asked for over a 16-bit wire."""
        echoes = echoes if self.echoed else []
        request = self.submit(method, args, inputs, shapes + echoes, exact=(residual,))
        request.raw = len(echoes)
        results = self.collect(request)
        return results[: len(shapes)], results[len(shapes) :]

    def ready(self, op: str, layer: int, own: torch.Tensor, sent: torch.Tensor) -> tuple[list | None, torch.Tensor]:
        """(the product op of layer if the last call computed it, else None; the input to check it against):
        sent, the TEE's rounding of its own input `own` to the wire, unless a 16-bit server returned its own
        rounding, which is checked against own first (`StepCheck.inputs`)."""
        ready = self.take(op, layer)
        if ready is None or ready.input is None:
            return (None if ready is None else ready.results), sent
        self.step.inputs(op, layer, own, ready.input)
        return ready.results, ready.input

    def fuses(self, residual: torch.Tensor | None) -> bool:
        """Whether a product with this residual stream (None: none given) goes out as a fused call: on a server
        that fuses, always over a float32 wire, for a short step over a 16-bit one (tuning.SHORT_STEP_ROWS)."""
        if not self.fused or residual is None:
            return False
        return not self.echoed or residual.shape[0] <= SHORT_STEP_ROWS

    def take(self, op: str, layer: int) -> Next | None:
        """The product op of layer if the last call computed it (fused), else None: it is asked for now."""
        if not self.next:
            return None
        ready = self.next.pop(0)
        if (ready.op, ready.layer) != (op, layer):  # the forward pass asks in the order the server computes
            raise TsqpError(f"{op} of layer {layer} asked for after a fused call computed {ready.op} of {ready.layer}")
        return ready
