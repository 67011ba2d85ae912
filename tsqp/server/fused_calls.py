"""Plain mode's fused calls, mixed into the Engine: several products in one call, from the TEE's residual stream.

    o_proj_gate_up   attention's output a (T, q_dim) and the TEE's residual stream x (T, hidden, float32)
                     -> y = o_proj(a) (as the o_proj call), [gate | up] of h = norm_mlp_in(x + norm_attn_out(y));
                     args.through "down": then down of act(gate) * up too, "qkv": and layer + 1's qkv of
                     norm_attn_in(x' + norm_mlp_out(down)), x' = x + norm_attn_out(y) (args pos and values, as
                     qkv's): a whole layer's products after attention in one call
    down_qkv         the gated activation a (T, intermediate) and x -> y = down(a) (as the down call), and
                     layer + 1's qkv (as the qkv call, args pos and values) of h = norm_attn_in(x + norm_mlp_out(y))

On a 16-bit server each fused call also returns, after its products, the input it computed each later
product from, as it rounded it (gate_up's, down's, then qkv's): the two sides' float32 inputs may differ in
their last bit on different processors (a GPU's norms and activation are not the CPU's), and rounded to 16
bits by a whole unit, so the TEE checks each product against the input the server used and that input
against its own, row by row within twice the rounding (tee/verify.py, `Verifier.check_input`). Its init
reply says so (`fused_inputs`): a TEE fuses over a 16-bit wire only with a server that does.

With attention in the TEE a layer is then one round trip instead of four (qkv, o_proj, gate_up, down); with
attention on the server (a prefill's scores and attn_out), down_qkv saves one. The TEE sends its own residual
stream with each call, so the server keeps nothing between them; each product's input is computed with
`model.elementwise`, the TEE's own operations on the same float32 values. The TEE computes each input
itself and checks each product against it by Freivalds, as it checks an unfused one against what it sent
(tee/remote.py): a server that computes from another stream or another input fails that check. The server
learns nothing it did not: in the plain split it already sees each product's input.

A tensor-parallel server refuses them (rank 0 alone holds a whole result between the products) and its init
reply says so: the TEE then sends the calls apart. Several clients' fused calls of one layer run as one
step, both inputs stacked by rows.
"""

from __future__ import annotations

import torch

from tsqp.errors import ProtocolError, TsqpError
from tsqp.model.elementwise import gated
from tsqp.server.calls import Call, int_arg, parts, split, stacked
from tsqp.server.sessions import Session
from tsqp.server.weights import VALUE_DTYPE

FUSED = ("o_proj_gate_up", "down_qkv")
THROUGH = ("gate_up", "down", "qkv")  # how far o_proj_gate_up goes


class FusedCalls:
    """The Engine's fused calls (a mixin over LayerCalls: it uses their ops, steps and the norms)."""

    @property
    def fuses(self) -> bool:
        """Whether this server computes fused calls: one rank holding the plain mode's weights."""
        return self.ranks.world == 1 and not self.private_only

    def op_o_proj_gate_up(self, session: Session, args, a, x) -> Call:
        c = self.config
        self._fusing("o_proj_gate_up")
        o_proj = self.op_o_proj(session, args, a)  # a and the layer validated, its working memory reserved
        layer, T, through = o_proj.args["layer"], a.shape[0], args.get("through", "gate_up")
        if through not in THROUGH or (through == "qkv" and layer + 1 == c.num_layers):
            raise ProtocolError(
                f"argument 'through' must be one of {THROUGH} (qkv before the last layer), not {through!r}"
            )
        x = self._residual(x, T)
        self.budget.reserve_rows(T, 2 * c.intermediate_size, self.dtype, "gate_up", x)
        fused = {**o_proj.args, "through": through}
        if through != "gate_up":  # act(gate) * up in float32 and in the server dtype, then down
            self.budget.reserve_rows(T, 2 * c.intermediate_size + c.hidden_size, self.dtype, "down")
        if through == "qkv":
            fused |= self._next_qkv(session, layer, args, x)
        return Call("o_proj_gate_up", fused, (a, x))

    def step_o_proj_gate_up(self, calls):
        layer, through = calls[0].args["layer"], calls[0].args["through"]
        weights = self.layers[layer]
        y = self.linears.linear(stacked(calls).to(VALUE_DTYPE), weights.o, weights.o_bias, "o")
        x = self.norms.after(_residuals(calls), y, layer, "o_proj")  # the residual stream after attention
        h = self.norms.next_input(x, layer, "o_proj").to(self.dtype)
        gate_up = self.linears.columns(h, weights.gate_up, weights.gate_up_bias, "gate_up")
        results = [a + b for a, b in zip(split(y, calls), split(gate_up, calls), strict=True)]
        if through == "gate_up":
            return self._echoing(results, [h], calls)
        gate, up = gate_up.split(self.config.intermediate_size, dim=1)
        act = gated(self.activation, gate, up).to(self.dtype)
        rest, inputs = self._down_then(calls, layer, act, x, through == "qkv")
        results = [a + b for a, b in zip(results, rest, strict=True)]
        return self._echoing(results, [h, act, *inputs], calls)

    def op_down_qkv(self, session: Session, args, a, x) -> Call:
        c = self.config
        self._fusing("down_qkv")
        layer = int_arg(args, "layer", 0, c.num_layers - 2)  # the last layer's down is followed by the LM head
        a = self._activation(a, c.intermediate_size)
        x = self._residual(x, a.shape[0])
        self.budget.reserve_rows(a.shape[0], c.hidden_size, self.dtype, "down", a)
        return Call("down_qkv", self._next_qkv(session, layer, args, x), (a, x))

    def step_down_qkv(self, calls):
        results, inputs = self._down_then(calls, calls[0].args["layer"], stacked(calls), _residuals(calls), True)
        return self._echoing(results, inputs, calls)

    def _down_then(self, calls, layer: int, a: torch.Tensor, x: torch.Tensor, qkv: bool) -> tuple[list[list], list]:
        """down(a) of layer for the calls' rows, then (qkv) layer + 1's qkv of the residual stream x after it;
        with the input of that qkv ([] without it)."""
        weights = self.layers[layer]
        y = self.linears.linear(a, weights.down, weights.down_bias, "down")
        if not qkv:
            return split(y, calls), []
        h = self.norms.next_input(self.norms.after(x, y, layer, "down"), layer, "down").to(self.dtype)
        rows = parts(h, calls)
        qkv = [Call("qkv", {**call.args, "layer": layer + 1}, (h,)) for call, h in zip(calls, rows, strict=True)]
        return [a + b for a, b in zip(split(y, calls), self.step_qkv(qkv), strict=True)], [h]

    def _echoing(self, results: list[list], inputs: list[torch.Tensor], calls) -> list[list]:
        """Each call's results, followed on a 16-bit server by its rows of the later products' inputs."""
        if self.dtype.itemsize > 2:
            return results
        rows = [parts(t, calls) for t in inputs]
        return [result + [part[i] for part in rows] for i, result in enumerate(results)]

    def _next_qkv(self, session: Session, layer: int, args, x) -> dict:
        """The books of layer + 1's qkv at args' pos (and values) for x's rows: the fused call's resolved args."""
        qkv = self._qkv(session, {"layer": layer + 1, "pos": args.get("pos"), "values": args.get("values", False)}, x)
        return {**qkv.args, "layer": layer}

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
