"""A lying server for the verification tests: an Engine that tampers with one op's results or its KV cache.

`Tamper(op, part, kind)` names what to corrupt: the op (embedding, qkv, scores, attn_out, o_proj, gate_up,
down, lm_head), the part of a fused result (q, k or v of qkv, gate or up of gate_up), and how:

    flip     negate the element of largest magnitude
    delta    add the result's largest magnitude to one element
    scale    multiply one row by 3
    swap     swap two rows that differ
    stale    replay the previous result of the same op and shape (the previous layer's, or the
             previous forward's for embedding and lm_head)
    zeros    the right shape of zeros

and `CacheTamper(kind, past)` corrupts what the server caches instead of what it returns: a different k
(kind "k") or v ("v") than the TEE sent or the server computed, at the current call's first position or,
with past=True, during a later call: the key or the value of one kv head at position 0. Only layer 1
is tampered with (layer ops), so a stale replay of layer 0 exists. Scores are tampered within key
column 0, which no query row masks (the first key of its first row's window, on a sliding-window layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tsqp.server.engine import Engine
from tsqp.wire.protocol import query_tiles

TAMPER_LAYER = 1
OPS = [
    ("embedding", None),
    ("qkv", "q"),
    ("qkv", "k"),
    ("scores", None),
    ("attn_out", None),
    ("gate_up", "gate"),
    ("gate_up", "up"),
    ("down", None),
    ("lm_head", None),
]
PROMPTS = [torch.tensor([3, 17, 42, 7, 99, 150]), torch.tensor([5, 23, 61, 11, 88, 140])]  # distinct ids
NEXT = torch.tensor([77])
KINDS = ["flip", "delta", "scale", "swap", "stale", "zeros"]


@dataclass(frozen=True)
class Tamper:
    op: str
    part: str | None
    kind: str

    def __str__(self) -> str:
        return f"{self.op}{'.' + self.part if self.part else ''}-{self.kind}"


@dataclass(frozen=True)
class CacheTamper:
    kind: str  # "k" or "v"
    past: bool  # corrupt position 0 during a later call, instead of the current call's first position

    def __str__(self) -> str:
        return f"cache-{self.kind}-{'past' if self.past else 'current'}"


class LyingEngine(Engine):
    def __init__(self, model_dir, dtype: str = "float32", plan: Tamper | CacheTamper | None = None):
        super().__init__(str(model_dir), dtype=dtype)
        self.plan = plan
        self.previous: dict[tuple, list[torch.Tensor]] = {}  # (method, shapes) -> last results, for replays
        self.tampered = 0  # how many replies or cache writes were corrupted

    def handle(self, peer, request, *rest, **options):
        reply_args, results = super().handle(peer, request, *rest, **options)
        plan = self.plan
        for method, layer, part in products(request, results):
            key = (method, tuple(tuple(t.shape) for t in part))
            honest = [t.clone() for t in part]
            if isinstance(plan, Tamper) and plan.op == method and layer in (None, TAMPER_LAYER):
                if plan.kind != "stale" or key in self.previous:
                    self.tampered += self._tamper(plan, request, part, self.previous.get(key))
            self.previous[key] = honest
        return reply_args, results

    def _tamper(self, plan: Tamper, request, results: list[torch.Tensor], stale) -> bool:
        c = self.config
        if plan.kind == "stale":
            self._part(plan, results).copy_(self._part(plan, stale))
            return True
        if plan.op == "scores":
            T = request.tensors[0].shape[0]
            args = request.args
            tile = query_tiles(T, args["pos"], c.num_heads, args["tile"], args.get("window"))[0][-1]
            view = results[0][tile.offset : tile.offset + c.num_heads * tile.rows * tile.keys].view(-1, tile.keys)
            rows = (0, tile.rows)  # heads 0 and 1 at the same query row: the same causal mask
            view = view[:, :1] if plan.kind in ("flip", "delta") else view  # key 0 is visible to every row
        else:
            view = self._part(plan, results)
            rows = (0, 1)
        if plan.kind == "flip":
            flat = int(view.abs().argmax())
            i, j = divmod(flat, view.shape[1])
            view[i, j] = -view[i, j]
        elif plan.kind == "delta":
            view[view.shape[0] // 2, 0] += view.abs().max()
        elif plan.kind == "scale":
            view[0] *= 3
        elif plan.kind == "swap":
            if view.shape[0] <= max(rows):
                return False  # one row (a decode step): nothing to swap
            view[list(rows)] = view[list(reversed(rows))].clone()
        elif plan.kind == "zeros":
            view.zero_()
        return True

    def _part(self, plan: Tamper, results: list[torch.Tensor]) -> torch.Tensor:
        """The result, or its part (of the fused layout or of one tensor per part)."""
        c = self.config
        if plan.op == "qkv" and plan.part == "v":
            return results[1]  # [q | k], then v when asked for (attention in the TEE)
        widths = {
            "qkv": {"q": c.q_dim, "k": c.kv_dim},
            "gate_up": {"gate": c.intermediate_size, "up": c.intermediate_size},
        }.get(plan.op)
        if widths is None:
            return results[0]
        names = list(widths)
        if len(results) == len(names) and plan.op != "qkv":
            return results[names.index(plan.part)]
        start = sum(widths[n] for n in names[: names.index(plan.part)])
        return results[0][:, start : start + widths[plan.part]]

    # -- a server that caches something else than it was sent, or than it computed ----------------

    def op_scores(self, session, args, q, k):
        plan = self.plan
        if isinstance(plan, CacheTamper) and plan.kind == "k" and args.get("layer") == TAMPER_LAYER:
            if plan.past and args["pos"] > 0:
                session.keys[TAMPER_LAYER, 0, 0] += session.keys[TAMPER_LAYER, 0, 0].abs().max() + 1
                self.tampered += 1
            elif not plan.past:
                k = k.clone()
                k[0, 0] += k[0, 0].abs().max() + 1
                self.tampered += 1
        return super().op_scores(session, args, q, k)

    def step_qkv(self, calls):
        results = super().step_qkv(calls)  # v is cached here, then tampered with
        plan = self.plan
        for call in calls:
            args, session = call.args, self.sessions[call.args["session"]]
            if isinstance(plan, CacheTamper) and plan.kind == "v" and args["layer"] == TAMPER_LAYER:
                pos = args["pos"]
                if not plan.past or pos > 0:
                    values = session.values[TAMPER_LAYER, 0, 0 if plan.past else pos]
                    values += values.abs().max() + 1
                    self.tampered += 1
        return results


def products(request, results: list[torch.Tensor]) -> list[tuple[str, int | None, list[torch.Tensor]]]:
    """A reply's products as (op, layer, its results): a fused call's each (server/fused_calls.py), each a
    list of the reply's own tensors (tampering with one tampers with the reply)."""
    method, layer = request.header.get("method"), request.args.get("layer")
    if method == "o_proj_gate_up":  # through gate_up, down or the next layer's qkv
        found = [("o_proj", layer, results[:1]), ("gate_up", layer, results[1:2]), ("down", layer, results[2:3])]
        return found[: len(results)] + ([("qkv", layer + 1, results[3:])] if len(results) > 3 else [])
    if method == "down_qkv":
        return [("down", layer, results[:1]), ("qkv", layer + 1, results[1:])]
    return [(method, layer, results)]


def two_prefills_and_a_step(tee) -> list[torch.Tensor]:
    """An attached TeeModel's logits for two prefills of the same length in two sessions (so embedding and
    lm_head have a reply to replay), then one decode step after the second (a past position in the cache)."""
    outputs = []
    for i, prompt in enumerate(PROMPTS):
        tee.ops.open_session(len(prompt) + 1)
        outputs.append(tee.forward(prompt))
        if i == 1:
            outputs.append(tee.forward(NEXT, pos=len(prompt)))
        tee.ops.close_session()
    return outputs
