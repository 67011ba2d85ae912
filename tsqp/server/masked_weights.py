"""Private mode on the server: its float64 weights, and its two calls (masked_linear, and a helper's pad).

Private mode multiplies masked activations x + r, whose pad r is 2^k times larger than x, so its products
run in float64 (docs/threat-model.md, numerics). The five masked linears (protocol.MASKED_LINEARS) are made
of the plain weights this rank holds: qkv of the fused qk and v, o_proj, gate_up, down, lm_head. Each is
made on first use (or all at once at `init` with private=True) and kept; `total` counts their bytes for
the memory budget. PrivateCalls, mixed into the Engine, validates and runs the calls that use them.
"""

from __future__ import annotations

import torch

from tsqp.errors import ProtocolError
from tsqp.model.config import ModelConfig
from tsqp.server.budget import Budget
from tsqp.server.calls import Call, int_arg, split, stacked
from tsqp.wire.pad_seeds import SEED_BYTES, expand
from tsqp.wire.protocol import MASKED_DTYPE, MASKED_LINEARS

# How each masked linear is split over the ranks (sharded.Linears.linear): a kind of Shard.columns, or
# by input rows ("o", "down").
SPLITS = {"qkv": "qkv", "o_proj": "o", "gate_up": "gate_up", "down": "down", "lm_head": "vocab"}

Part = tuple[torch.Tensor, torch.Tensor | None]  # a weight and its bias


class MaskedWeights:
    """This rank's float64 weights of the masked linears, keyed by (op, layer), made once each."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, model):
        """model: what holds this rank's plain weights (`head`, `layers`: server.weights.Layer), the engine."""
        self.config, self.dtype, self.model = config, dtype, model
        self.made: dict[tuple[str, int], Part] = {}
        self.total = 0  # bytes of `made` (the budget asks at every reservation)

    def keys(self) -> list[tuple[str, int]]:
        """Every (op, layer) of the model: each layer's four, then the LM head's."""
        layers = [(op, layer) for layer in range(self.config.num_layers) for op in MASKED_LINEARS[:-1]]
        return layers + [("lm_head", 0)]

    def width(self, op: str) -> int:
        """A masked linear's input width."""
        c = self.config
        return {"o_proj": c.q_dim, "down": c.intermediate_size}.get(op, c.hidden_size)

    def parts(self, op: str, layer: int) -> list[Part]:
        """The plain weights (and biases) a masked linear's float64 weight is made of."""
        if op == "lm_head":
            return [(self.model.head, None)]
        w = self.model.layers[layer]
        return {
            "qkv": [(w.qk, w.qk_bias), (w.v, w.v_bias)],
            "o_proj": [(w.o, w.o_bias)],
            "gate_up": [(w.gate_up, w.gate_up_bias)],
            "down": [(w.down, w.down_bias)],
        }[op]

    def weight(self, op: str, layer: int) -> Part:
        """This rank's share of a masked linear's weight and bias in float64, made on first use."""
        key = (op, layer)
        if key not in self.made:
            parts = self.parts(op, layer)
            # the value path is kept in float32; in private mode v and o are rounded like every weight
            weight = self.stacked([p for p, _ in parts])
            biases = [b for _, b in parts if b is not None]
            bias = self.stacked(biases) if biases else None
            self.made[key] = (weight, bias)
            self.total += weight.nbytes + (bias.nbytes if bias is not None else 0)
        return self.made[key]

    def stacked(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The tensors, rounded to the server's dtype, stacked along dim 0 into one new float64 tensor: each
        converted straight into its rows (no float64 temporary, no second copy by a concatenation: the LM head
        of a 262k vocabulary is 1.3 GB in float64)."""
        out = torch.empty((sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), dtype=MASKED_DTYPE)
        row = 0
        for t in tensors:
            out[row : row + t.shape[0]].copy_(t.to(self.dtype))
            row += t.shape[0]
        return out

    def nbytes(self, op: str, layer: int) -> int:
        """A masked linear's float64 weight and bias, as `weight` makes them (this rank's share)."""
        parts = self.parts(op, layer)
        return sum(w.numel() + (b.numel() if b is not None else 0) for w, b in parts) * MASKED_DTYPE.itemsize

    def missing(self) -> list[tuple[str, int]]:
        return [key for key in self.keys() if key not in self.made]

    def reserve(self, budget: Budget, op: str, layer: int, rows: int, what: str, x: torch.Tensor | None = None):
        """A masked product's (rows, out) float64 result (and x again, for a batch), and its float64 weight
        when not made yet."""
        made = self.made.get((op, layer))
        out = made[0].shape[0] if made else sum(w.shape[0] for w, _ in self.parts(op, layer))
        budget.reserve_rows(rows, out, MASKED_DTYPE, what, x)
        if made is None:
            budget.reserve(self.nbytes(op, layer), "a float64 weight")


class PrivateCalls:
    """Private mode's calls of the Engine (a mixin: it uses the engine's `masked` weights, budget and helpers)."""

    def op_masked_linear(self, args, x) -> Call:
        """x (T, in) float64, a masked activation x + r -> (x + r) W^T + b (T, out) in float64.

        Float64 because the pad is 2^k times larger than x: the product's rounding must stay far below x W^T
        (docs/threat-model.md, numerics). The server never sees x; it needs no session."""
        op, layer = self._masked_op(args)
        if x.dtype != MASKED_DTYPE:
            raise ProtocolError(f"masked_linear takes a float64 activation, not {x.dtype}")
        x = self._shape(x, self.masked.width(op))
        self.masked.reserve(self.budget, op, layer, x.shape[0], "masked_linear", x)
        return Call("masked_linear", {"op": op, "layer": layer}, (x,))

    def step_masked_linear(self, calls):
        op, layer = calls[0].args["op"], calls[0].args["layer"]
        weight, bias = self.masked.weight(op, layer)
        return split(self.linears.linear(stacked(calls), weight, bias, SPLITS[op], MASKED_DTYPE), calls)

    def op_pad(self, args) -> Call:
        """A helper server's call: z W^T (rows, out) float64 for the pad z = pad_seeds.expand(seed, rows, in).

        The TEE sends the seed (over CurveZMQ) to this server, which must not be the one that computes on
        x + z s: two servers that do not collude (docs/threat-model.md)."""
        op, layer = self._masked_op(args)
        seed = args.get("seed")
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise ProtocolError(f"pad needs a {SEED_BYTES}-byte seed")
        rows = int_arg(args, "rows", 1, self.config.max_position_embeddings)
        self.budget.reserve_rows(rows, self.masked.width(op), MASKED_DTYPE, "the pad")  # z, expanded from its seed
        self.masked.reserve(self.budget, op, layer, rows, "pad")
        return Call("pad", {"op": op, "layer": layer, "seed": seed, "rows": rows})

    def step_pad(self, calls):
        (call,) = calls
        op, layer = call.args["op"], call.args["layer"]
        weight, _ = self.masked.weight(op, layer)
        pad = expand(call.args["seed"], call.args["rows"], self.masked.width(op)).to(self.device)  # the TEE's r
        return [[self.linears.linear(pad, weight, None, SPLITS[op], MASKED_DTYPE)]]

    def _masked_op(self, args) -> tuple[str, int]:
        op = args.get("op")
        if not isinstance(op, str) or op not in MASKED_LINEARS:
            raise ProtocolError(f"unknown masked linear {op!r}: one of {', '.join(MASKED_LINEARS)}")
        return op, 0 if op == "lm_head" else int_arg(args, "layer", 0, self.config.num_layers - 1)
