"""The plain split's ops: one server call per weight product, each reply checked before it is used.

`Calls` is the typed view of the server: one request per call, over a `Link` (a socket client that can keep
several requests in flight, or `Synchronous` over a plain call function such as the in-process twin
`InProcess` that tests use). Every reply must hold exactly the dtype and shape that was asked for;
results are converted to float32 copies owned by the TEE before any math touches them.

`RemoteOps` is the plain split behind the `ops.Ops` interface: embedding, qkv (the server caches v),
gate_up, down and lm_head are calls; `attention` is its own seam (server_attention.py, or attention.py's
TeeAttention: qkv returns v and o_proj is the call `OProj`); every result passes through the checker's
hooks (checks.py) with what was sent.

Fused calls (a server whose init says `fused`, server/fused_calls.py): o_proj goes with the TEE's residual
stream and comes back with the layer's gate_up and down and the next layer's qkv (`o_proj_gate_up` through
qkv), or down with the next qkv (`down_qkv`, attention on the server): one round trip a layer instead of
four. The later products' results wait in `Calls.next` until the forward pass asks for each with its own
input, which is what it is checked against: the same hooks, in the same order.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from tsqp.errors import ServerError, TsqpError
from tsqp.model.config import ModelConfig
from tsqp.stats import Stats
from tsqp.tee.checks import ChunkCheck, StepCheck, Unchecked
from tsqp.tee.ops import Attention, Call, Link
from tsqp.wire.protocol import DTYPES, FLOAT_DTYPES, Message, expect


@dataclass
class LocalDraft:
    """A draft of a link without an arena: private tensors."""

    tensors: list[torch.Tensor]


class Synchronous:
    """A link over a plain call function: each request runs when it is submitted, one at a time in
    order, as the server answers them; its reply (or error) is handed out by `wait`."""

    def __init__(self, call: Call):
        self.call = call
        self.ids = itertools.count(1)
        self.replies: dict[int, Message | Exception] = {}

    def submit(
        self, method: str, args=None, tensors=(), session=None, reply_bytes: int = 0, draft: LocalDraft | None = None
    ) -> int:
        request_id = next(self.ids)
        if draft is not None:
            tensors = draft.tensors
        try:
            self.replies[request_id] = self.call(method, args, tensors, session=session, reply_bytes=reply_bytes)
        except Exception as exc:  # raised when the request is waited for, like a server's refusal
            self.replies[request_id] = exc
        return request_id

    def draft(self, specs: list[tuple[torch.dtype, tuple[int, ...]]], reply_bytes: int = 0) -> LocalDraft:
        return LocalDraft([torch.empty(shape, dtype=dtype) for dtype, shape in specs])

    def drop(self, draft: LocalDraft) -> None:
        pass

    def wait(self, request_id: int) -> Message:
        reply = self.replies.pop(request_id)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def discard(self, request_id: int) -> None:
        self.replies.pop(request_id, None)


@dataclass(slots=True)
class Next:
    """A fused call's later product, computed by the server from the residual stream the TEE sent."""

    op: str  # gate_up, down or qkv
    layer: int
    results: list[torch.Tensor]


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
    check: ChunkCheck | None = None  # attn_out: what its result must match (verified mode)


class InProcess:
    """Calls an Engine directly, as the socket server would (same validation, no sockets)."""

    def __init__(self, engine, peer: bytes = b"in-process"):  # engine: a tsqp.server.engine.Engine
        self.engine = engine
        self.peer = peer

    def __call__(
        self, method: str, args: dict | None = None, tensors=(), session: bytes | None = None, reply_bytes: int = 0
    ) -> Message:
        request = Message({"id": 0, "method": method, "session": session, "args": args or {}}, list(tensors))
        try:
            reply_args, results = self.engine.handle(self.peer, request)
        except TsqpError as exc:
            raise ServerError(f"server refused {method}: {exc}") from None
        return Message({"id": 0, "ok": True, "args": reply_args}, results)


def server_dtype(info: dict) -> torch.dtype:
    """The dtype the server's init reply names, which the TEE's keys and pads are rounded to."""
    if info.get("dtype") not in FLOAT_DTYPES:
        raise ServerError(f"server reports an unknown dtype {info.get('dtype')!r}")
    return DTYPES[info["dtype"]]


