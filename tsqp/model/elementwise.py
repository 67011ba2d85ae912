"""The elementwise work between a model's products: its RMSNorm gains and where they sit, the residual add,
the gated activation. The TEE's forward pass runs it, and the server for the plain split's fused calls
(server/fused_calls.py), with these same functions.

Both sides run the same float32 operations on the same inputs (`F.rms_norm`, the residual add, act(gate) *
up), so on one kind of processor the server's input to a fused call's next product is the TEE's bit for bit;
elsewhere it differs by roundings, far inside the Freivalds tolerance the TEE checks that product with
(verify.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tsqp.model.checkpoint import Checkpoint, layer_prefix, norm_weight_names

ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh")}


def gated(activation, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up in float32 (a new tensor; gate and up as they are): down's input."""
    return activation(gate.to(torch.float32)).mul_(up)


class Norms:
    """The gains as the norm multiplies by them, float32: w, or Gemma's 1 + w; by checkpoint name."""

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "cpu"):
        """device: where the gains live (a GPU server's, for its fused calls)."""
        c = checkpoint.config
        self.config, self.family, self.eps = c, c.family, c.rms_norm_eps
        offset, names = self.family.norm_offset, norm_weight_names(c)
        self.gains = {name: (t.to(torch.float32) + offset).to(device) for name, t in checkpoint.tensors(names)}

    def __call__(self, x: torch.Tensor, name: str | None) -> torch.Tensor:
        """RMSNorm over the last dimension with the gain named `name` (None: the family has no norm there)."""
        if name is None:
            return x
        return F.rms_norm(x, x.shape[-1:], self.gains[name], self.eps)

    def layer(self, layer: int, norm: str | None) -> str | None:
        """A layer's norm gain by its checkpoint name, or None where the family has none."""
        return None if norm is None else f"{layer_prefix(layer)}{norm}.weight"

    def between(self, layer: int, after: str) -> tuple[str | None, str | None]:
        """The norms between `after` (o_proj or down) of `layer` and the next product: the one on its result
        before the residual add, and the one on the residual stream that makes the next product's input."""
        f = self.family
        if after == "o_proj":
            return self.layer(layer, f.attn_out_norm), self.layer(layer, f.mlp_in_norm)
        return self.layer(layer, f.mlp_out_norm), self.layer(layer + 1, f.attn_in_norm)

    def after(self, x: torch.Tensor, y: torch.Tensor, layer: int, product: str) -> torch.Tensor:
        """The residual stream after `product` (o_proj or down) of `layer`, float32: x + norm_out(y), x the
        stream before (float32), y the product (in any float dtype, taken as float32 as the TEE takes its copy)."""
        return x + self(y.to(torch.float32), self.between(layer, product)[0])

    def next_input(self, x: torch.Tensor, layer: int, after: str) -> torch.Tensor:
        """The next product's input, float32: norm_in of x, the stream after `after` of layer (`Norms.after`)."""
        return self(x, self.between(layer, after)[1])
