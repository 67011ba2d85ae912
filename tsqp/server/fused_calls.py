"""Plain mode's fused calls, mixed into the Engine: each half of a layer ends and the next begins in one call.

    o_proj_gate_up   attention's output a (T, q_dim) and the TEE's residual stream x (T, hidden, float32)
                     -> y = o_proj(a) (as the o_proj call), [gate | up] of h = norm_mlp_in(x + norm_attn_out(y))
    down_qkv         the gated activation a (T, intermediate) and x -> y = down(a) (as the down call), and
                     layer + 1's qkv (as the qkv call, args pos and values) of h = norm_attn_in(x + norm_mlp_out(y))

With attention in the TEE a layer is then two round trips instead of four (qkv, o_proj, gate_up, down). The
TEE sends its own residual stream with each call, so the server keeps nothing between them; h is
`model.norms.Norms.next_input`, the TEE's own operations on the same float32 values. The TEE computes h
itself and checks the second product against it by Freivalds, as it checks an unfused one against what it
sent (tee/remote.py): a server that computes from another stream or another h fails that check. The server
learns nothing it did not: in the plain split it already sees h, and x is h's input.

A tensor-parallel server refuses them (rank 0 alone holds a whole result between the products) and its init
reply says so: the TEE then sends the calls apart. Several clients' fused calls of one layer run as one
step, both inputs stacked by rows.
"""

from __future__ import annotations

import torch

from tsqp.errors import ProtocolError, TsqpError
from tsqp.server.calls import Call, int_arg, parts, split, stacked
from tsqp.server.sessions import Session
from tsqp.server.weights import VALUE_DTYPE

FUSED = ("o_proj_gate_up", "down_qkv")


class FusedCalls:
    """The Engine's fused calls (a mixin over LayerCalls: it uses their ops, steps and the norms)."""

    @property
    def fuses(self) -> bool:
        """Whether this server computes fused calls: one rank holding the plain mode's weights."""
        return self.ranks.world == 1 and not self.private_only

    def op_o_proj_gate_up(self, session: Session, args, a, x) -> Call:
        self._fusing("o_proj_gate_up")
        o_proj = self.op_o_proj(session, args, a)  # a and the layer validated, its working memory reserved
        x = self._residual(x, a.shape[0])
        self.budget.reserve_rows(a.shape[0], 2 * self.config.intermediate_size, self.dtype, "gate_up", x)
        return Call("o_proj_gate_up", o_proj.args, (a, x))

    def step_o_proj_gate_up(self, calls):
        layer = calls[0].args["layer"]
        weights = self.layers[layer]
        y = self.linears.linear(stacked(calls).to(VALUE_DTYPE), weights.o, weights.o_bias, "o")
        h = self.norms.next_input(_residuals(calls), y, layer, "o_proj").to(self.dtype)
        gate_up = self.linears.columns(h, weights.gate_up, weights.gate_up_bias, "gate_up")
        return [a + b for a, b in zip(split(y, calls), split(gate_up, calls), strict=True)]

    def op_down_qkv(self, session: Session, args, a, x) -> Call:
        c = self.config
        self._fusing("down_qkv")
        layer = int_arg(args, "layer", 0, c.num_layers - 2)  # the last layer's down is followed by the LM head
        a = self._activation(a, c.intermediate_size)
        x = self._residual(x, a.shape[0])
        self.budget.reserve_rows(a.shape[0], c.hidden_size, self.dtype, "down", a)
        qkv = self._qkv(session, {"layer": layer + 1, "pos": args.get("pos"), "values": args.get("values", False)}, x)
        return Call("down_qkv", {**qkv.args, "layer": layer}, (a, x))

    def step_down_qkv(self, calls):
        layer = calls[0].args["layer"]
        weights = self.layers[layer]
        y = self.linears.linear(stacked(calls), weights.down, weights.down_bias, "down")
        h = self.norms.next_input(_residuals(calls), y, layer, "down").to(self.dtype)
        rows = parts(h, calls)
        qkv = [Call("qkv", {**call.args, "layer": layer + 1}, (x,)) for call, x in zip(calls, rows, strict=True)]
        return [a + b for a, b in zip(split(y, calls), self.step_qkv(qkv), strict=True)]

    def _fusing(self, method: str) -> None:
        if not self.fuses:
            raise TsqpError(f"this server does not compute fused calls ({method}): its init reply says so")

    def _residual(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """The TEE's residual stream: float32 (T, hidden) whatever the server dtype."""
        if x.dtype != torch.float32 or tuple(x.shape) != (T, self.config.hidden_size):
            raise ProtocolError(f"a fused call's residual stream is float32 ({T}, {self.config.hidden_size})")
        return x


def _residuals(calls: list[Call]) -> torch.Tensor:
    """The calls' residual streams (their second inputs) stacked by rows, as `stacked` stacks their first."""
    return calls[0].inputs[1] if len(calls) == 1 else torch.cat([call.inputs[1] for call in calls])
