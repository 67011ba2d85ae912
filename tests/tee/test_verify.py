"""Verified mode against an honest server: exact logits, no false alarm, and the keys' algebra.

The honest server must pass every Freivalds check, thousands of them, for float32, bfloat16 and
float16 servers, for MHA, GQA and MQA, with biases and with tied or separate embeddings, at lengths 1,
prime and above 256, in prefill and decode. `Verifier.margin` records the largest ratio of an honest
discrepancy to its tolerance; it must stay well below 1.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import reference_logits, run_tsqp, token_ids

from tsqp.errors import IntegrityError, TsqpError
from tsqp.tee.compose import tee_model
from tsqp.tee.forward import TeeModel
from tsqp.tee.freivalds import VECTORS
from tsqp.tee.remote import InProcess
from tsqp.tee.verify import Verifier

SHAPES = {
    "mha": dict(),
    "gqa": dict(num_key_value_heads=2),
    "mqa-untied": dict(num_key_value_heads=1, tie_word_embeddings=False),
    "gqa-bias": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "gqa-sharded": dict(num_key_value_heads=2, shard=True),
}
DTYPES = ["float32", "bfloat16", "float16"]
HONEST_MARGIN = 0.6  # of the tolerance; the largest seen in these runs is about 0.35


@pytest.fixture(scope="module")
def models(checkpoints):
    return {
        name: checkpoints(f"verify-{name}", seed=11 + i, **overrides)
        for i, (name, overrides) in enumerate(SHAPES.items())
    }


def tee_for(model, dtype: str = "float32", tile: int | None = None) -> TeeModel:
    from tsqp.server.engine import Engine

    tee = tee_model(model, InProcess(Engine(str(model), dtype=dtype)))
    if tile:
        tee.ops.attention.tile = tile
    tee.attach()
    return tee


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("length", [1, 13, 300])
def test_verified_logits_equal_transformers(checkpoints, models, name, length):
    tee = tee_for(models[name])
    assert isinstance(tee.ops.checker, Verifier)
    ids = token_ids(length, seed=length)
    tee.ops.open_session(length)
    logits = tee.forward(ids)
    tee.ops.close_session()
    expected = reference_logits(checkpoints.reference(f"verify-{name}"), ids)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    layers = tee.config.num_layers
    assert tee.ops.checker.checks == {
        "embedding": 1,
        "qkv": 2 * layers,
        "scores": layers,
        "attn_out": layers,
        "gate_up": 2 * layers,
        "down": layers,
        "lm_head": 1,
    }


def test_decode_steps_are_verified_and_exact(models):
    """A prefill, then one token at a time (each step's keys append to the secret running sums)."""
    model = models["gqa-bias"]
    ids = token_ids(40, seed=5)
    whole = tee_for(model)
    whole.ops.open_session(40)
    expected = whole.forward(ids)
    tee = tee_for(model)
    tee.ops.open_session(40)
    steps = [tee.forward(ids[:30])] + [tee.forward(ids[p : p + 1], pos=p) for p in range(30, 40)]
    torch.testing.assert_close(torch.cat(steps), expected, atol=1e-4, rtol=1e-4)
    assert tee.ops.checker.checks["scores"] == whole.config.num_layers * (1 + 10)


def test_honest_server_passes_thousands_of_checks(models):
    checks, comparisons, margin = 0, 0, {}
    for dtype in DTYPES:
        for name, model in models.items():
            for tile in (64, 5):
                tee = tee_for(model, dtype, tile)
                tee.ops.open_session(330)
                tee.forward(token_ids(300, seed=len(name)))
                for pos in range(300, 312):  # decode steps
                    tee.forward(token_ids(1, seed=pos), pos=pos)
                tee.forward(token_ids(17, seed=3), pos=312)  # a second, prime-length chunk
                tee.forward(token_ids(13, seed=4))  # start over at position 0 in the same session
                tee.ops.close_session()
                checks += sum(tee.ops.checker.checks.values())
                comparisons += tee.ops.checker.comparisons
                for op, ratio in tee.ops.checker.margin.items():
                    margin[dtype, op] = max(margin.get((dtype, op), 0.0), ratio)
    print(
        f"honest server: {checks} checks, {comparisons} row comparisons, no false alarm; "
        f"largest discrepancy / tolerance: {max(margin.values()):.3f}"
    )
    assert checks >= 5000
    worst = {key: round(ratio, 3) for key, ratio in margin.items() if ratio >= HONEST_MARGIN}
    assert not worst, f"honest discrepancies too close to the tolerance: {worst}"


def test_keys_hold_the_products_of_the_checkpoint_weights(models):
    """w = W^T s, e = E s, and c_h = x . z_h + beta_h = v_g(h)(x) . (W_o[:, h]^T s_o) for any x."""
    from tsqp.model.checkpoint import Checkpoint

    model = models["gqa-bias"]
    tee = tee_for(model)
    tee.ops.open_session(4)
    tee.forward(token_ids(4))  # the keys are computed on the first call
    keys, c = tee.ops.checker.keys, tee.config
    weights = dict(Checkpoint(model).tensors(Checkpoint(model).where))
    p = "model.layers.1."
    layer = keys.layers[1]
    for name, key in (("self_attn.q_proj", layer.q), ("mlp.down_proj", layer.down)):
        torch.testing.assert_close(key.w, weights[p + name + ".weight"].T @ key.s, atol=1e-5, rtol=1e-5)
    embed = weights["model.embed_tokens.weight"]
    torch.testing.assert_close(keys.embed_e, embed @ keys.embed_s, atol=1e-5, rtol=1e-5)
    x = torch.randn(3, c.hidden_size)
    v = x @ weights[p + "self_attn.v_proj.weight"].T + weights[p + "self_attn.v_proj.bias"]  # (3, kv_dim)
    u = weights[p + "self_attn.o_proj.weight"].T @ layer.o.s  # (q_dim, K)
    for h in range(c.num_heads):
        g = h // c.group_size
        expected = v[:, g * c.head_dim : (g + 1) * c.head_dim] @ u[h * c.head_dim : (h + 1) * c.head_dim]
        got = x @ layer.qkv_proj[:, 2 * VECTORS + h * VECTORS : 2 * VECTORS + (h + 1) * VECTORS] + layer.beta[h]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_results_fail(models, value):
    from tsqp.server.engine import Engine

    model = models["gqa"]
    server = InProcess(Engine(str(model)))

    def call(method, args=None, tensors=(), session=None, **options):
        reply = server(method, args, tensors, session, **options)
        if method == "gate_up":
            reply.tensors[0].view(-1)[7] = value
        return reply

    tee = tee_model(model, call)
    tee.attach()
    tee.ops.open_session(6)
    with pytest.raises(IntegrityError, match="gate_up \\(gate\\) of layer 0"):
        tee.forward(token_ids(6))


def test_cache_positions_must_append(models):
    tee = tee_for(models["gqa"])
    tee.ops.open_session(20)
    tee.forward(token_ids(8))
    with pytest.raises(TsqpError, match="must append"):
        tee.forward(token_ids(2), pos=4)  # a rewind the running key sums cannot follow


def test_cli_verify_flag(tiny_model, tmp_path):
    """On by default; --no-verify gives the same logits; bench reports the cost of verification."""
    outputs = {}
    for flag in ("--verify", "--no-verify"):
        out = tmp_path / f"logits{flag}.npy"
        result = run_tsqp("logits", "--model", tiny_model, "--token-ids", "5,6,7,8,9", "--out", out, flag)
        assert result.returncode == 0, result.stderr
        outputs[flag] = out.read_bytes()
    assert outputs["--verify"] == outputs["--no-verify"]
    figures, printed = {}, {}
    for flag in ("--verify", "--no-verify"):
        path = tmp_path / f"bench{flag}.json"
        result = run_tsqp("bench", "--model", tiny_model, "--tokens", "20", "--json", path, flag)
        assert result.returncode == 0, result.stderr
        figures[flag], printed[flag] = json.loads(path.read_text()), result.stdout
    assert "verification" in printed["--verify"] and "verification" not in printed["--no-verify"]
    assert figures["--verify"]["verify"] is True and figures["--verify"]["verify_s"] > 0
    assert figures["--verify"]["verify_setup_s"] > 0
    assert figures["--no-verify"]["verify"] is False and figures["--no-verify"]["verify_s"] == 0
    assert figures["--verify"]["verify_overlapped"] is False  # a CPU server shares the TEE's cores
    path = tmp_path / "overlapped.json"  # a prefill longer than a short step, its checks during the next call
    result = run_tsqp("bench", "--model", tiny_model, "--tokens", "160", "--json", path, "--pipeline", "on")
    assert result.returncode == 0, result.stderr
    assert json.loads(path.read_text())["verify_overlapped"] is True, result.stdout
    assert "checks made while the server computed the next call" in result.stdout
