"""What a curious GPU operator learns from everything it receives and sends: plain mode against private mode.

A recording server keeps a clone of every tensor the TEE sends it and every tensor it sends back (a
2-layer model: vocab V = 200, hidden 32, intermediate 64; a 24-token prompt). Each attack must succeed
against plain mode and stay at chance against private mode. Chance comes from the dimensions: a masked
row x + s z (s about 2^20 max|x|, z standard Gaussian) points a uniformly random way, so its |cosine| with
a fixed vector of R^n has the spherical law, density (1 - c^2)^((n-3)/2). The largest of K such |cosines|
is typically sqrt(2 ln K / n) (clipped at 1); each assertion's bound is the t with K P(|cos| >= t) = ALPHA
(a union bound, false alarm 1e-4 each). Figures over four runs (fresh pads each; model seed 3, prompts
token_ids seeds 1 and 2), as "plain; private (typical chance, bound)":

(a) token ids. (i) int64 tensors received: plain 1, the prompt's ids; private 0 (every tensor received is
    float64, the only calls init and masked_linear). (ii) nearest neighbour (cosine) of each received
    (24, 32) tensor's rows in the embedding table and in the layer-0 normed table (RMSNorm(e) * gain, the
    config's eps), accuracy over the prompt's positions, best of 14 tensor x table tries: plain 1.0 (24/24,
    layer 0's qkv input); private 0 to 0.083 (0 to 2/24) (chance 1/V = 0.005 a position; bound 5/24, a
    binomial tail at 2/V, a margin of 2x for unequal nearest-neighbour cells).
(b) directions of true activations (hidden states, every linear's input, the final normed state, logits):
    largest |cosine| between a row and any true row of its width. Received rows: plain 1.0; private width 32
    0.65-0.73 (0.82, 0.83), width 64 0.38-0.47 (0.49, 0.62). Sent rows: plain 1.0 (embedding rows, logits);
    private width 32 0.62-0.78, 64 0.36-0.49, 200 0.52-0.65. A sent row's pad s z W^T spans W's rows and is not
    isotropic: its chance is taken in the dimension (tr A)^2 / tr A^2, A = W^T W, the smallest over the ops
    of that output width (15.2 at width 32, bound 0.96; 20.8 at 64, bound 0.89; 27.9 at 200, bound 0.80).
(c) pad reuse. The same prompt twice: plain sends identical rows (|cos| 1); private no row twice, largest
    |cos| between any rows of the two runs 0.62-0.70 at width 32 (0.80, 0.83), 0.41-0.49 at 64 (0.49, 0.62).
    Two prompts, (received_1 - received_2) against (x_1 - x_2) row by row: plain smallest cosine 1.0 (to 1e-15);
    private largest |cos| 0.43-0.60 (0.58, 0.75). With one seed for every pool block, or pads 2^-30 of x,
    these tests fail with |cos| 1.000.
(d) a Pad's result is handed out once (PadReuse); a PoolPads hands out every row once, across pools.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import token_ids

from tsqp.model.checkpoint import Checkpoint
from tsqp.server.engine import Engine
from tsqp.stats import Stats
from tsqp.tee.compose import attach, tee_model
from tsqp.tee.op_weights import Op, load_weight, model_ops
from tsqp.tee.pads import Pad, PadReuse, PoolPads
from tsqp.tee.private import PrivateOptions
from tsqp.tee.remote import InProcess

PROMPT = 24
ALPHA = 1e-4  # false-alarm probability of each chance bound: under 2e-3 for the 17 of this file
PLAIN = 0.999  # what an exact copy of an activation reaches (float32 rounding)


class RecordingServer:
    """An honest server that keeps a clone of every tensor it receives and sends, with the method and args."""

    def __init__(self, path: Path):
        self.engine = Engine(str(path))
        self.inner = InProcess(self.engine)
        self.log: list[tuple[str, dict, list[torch.Tensor], list[torch.Tensor]]] = []

    def __call__(self, method, args=None, tensors=(), session=None, reply_bytes=0):
        received = [t.clone() for t in tensors]  # the TEE erases its buffers once the reply is in
        reply = self.inner(method, args, tensors, session=session, reply_bytes=reply_bytes)
        self.log.append((method, dict(args or {}), received, [t.clone() for t in reply.tensors]))
        return reply

    def take(self) -> list:
        log, self.log = self.log, []
        return log


@dataclass
class World:
    path: Path
    ids: torch.Tensor
    other: torch.Tensor
    truth: dict[str, torch.Tensor]  # activation name -> (T, width), the prompt's
    truth_other: dict[str, torch.Tensor]
    logs: dict[str, list] = field(default_factory=dict)
    logits: dict[str, torch.Tensor] = field(default_factory=dict)
    sent_dims: dict[int, float] = field(default_factory=dict)  # output width -> chance dimension of a sent row


@torch.inference_mode()
def activations(reference, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every activation of the prompt: hidden states, each linear's input (by (op, layer) names), logits."""
    found: dict[str, torch.Tensor] = {}
    modules = {"lm_head 0": reference.lm_head, "residual out": reference.model.norm}
    for i, layer in enumerate(reference.model.layers):
        modules |= {f"qkv {i}": layer.self_attn.q_proj, f"o_proj {i}": layer.self_attn.o_proj}
        modules |= {f"gate_up {i}": layer.mlp.gate_proj, f"down {i}": layer.mlp.down_proj}

    def keep(name: str):
        def hook(module, args, out) -> None:  # returns None: the output is left alone
            found[name] = args[0][0].double()

        return hook

    hooks = [module.register_forward_hook(keep(name)) for name, module in modules.items()]
    try:
        result = reference(ids[None], output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    found |= {f"hidden {i}": h[0].double() for i, h in enumerate(result.hidden_states)}
    return found | {"logits": result.logits[0].double()}


@pytest.fixture(scope="module")
def world(checkpoints, tmp_path_factory) -> World:
    path = checkpoints("attack-model", seed=3, num_hidden_layers=2, num_key_value_heads=2)
    reference = checkpoints.reference("attack-model")
    ids, other = token_ids(PROMPT, seed=1), token_ids(PROMPT, seed=2)
    w = World(path, ids, other, activations(reference, ids), activations(reference, other))
    pads = tmp_path_factory.mktemp("pads")
    server = RecordingServer(path)
    plain = tee_model(path, server, fuse=False)  # each linear's input received as a call's (fused: the residual)
    private = tee_model(path, server, private=PrivateOptions(pads_dir=pads))
    fresh = tee_model(path, server, private=PrivateOptions(pads_dir=pads))
    runs = [(plain, "plain", ids), (plain, "plain again", ids), (plain, "plain other", other)]
    runs += [(private, "private", ids), (private, "private again", ids), (fresh, "private other", other)]
    for tee, name, prompt in runs:
        if name in ("plain", "private", "private other"):
            attach(tee)  # its init is in this run's log
        tee.ops.open_session(PROMPT)
        w.logits[name] = tee.forward(prompt)
        tee.ops.close_session()
        w.logs[name] = server.take()
    private.ops.close()
    fresh.ops.close()
    for op in model_ops(plain.config):  # a sent row's pad s z W^T lies in W's row space, with A = W^T W
        weight, _ = server.engine.masked.weight(op.name, op.layer)
        a = torch.linalg.eigvalsh(weight.T @ weight)
        ratio = float(a.sum() ** 2 / a.square().sum())
        w.sent_dims[weight.shape[0]] = min(ratio, w.sent_dims.get(weight.shape[0], math.inf))
    return w


# -- statistics --------------------------------------------------------------------------------------


def rows(t: torch.Tensor) -> torch.Tensor:
    t = t.double()
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t[None]


def float_rows(log: list, side: str) -> list[tuple[str, torch.Tensor]]:
    """(call, rows) of every float tensor received (side 'received') or sent back ('sent')."""
    return [
        (f"{method} {args}", rows(t))
        for method, args, received, sent in log
        for t in (received if side == "received" else sent)
        if t.is_floating_point()
    ]


def largest_cos(candidates: list[torch.Tensor], truths: list[torch.Tensor]) -> dict[int, tuple[int, float]]:
    """width -> (pairs compared, largest |cosine| between a candidate row and a truth row of that width)."""
    found: dict[int, tuple[int, float]] = {}
    for a in candidates:
        for b in truths:
            if a.shape[1] == b.shape[1]:
                c = (F.normalize(a, dim=1) @ F.normalize(b, dim=1).T).abs()
                pairs, best = found.get(a.shape[1], (0, 0.0))
                found[a.shape[1]] = (pairs + c.numel(), max(best, float(c.max())))
    return found


def chance_bound(n: float, pairs: int) -> float:
    """The t with pairs * P(|cos| >= t) = ALPHA, for a uniformly random direction in R^n (exact law)."""
    c = torch.linspace(0.0, 1.0, 200_001, dtype=torch.float64)
    density = (1 - c * c).clamp_min(0) ** ((n - 3) / 2)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum((density[1:] + density[:-1]) / 2, 0)])
    tail = 1 - cdf / cdf[-1]
    return float(c[int((pairs * tail <= ALPHA).nonzero()[0])])


