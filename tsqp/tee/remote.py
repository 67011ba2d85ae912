"""The plain split's ops: one server call per weight product, each reply checked before it is used.

The links a `calls.Calls` goes over: a socket client that can keep several requests in flight
(wire.client.Client), or `Synchronous` over a plain call function such as the in-process twin `InProcess`
that tests use.

`RemoteOps` is the plain split behind the `ops.Ops` interface: embedding, qkv (the server caches v),
gate_up, down and lm_head are calls; `attention` is its own seam (server_attention.py, or attention.py's
TeeAttention: qkv returns v and o_proj is the call `OProj`); every result passes through the checker's
hooks (checks.py) with what was sent.

Fused calls (a server whose init says `fused`, server/fused_calls.py): o_proj goes with the TEE's residual
stream and comes back with the layer's gate_up and down and the next layer's qkv (`o_proj_gate_up` through
qkv), or down with the next qkv (`down_qkv`, attention on the server): one round trip a layer instead of
four. Each later product waits in `Calls.next` until the forward pass asks for it with its own input, which
is what it is checked against: the same hooks, in the same order (over a 16-bit wire, against the input the
server returns with it, itself checked against the TEE's: calls.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from tsqp.errors import ServerError, TsqpError
from tsqp.tee.calls import Calls, Next
from tsqp.tee.ops import Attention, Call, Link
from tsqp.wire.protocol import Message


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


def link_of(call: Link | Call) -> Link:
    """A link as given (it has `submit`), or `Synchronous` over a call function."""
    return call if hasattr(call, "submit") else Synchronous(call)


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
            echoes = [(T, c.hidden_size), (T, c.intermediate_size)] + ([] if last else [(T, c.hidden_size)])
            (y, gate_up, down, *qkv), inputs = calls.run_fused("o_proj_gate_up", args, [sent], shapes, residual, echoes)
            inputs += [None] * (3 - len(inputs))
            calls.next = [Next("gate_up", layer, [gate_up], inputs[0]), Next("down", layer, [down], inputs[1])]
            calls.next += [Next("qkv", layer + 1, qkv, inputs[2])] if qkv else []
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
        # Over a 16-bit wire the server returns the inputs it rounded too (`Calls.echoed`): the two sides'
        # float32 inputs may differ in their last bit on different processors, and rounded to 16 bits by a
        # whole unit; each product is checked against the server's input, and that against the TEE's.
        returned = self.calls.wire == torch.float32 or info.get("fused_inputs") is True  # as a 16-bit wire needs
        self.calls.fused = self.fuse and info.get("fused") is True and returned
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
        results, sent = calls.ready("qkv", layer, h, calls.to_wire(h))
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
        ready, sent = calls.ready("gate_up", layer, h, calls.to_wire(h))
        (gate_up,) = ready or calls.run("gate_up", {"layer": layer}, [sent], [(h.shape[0], 2 * inter)])
        gate, up = gate_up.split([inter, inter], dim=1)
        calls.step.gate_up(layer, sent, gate, up)
        return gate, up

    def down(self, layer: int, a: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """a (T, intermediate) -> (T, hidden); on a fused server, with residual, the next layer's qkv comes
        back with it, at the step's position (`Calls.next`)."""
        calls, T = self.calls, a.shape[0]
        ready, sent = calls.ready("down", layer, a, calls.to_wire(a))  # computed with o_proj (attention in the TEE)
        if ready is not None:
            (y,) = ready
        elif calls.fuses(residual) and layer + 1 < self.config.num_layers:
            args = {"layer": layer, "pos": calls.pos, "values": self.attention.keeps_values}
            shapes, echoes = [(T, self.config.hidden_size), *self._qkv_shapes(T)], [(T, self.config.hidden_size)]
            (y, *results), inputs = calls.run_fused("down_qkv", args, [sent], shapes, residual, echoes)
            calls.next = [Next("qkv", layer + 1, results, inputs[0] if inputs else None)]
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
