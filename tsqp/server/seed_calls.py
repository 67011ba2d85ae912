"""The seed's generic calls, kept in the protocol as the seed described them: `linear`, `batch_linear`, `matmul`.

`linear` names one of a layer's original projections (q_proj ... down_proj, args layer=N) and computes
x W^T + b with it, a view of the fused weights the engine holds; `batch_linear` does so for several names
on one input; `matmul` multiplies two tensors the client sends (no weights: rank 0 alone). The TEE's own
forward pass uses the fused per-layer calls instead; these stay for the seed's clients. Mixed into the
Engine, whose validation helpers, budget and linears they use.
"""

from __future__ import annotations

import math

import torch

from tsqp.errors import ProtocolError
from tsqp.server.calls import Call, int_arg

SEED_WEIGHTS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "down_proj")
MAX_BATCH = 8  # names in one batch_linear


class SeedCalls:
    """The seed's generic calls of the Engine (a mixin: it uses the engine's config, weights and helpers)."""

    def op_linear(self, args, x) -> Call:
        return self._seed_linear(args, [args.get("name")], x)

    def op_batch_linear(self, args, x) -> Call:
        names = args.get("names")
        if not isinstance(names, list) or not 0 < len(names) <= MAX_BATCH:
            raise ProtocolError(f"batch_linear needs a list of 1 to {MAX_BATCH} weight names")
        return self._seed_linear(args, names, x)

    def _seed_linear(self, args, names: list, x) -> Call:
        c = self.config
        layer = int_arg(args, "layer", 0, c.num_layers - 1)
        mlp = c.intermediate_size
        out = {"q_proj": c.q_dim, "k_proj": c.kv_dim, "v_proj": c.kv_dim, "gate_proj": mlp, "up_proj": mlp}
        for name in names:
            if not isinstance(name, str) or name not in SEED_WEIGHTS:
                raise ProtocolError(f"unknown weight {name!r}: one of {', '.join(SEED_WEIGHTS)}")
            width = {"o_proj": c.q_dim, "down_proj": c.intermediate_size}.get(name, c.hidden_size)
            x = self._activation(x, width)
            # the result, and the weight's rows cast to the server dtype
            self.budget.reserve_rows(x.shape[0] + width, out.get(name, c.hidden_size), self.dtype, f"linear {name}", x)
        return Call("linear", {"layer": layer, "names": names}, (x,))

    def step_linear(self, calls: list[Call]) -> list[list]:
        """The seed's names as views of the fused weights, each split over the ranks like its fused weight."""
        (call,) = calls
        c, s, (x,) = self.config, self.shard, call.inputs
        w = self.layers[call.args["layer"]]
        q, kv, mlp = len(s.heads) * c.head_dim, len(s.kv_heads) * c.head_dim, len(s.mlp)
        views = {
            "q_proj": (w.qk, w.qk_bias, 0, q, "q"),
            "k_proj": (w.qk, w.qk_bias, q, kv, "kv"),
            "v_proj": (w.v, w.v_bias, 0, kv, "kv"),
            "gate_proj": (w.gate_up, w.gate_up_bias, 0, mlp, "mlp"),
            "up_proj": (w.gate_up, w.gate_up_bias, mlp, mlp, "mlp"),
            "o_proj": (w.o, w.o_bias, 0, c.hidden_size, "o"),
            "down_proj": (w.down, w.down_bias, 0, c.hidden_size, "down"),
        }
        results = []
        for name in call.args["names"]:
            weight, bias, start, rows, split = views[name]
            weight = weight.narrow(0, start, rows).to(self.dtype)  # v, o: float32 on the value path
            bias = None if bias is None else bias.narrow(0, start, rows).to(self.dtype)
            results.append(self.linears.linear(x, weight, bias, split))
        return [results]

    def op_matmul(self, args, a, b) -> list[torch.Tensor]:
        """a @ b, (..., n, k) by (..., k, m): no weights, so rank 0 computes it alone."""
        if a.dim() != b.dim() or a.dim() not in (2, 3) or a.shape[-1] != b.shape[-2] or a.shape[:-2] != b.shape[:-2]:
            raise ProtocolError(f"matmul shapes {list(a.shape)} and {list(b.shape)} do not match")
        shape = (*a.shape[:-1], b.shape[-1])
        limit = self.config.num_heads * self.config.max_position_embeddings**2  # all heads' full score square
        if math.prod(shape) > limit:
            raise ProtocolError(f"matmul result {list(shape)} exceeds {limit} elements")
        self.budget.reserve(math.prod(shape) * self.dtype.itemsize, "matmul")
        return [torch.matmul(self._float(a), self._float(b), out=self.linears.out(shape))]