def assert_chance(found: dict[int, tuple[int, float]], what: str, dims: dict[int, float] | None = None) -> None:
    for width, (pairs, best) in found.items():
        n = (dims or {}).get(width, width)
        bound, typical = chance_bound(n, pairs), min(1.0, math.sqrt(2 * math.log(pairs) / n))
        assert best <= bound, (
            f"{what}, width {width}: largest |cos| {best:.3f} over {pairs} pairs is above chance: typical "
            f"sqrt(2 ln K / n) = {typical:.3f} in dimension {n:.1f}, bound {bound:.3f} (P {ALPHA} each)"
        )


def binomial_bound(trials: int, p: float, tries: int) -> int:
    """The smallest k with tries * P(Binomial(trials, p) >= k) <= ALPHA."""
    tail = 1.0
    for k in range(trials + 1):
        if tries * tail <= ALPHA:
            return k
        tail -= math.comb(trials, k) * p**k * (1 - p) ** (trials - k)
    return trials + 1


def token_tables(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint(path)
    embed = checkpoint.tensor("model.embed_tokens.weight").double()
    gain = checkpoint.tensor("model.layers.0.input_layernorm.weight").double()
    eps = checkpoint.config.rms_norm_eps
    normed = embed * torch.rsqrt(embed.square().mean(-1, keepdim=True) + eps) * gain
    return {"embedding table": embed, "layer-0 normed table": normed}


def recovered_accuracy(log: list, tables: dict[str, torch.Tensor], ids: torch.Tensor) -> dict[str, float]:
    """(call, table) -> the fraction of prompt positions whose id the nearest table row (cosine) names."""
    found = {}
    for call, x in float_rows(log, "received"):
        for name, table in tables.items():
            if x.shape == (ids.shape[0], table.shape[1]):
                guess = (F.normalize(x, dim=1) @ F.normalize(table, dim=1).T).argmax(1)
                found[f"{call} against the {name}"] = float((guess == ids).double().mean())
    return found


def linear_inputs(log: list) -> dict[str, torch.Tensor]:
    """'op layer' -> the rows received as that linear's input (plain: qkv, gate_up, down, lm_head)."""
    found = {}
    for method, args, received, _ in log:
        if method == "masked_linear":
            found[f"{args['op']} {args['layer']}"] = rows(received[0])
        elif method in ("qkv", "gate_up", "down", "lm_head"):
            found[f"{method} {args.get('layer', 0)}"] = rows(received[0])
    return found


# -- (a) token ids -----------------------------------------------------------------------------------


def test_private_mode_computes_the_same_logits(world):
    """The attacks below mean something only if private mode still runs the model."""
    for name in ("private", "private again"):
        assert torch.allclose(world.logits[name], world.logits["plain"], atol=1e-4), name
    assert torch.allclose(world.logits["private other"], world.logits["plain other"], atol=1e-4)


def test_id_frames(world):
    plain = [t for _, _, received, _ in world.logs["plain"] for t in received if t.dtype == torch.int64]
    assert len(plain) == 1 and torch.equal(plain[0], world.ids), "plain mode sends the prompt's ids to the server"
    for name in ("private", "private again", "private other"):
        log = world.logs[name]
        assert {m for m, *_ in log} <= {"init", "masked_linear"}, f"{name}: calls {sorted({m for m, *_ in log})}"
        dtypes = {t.dtype for _, _, received, _ in log for t in received}
        assert dtypes == {torch.float64}, f"{name}: the server received {dtypes}, an int64 tensor names tokens"


def test_nearest_embedding_names_the_tokens_only_in_plain_mode(world):
    tables = token_tables(world.path)
    vocab = next(iter(tables.values())).shape[0]
    plain = recovered_accuracy(world.logs["plain"], tables, world.ids)
    assert max(plain.values()) == 1.0, f"plain mode: the attack should recover every token, got {plain}"
    for name, ids in (("private", world.ids), ("private again", world.ids), ("private other", world.other)):
        private = recovered_accuracy(world.logs[name], tables, ids)
        k = binomial_bound(PROMPT, 2.0 / vocab, len(private))
        call, best = max(private.items(), key=lambda kv: kv[1])
        assert len(private) >= 14 and best < k / PROMPT, (
            f"{name}: {call} recovers {best:.3f} of the tokens; chance is 1/V = {1 / vocab:.3f} a position, "
            f"bound {k}/{PROMPT} = {k / PROMPT:.3f} (binomial at 2/V, margin 2x, {len(private)} tries, P {ALPHA})"
        )


# -- (b) directions of true activations ----------------------------------------------------------------


@pytest.mark.parametrize("side", ["received", "sent"])
def test_no_row_points_the_way_of_an_activation(world, side):
    truths = list(world.truth.values())
    plain = largest_cos([x for _, x in float_rows(world.logs["plain"], side)], truths)
    assert min(best for _, best in plain.values()) >= PLAIN, f"plain mode, {side}: {plain}"
    for name in ("private", "private again"):
        private = largest_cos([x for _, x in float_rows(world.logs[name], side)], truths)
        assert set(private) >= {32}, private
        assert_chance(private, f"{name}, rows {side}", world.sent_dims if side == "sent" else None)


# -- (c) pad reuse -----------------------------------------------------------------------------------


def test_the_same_prompt_twice_shows_nothing(world):
    def received(name: str) -> list[torch.Tensor]:
        return [x for _, x in float_rows(world.logs[name], "received")]

    plain, again = received("plain"), received("plain again")
    same = len(plain) == len(again) and all(torch.equal(a, b) for a, b in zip(plain, again, strict=True))
    assert same, "plain mode sends the same rows for the same prompt: the server can tell it is the same"
    first, second = received("private"), received("private again")
    for width in {x.shape[1] for x in first}:
        both = torch.cat([x for x in first + second if x.shape[1] == width])
        assert torch.unique(both, dim=0).shape[0] == both.shape[0], f"a row of width {width} was received twice"
    assert_chance(largest_cos(first, second), "the same prompt's two private runs")


def test_differences_of_two_prompts_show_nothing(world):
    """(received_1 - received_2) row by row against (x_1 - x_2): a pad used twice would cancel here."""
    for mode in ("plain", "private"):
        one, two = linear_inputs(world.logs[mode]), linear_inputs(world.logs[f"{mode} other"])
        assert one.keys() == two.keys() and len(one) >= 7, (mode, sorted(one))
        cosines = []
        for key in one:
            truth = world.truth[key] - world.truth_other[key]
            keep = truth.norm(dim=1) > 1e-6 * world.truth[key].norm(dim=1)  # rows the two prompts share cancel
            cosines.append(F.cosine_similarity(one[key] - two[key], truth, dim=1)[keep])
        cosines = torch.cat(cosines)
        if mode == "plain":
            assert float(cosines.min()) >= PLAIN, f"plain mode: the differences match x_1 - x_2: {cosines.min()}"
        else:
            width = min(x.shape[1] for x in one.values())  # the lowest dimension: the loosest bound
            assert_chance({width: (cosines.numel(), float(cosines.abs().max()))}, "private differences")


# -- (d) a pad is used once ----------------------------------------------------------------------------


def test_a_pad_result_is_taken_once():
    pad = Pad(Op("lm_head"), torch.zeros(1, 4), lambda: torch.ones(1, 2))
    pad.result()
    with pytest.raises(PadReuse, match="used once"):
        pad.result()


def test_a_pool_never_hands_out_a_row_twice(world, tmp_path):
    checkpoint = Checkpoint(world.path)
    pads = PoolPads(checkpoint, checkpoint.fingerprint(), torch.float32, tmp_path, Stats())
    pads.reserve(8)
    op = Op("gate_up", 1)
    stream = pads.index[op]
    weight, _ = load_weight(checkpoint, op, torch.float32, torch.float64)
    zs = []
    for taken in (3, 6, 9):  # the third take crosses into a new pool: 2 rows of the first, 1 computed
        pad = pads.start(op, 3)
        assert torch.allclose(pad.result(), pad.z @ weight.T, atol=1e-9), "the pool's z W^T is not its z's"
        with pytest.raises(PadReuse):
            pad.result()
        zs.append(pad.z.clone())
        used = [r.used for r in pads.readers]
        assert sum(u[stream] for u in used) == taken, f"the pool's rows counter: {used}, {taken} taken"
        assert all(n == 0 for u in used for i, n in enumerate(u) if i != stream), used
    assert pads.computed_tokens == 9, pads.computed_tokens
    every = torch.cat(zs)
    assert torch.unique(every, dim=0).shape[0] == 9, "a pad row was handed out twice"
    gram = (F.normalize(every, dim=1) @ F.normalize(every, dim=1).T).triu(1).abs()
    assert_chance({every.shape[1]: (36, float(gram.max()))}, "the pool's 9 pad rows against each other")
    pads.close()
