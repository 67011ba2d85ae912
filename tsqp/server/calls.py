"""What a validated request hands to the engine's steps: a Call, and how several calls share one product.

Rank 0's `op_` method checks a request and resolves it into a Call: the step to run, its arguments with
everything resolved (session id, layer, positions) and its input tensors. A step method takes the calls
of every request that runs it together, as vLLM's engine core executes a scheduled batch: a solo request
is a batch of one. A linear's calls are stacked by rows (`stacked`) into one product, whose rows are then
split back per call (`split`); per-session work (the KV cache, P V) stays per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tsqp.errors import ProtocolError


@dataclass
class Call:
    """One request's share of a step."""

    step: str  # the Engine.step_ method that runs it, on every rank
    args: dict  # resolved by rank 0; msgpack-able: they travel to the other ranks
    inputs: tuple[torch.Tensor, ...] = ()


def stacked(calls: list[Call]) -> torch.Tensor:
    """The calls' first inputs stacked by rows: (sum of T, width); one call's input as it is (no copy)."""
    if len(calls) == 1:
        return calls[0].inputs[0]
    return torch.cat([call.inputs[0] for call in calls])


def parts(y: torch.Tensor, calls: list[Call], rows: list[int] | None = None) -> list[torch.Tensor]:
    """Each call's rows of a stacked product y: `rows` of it each (by default as many as its first input
    has); one call's are y itself."""
    if len(calls) == 1:
        return [y]
    return list(torch.split(y, rows or [call.inputs[0].shape[0] for call in calls]))


def split(y: torch.Tensor | None, calls: list[Call], rows: list[int] | None = None) -> list[list]:
    """Each call's result list: its rows of y (`parts`); None for each on a follower rank, where rank 0
    assembles y."""
    if y is None or len(calls) == 1:
        return [[y]] * len(calls)
    return [[part] for part in parts(y, calls, rows)]


def int_arg(args: dict, name: str, low: int, high: int) -> int:
    value = args.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"argument {name!r} must be an integer in [{low}, {high}], got {value!r}")
    return value