def link_of(call: Link | Call) -> Link:
    """A link as given (it has `submit`), or `Synchronous` over a call function."""
    return call if hasattr(call, "submit") else Synchronous(call)


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
        self.checker.init(self.wire, str(info.get("device", "cpu")))
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
            return [t.to(torch.float32) for t in reply.tensors]

    def run(self, method: str, args: dict, inputs: list[torch.Tensor], shapes, **options) -> list[torch.Tensor]:
        """submit (options: session, exact), then collect."""
        return self.collect(self.submit(method, args, inputs, shapes, **options))

    def fuses(self, residual: torch.Tensor | None) -> bool:
        """Whether a product with this residual stream (None: none given) goes out as a fused call."""
        return self.fused and residual is not None

    def take(self, op: str, layer: int) -> list[torch.Tensor] | None:
        """The product op of layer if the last call computed it (fused), else None: it is asked for now."""
        if not self.next:
            return None
        ready = self.next.pop(0)
        if (ready.op, ready.layer) != (op, layer):  # the forward pass asks in the order the server computes
            raise TsqpError(f"{op} of layer {layer} asked for after a fused call computed {ready.op} of {ready.layer}")
        return ready.results


class OProj:
    """o_proj as a server call, for attention in the TEE (`attention.TeeAttention`'s o_proj): its input is the
    TEE's attention output (what the plain split shows the server anyway: the server holds q, k and v)."""

    def __init__(self, calls: Calls):
        self.calls = calls

    def __call__(self, layer: int, out: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """out (T, q_dim) -> out W_o^T + b_o (T, hidden), checked. residual (T, hidden): the stream the result
        is added to; on a fused server the layer's gate_up and down and the next layer's qkv come back with it
        (`Calls.next`), computed from it."""
        calls, c, T = self.calls, self.calls.config, out.shape[0]
        sent = calls.to_wire(out)
        if calls.fuses(residual):  # the layer's products after attention, and the next layer's qkv (with v)
            last = layer + 1 == c.num_layers  # the LM head follows: through down
            args = (
                {"layer": layer, "through": "down"}
                if last
                else {"layer": layer, "through": "qkv", "pos": calls.pos, "values": True}
            )
            shapes = [(T, c.hidden_size), (T, 2 * c.intermediate_size), (T, c.hidden_size)]
            shapes += [] if last else [(T, c.q_dim + c.kv_dim), (T, c.kv_dim)]
            y, gate_up, down, *qkv = calls.run("o_proj_gate_up", args, [sent], shapes, exact=(residual,))
            calls.next = [Next("gate_up", layer, [gate_up]), Next("down", layer, [down])]
            calls.next += [Next("qkv", layer + 1, qkv)] if qkv else []
        else:
            (y,) = calls.run("o_proj", {"layer": layer}, [sent], [(T, c.hidden_size)])
        calls.step.o_proj(layer, sent, y)
        return y


class RemoteOps:
    """The plain split (`ops.Ops`): every product on the server, attention where `attention` runs it."""

    def __init__(self, calls: Calls, attention: Attention, fuse: bool = True):
        """attention: the seam itself is the `attention` op (the forward pass calls it directly). fuse: send
        fused calls when the server computes them (off: four or five calls a layer, for comparison)."""
        self.calls, self.attention = calls, attention
        self.config, self.checker = calls.config, calls.checker
        self.fuse = fuse

    @property
    def link(self) -> Link:
        return self.calls.link

    @property
    def wire_name(self) -> str:
        return self.calls.wire_name

    @property
    def session(self) -> bytes | None:
        """The open session's id on the server."""
        return self.calls.session

    @property
    def setup_s(self) -> float:
        """Computing the verification keys at start."""
        return self.checker.setup_s

    @property
    def pipelined(self) -> bool:
        return self.attention.pipelined

    def checks_overlap(self, tokens: int) -> bool:
        """Whether a step of this many tokens has its results checked while the server computes the next
        call (checks.Overlapped), not at its end or between calls."""
        return self.checker.overlap and tokens > self.checker.defer_rows

    @property
    def fused(self) -> bool:
        """The server computes fused calls and these ops send them (known after init)."""
        return self.calls.fused

    # -- control -------------------------------------------------------------------------------

    def init(self) -> dict:
        info = self.calls.init()
        # Over a float32 wire only: the two sides' float32 inputs may differ in their last bit on different
        # processors, and rounded to 16 bits they then differ by a whole unit, which the tolerance is not
        # derived for (verify.py); a float32 product absorbs a last-bit difference.
        self.calls.fused = self.fuse and info.get("fused") is True and self.calls.wire == torch.float32
        self.attention.init(info)
        return info

    def open_session(self, capacity: int) -> None:
        session = self.calls.control("open_session", {"capacity": capacity}).args.get("session")
        if not isinstance(session, bytes):
            raise ServerError("server returned no session id")
        self.calls.session = session
        self.attention.open_session(capacity)
        self.checker.open_session(capacity)

    def close_session(self) -> None:
        self.checker.close_session()
        self.attention.close_session()
        self.calls.step = self.checker.immediate
        if self.calls.session is not None:
            session, self.calls.session = self.calls.session, None
            self.calls.control("close_session", session=session)

    def begin_step(self, pos: int, T: int) -> None:
        self.calls.step = self.checker.begin_step(pos, T, self.attention)
        self.calls.next, self.calls.pos = [], pos

    # -- calls ---------------------------------------------------------------------------------

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        (rows,) = self.calls.run("embedding", {}, [ids], [(ids.shape[0], self.config.hidden_size)], session=False)
        self.calls.step.embedding(ids, rows)
        return rows

    def qkv(self, layer: int, pos: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (T, hidden) -> q (T, q_dim), k (T, kv_dim); the server caches v, and returns it too when the
        attention keeps values (`attention.TeeAttention`: its own cache)."""
        calls, c, T = self.calls, self.config, h.shape[0]
        sent = calls.to_wire(h)
        results = calls.take("qkv", layer)
        if results is None:
            args = {"layer": layer, "pos": pos} | ({"values": True} if self.attention.keeps_values else {})
            results = calls.run("qkv", args, [sent], self._qkv_shapes(T))
        qk, *v = results
        q, k = qk.split([c.q_dim, c.kv_dim], dim=1)
        calls.step.qkv(layer, pos, sent, q, k)
        if v:
            calls.step.values(layer, pos, sent, v[0])
            self.attention.put_values(layer, pos, v[0])
        return q, k

    def _qkv_shapes(self, T: int) -> list[tuple[int, ...]]:
        """qkv's results: [q | k], and v when the attention keeps values."""
        c = self.config
        return [(T, c.q_dim + c.kv_dim)] + [(T, c.kv_dim)] * self.attention.keeps_values

    def gate_up(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls, inter = self.calls, self.config.intermediate_size
        sent = calls.to_wire(h)
        shapes = [(h.shape[0], 2 * inter)]
        (gate_up,) = calls.take("gate_up", layer) or calls.run("gate_up", {"layer": layer}, [sent], shapes)
        gate, up = gate_up.split([inter, inter], dim=1)
        calls.step.gate_up(layer, sent, gate, up)
        return gate, up

    def down(self, layer: int, a: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """a (T, intermediate) -> (T, hidden); on a fused server, with residual, the next layer's qkv comes
        back with it, at the step's position (`Calls.next`)."""
        calls, T = self.calls, a.shape[0]
        sent = calls.to_wire(a)
        ready = calls.take("down", layer)  # computed with o_proj (attention in the TEE)
        if ready is not None:
            (y,) = ready
        elif calls.fuses(residual) and layer + 1 < self.config.num_layers:
            args = {"layer": layer, "pos": calls.pos, "values": self.attention.keeps_values}
            shapes = [(T, self.config.hidden_size), *self._qkv_shapes(T)]
            y, *results = calls.run("down_qkv", args, [sent], shapes, exact=(residual,))
            calls.next = [Next("qkv", layer + 1, results)]
        else:
            (y,) = calls.run("down", {"layer": layer}, [sent], [(T, self.config.hidden_size)])
        calls.step.down(layer, sent, y)
        return y

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """The step's last product, its largest: the request goes out first, and the step's deferred checks
        run while the server computes it. They pass before its result is read; a failed one gives the request
        up and raises (the server learns nothing new from x: in the plain split it holds every input)."""
        calls = self.calls
        step, calls.step = calls.step, self.checker.immediate  # the step ends here
        sent = calls.to_wire(x)
        request = calls.submit("lm_head", {}, [sent], [(x.shape[0], self.config.vocab_size)], session=False)
        try:
            step.layers_done()
        except BaseException:
            calls.link.discard(request.id)
            raise
        (y,) = calls.collect(request)
        step.lm_head(sent, y)
        return y
