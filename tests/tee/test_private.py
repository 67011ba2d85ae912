"""Private mode's results: logits equal to transformers' (max abs 1e-3) on every config feature the plain
split is tested on, with pads from the TEE's pool and from a helper; appends and decode; greedy text
equal to plain mode's; several private clients on one server; a lying server caught on masked products.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import load_reference, reference_logits, run_tsqp, token_ids
from support import FEATURES

from tsqp.errors import IntegrityError, ServerError, TsqpError
from tsqp.server.engine import Engine
from tsqp.tee.attention import TeeAttention
from tsqp.tee.compose import attach, tee_model
from tsqp.tee.forward import TeeModel
from tsqp.tee.generate import generate
from tsqp.tee.launcher import ServerProcess
from tsqp.tee.op_weights import Op
from tsqp.tee.pads import AHEAD_ROWS
from tsqp.tee.private import PrivateOptions
from tsqp.tee.remote import InProcess, Synchronous
from tsqp.wire.client import Client
from tsqp.wire.protocol import MASKED_DTYPE

ATOL = 1e-3  # the bound; measured differences are about 1e-5 (float64 products, pads 2^20 larger)


def private_tee(path, pads_dir, engine: Engine | None = None, helper: Engine | None = None, seed=None) -> TeeModel:
    engine = engine or Engine(str(path))
    link = Synchronous(InProcess(helper, peer=b"helper")) if helper is not None else None
    tee = tee_model(path, InProcess(engine), private=PrivateOptions(pads_dir=pads_dir, helper=link, seed=seed))
    attach(tee)
    return tee


def logits_of(tee: TeeModel, ids: torch.Tensor, chunks: list[int] | None = None) -> torch.Tensor:
    tee.ops.open_session(ids.shape[0])
    outputs, pos = [], 0
    for size in chunks or [ids.shape[0]]:
        outputs.append(tee.forward(ids[pos : pos + size], pos=pos))
        pos += size
    tee.ops.close_session()
    return torch.cat(outputs)


@pytest.mark.parametrize("length", [1, 37])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_private_logits_match_transformers(feature_model, feature, length, tmp_path):
    path, reference = feature_model(feature)
    ids = token_ids(length, seed=length)
    tee = private_tee(path, tmp_path / "pads")
    logits = logits_of(tee, ids)
    expected = reference_logits(reference, ids)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    assert tee.ops.checked.checks == 4 * tee.config.num_layers + 1  # every masked product was checked
    assert max(tee.ops.checked.margin.values()) < 0.5  # honest products sit well inside the tolerance
    tee.ops.close()


@pytest.mark.parametrize("feature", list(FEATURES))
def test_private_logits_with_a_helper_match_transformers(feature_model, feature, tmp_path):
    path, reference = feature_model(feature)
    ids = token_ids(29, seed=5)
    tee = private_tee(path, tmp_path / "pads", helper=Engine(str(path)))
    torch.testing.assert_close(logits_of(tee, ids), reference_logits(reference, ids), atol=ATOL, rtol=0)
    assert tee.ops.pads.offline_s == 0 and not (tmp_path / "pads").exists()  # nothing precomputed, nothing stored


def test_appends_and_decode_steps_equal_one_prefill(feature_model, tmp_path):
    path, reference = feature_model("gqa")
    ids = token_ids(40, seed=9)
    tee = private_tee(path, tmp_path / "pads")
    logits = logits_of(tee, ids, chunks=[17, 1, 1, 21])
    torch.testing.assert_close(logits, reference_logits(reference, ids), atol=ATOL, rtol=0)


def test_the_server_keeps_no_session_or_cache_in_private_mode(tiny_model, tmp_path):
    engine = Engine(str(tiny_model))
    tee = private_tee(tiny_model, tmp_path / "pads", engine=engine)
    tee.ops.open_session(12)
    tee.forward(token_ids(12))
    assert engine.sessions == {}  # the KV cache lives in the TEE


def test_greedy_generation_equals_plain_mode_for_32_tokens(tiny_model, tmp_path):
    prompt = token_ids(9, seed=3).tolist()
    plain = tee_model(tiny_model, InProcess(Engine(str(tiny_model))))
    attach(plain)
    expected = generate(plain, prompt, 32).generated_ids
    private = private_tee(tiny_model, tmp_path / "pads")
    assert generate(private, prompt, 32).generated_ids == expected
    assert len(expected) == 32


class LyingEngine(Engine):
    """Moves one element of one masked product by 1e-9 of its row's largest: about 1e-3 of the unmasked
    result (pads are 2^20 larger), a million times what float64 rounding explains."""

    def step_masked_linear(self, calls):
        results = super().step_masked_linear(calls)
        for call, (y,) in zip(calls, results, strict=True):
            if call.args["op"] == "gate_up" and call.args["layer"] == 1:
                y[0, 3] += 1e-9 * y[0].abs().max()
        return results


def test_a_lying_server_is_caught_on_a_masked_product(tiny_model, tmp_path):
    tee = private_tee(tiny_model, tmp_path / "pads", engine=LyingEngine(str(tiny_model)))
    tee.ops.open_session(8)
    with pytest.raises(IntegrityError, match="gate_up of layer 1"):
        tee.forward(token_ids(8))
    with pytest.raises(IntegrityError, match="an earlier"):
        tee.forward(token_ids(8))


def test_attention_runs_only_where_the_mode_allows(tiny_model, tmp_path):
    """The composer refuses what the mode cannot serve: private mode never shows the server q, k or v, so its
    attention is the TEE's; the plain split may run it on either side. Nothing is sent to find out."""
    engine = Engine(str(tiny_model))
    with pytest.raises(TsqpError, match="private mode runs attention in the TEE"):
        tee_model(tiny_model, InProcess(engine), attention="server", private=PrivateOptions(pads_dir=tmp_path))
    with pytest.raises(TsqpError, match="--attention must be one of"):
        tee_model(tiny_model, InProcess(engine), attention="gpu")
    assert tee_model(tiny_model, InProcess(engine), attention="server").ops.attention.pipeline == "auto"
    assert isinstance(tee_model(tiny_model, InProcess(engine), attention="tee").ops.attention, TeeAttention)


def test_masked_products_cross_in_float64_and_no_token_id_crosses(tiny_model, tmp_path):
    sent = []

    class Recording(InProcess):
        def __call__(self, method, args=None, tensors=(), session=None, reply_bytes=0):
            sent.append((method, [t.dtype for t in tensors]))
            return super().__call__(method, args, tensors, session, reply_bytes)

    tee = tee_model(tiny_model, Recording(Engine(str(tiny_model))), private=PrivateOptions(pads_dir=tmp_path / "p"))
    attach(tee)
    logits_of(tee, token_ids(10))
    methods = {method for method, _ in sent}
    assert methods == {"init", "masked_linear"}
    assert all(dtypes == [MASKED_DTYPE] for method, dtypes in sent if method == "masked_linear")


def test_several_private_clients_on_one_server_get_what_they_get_alone(tiny_model, tmp_path):
    prompts = [token_ids(6 + i, seed=20 + i).tolist() for i in range(3)]
    with ServerProcess(str(tiny_model), start_timeout_s=60) as server:

        def run(prompt, results, i):
            with Client(server.endpoint, timeout_s=30) as client:
                tee = tee_model(tiny_model, client, private=PrivateOptions(pads_dir=tmp_path / f"pads-{i}"))
                attach(tee)
                results[i] = generate(tee, prompt, 12).generated_ids
                tee.ops.close()

        alone = [None] * len(prompts)
        for i, prompt in enumerate(prompts):
            run(prompt, alone, i)
        together = [None] * len(prompts)
        threads = [threading.Thread(target=run, args=(p, together, i)) for i, p in enumerate(prompts)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert together == alone and all(len(tokens) == 12 for tokens in alone)


def test_cli_generate_private_equals_plain(tiny_model, tmp_path):
    args = ["generate", "--model", tiny_model, "--token-ids", "5,6,7,8", "--max-new-tokens", "8", "--json"]
    plain = run_tsqp(*args)
    private = run_tsqp(*args, "--private", "--pads-dir", tmp_path / "pads")
    assert plain.returncode == 0 and private.returncode == 0, private.stderr
    assert json.loads(private.stdout)["generated_ids"] == json.loads(plain.stdout)["generated_ids"]


def test_a_private_only_server_holds_float64_weights_and_refuses_plain_calls(tiny_model, tiny_reference, tmp_path):
    engine = Engine(str(tiny_model), private_only=True)
    assert engine.embed is None and all(layer is None for layer in engine.layers)
    assert all(weight.dtype == MASKED_DTYPE for weight, _ in engine.masked.made.values())
    ids = token_ids(11)
    logits = logits_of(private_tee(tiny_model, tmp_path / "pads", engine=engine), ids)
    torch.testing.assert_close(logits, reference_logits(tiny_reference, ids), atol=ATOL, rtol=0)
    plain = tee_model(tiny_model, InProcess(engine))
    with pytest.raises(ServerError, match="--private-only"):
        attach(plain)
        plain.ops.open_session(4)
        plain.forward(ids[:4])


def test_a_helper_that_is_the_server_itself_is_refused(tiny_model, tmp_path):
    engine = Engine(str(tiny_model))
    with pytest.raises(TsqpError, match="same server"):
        private_tee(tiny_model, tmp_path / "pads", engine=engine, helper=engine)


@pytest.mark.parametrize("bits", [0, 7, 29, -3])
def test_pad_scales_outside_the_measured_range_are_refused(tiny_model, tmp_path, bits):
    tee = tee_model(tiny_model, InProcess(Engine(str(tiny_model))), private=PrivateOptions(tmp_path, pad_bits=bits))
    with pytest.raises(TsqpError, match="--pad-bits"):
        attach(tee)


class FailingEngine(Engine):
    def op_masked_linear(self, args, x):
        if args.get("op") == "down":
            raise TsqpError("out of memory")
        return super().op_masked_linear(args, x)


@pytest.mark.parametrize("helper", [False, True])
def test_a_failed_product_erases_its_pad_and_drops_the_helpers_reply(tiny_model, tmp_path, helper):
    tee = private_tee(
        tiny_model,
        tmp_path / "pads",
        engine=FailingEngine(str(tiny_model)),
        helper=Engine(str(tiny_model)) if helper else None,
    )
    handed = []
    source = getattr(tee.ops.pads, "source", tee.ops.pads)  # under Ahead: its takes ahead too
    start = source.start
    source.start = lambda op, rows, *label: handed.append(start(op, rows, *label)) or handed[-1]
    tee.ops.open_session(AHEAD_ROWS)  # a take long enough to be taken ahead
    with pytest.raises(ServerError, match="out of memory"):
        tee.forward(token_ids(AHEAD_ROWS))
    tee.ops.close()  # a pad taken ahead for the step's next op is erased unused
    assert Op("down", 0) in [pad.op for pad in handed] and all(pad.used for pad in handed)
    assert handed[-1].op == (Op("down", 0) if helper else Op("qkv", 1))  # the pool's: taken ahead of its turn
    assert all(bool((pad.z == 0).all()) for pad in handed)  # every pad handed out is erased
    if helper:
        assert tee.ops.options.helper.replies == {}  # the failed call's helper reply was not kept


def test_bench_private_reports_the_pad_cost(tmp_path):
    out = tmp_path / "bench.json"
    result = run_tsqp(
        "bench", "--private", "--tokens", "12", "--decode", "3", "--pads-dir", tmp_path / "pads", "--json", out
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["private"] is True and figures["pad_source"] == "pool"
    assert figures["offline_s"] > 0 and figures["pads_computed_tokens"] >= 12  # an empty pool: computed first
    assert figures["pad_bytes_per_token"] > 0 and figures["leak_bound_bits_per_coordinate"] < 1e-9
    assert figures["decode"]["new_tokens"] == 3 and figures["rpc_calls"] == 4 * 2 + 1  # tiny: 2 layers


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_private_logits_on_a_half_precision_server_equal_the_rounded_model(checkpoints, dtype, tmp_path):
    """A bfloat16 or float16 server holds rounded weights; private mode computes on them in float64, so
    its logits are those of the model with its linear weights rounded so (norms stay float32, in the TEE)."""
    path = checkpoints("feature-gqa-bias", seed=7, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    reference = load_reference(path)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "norm" not in name and "embed_tokens" not in name:
                param.copy_(param.to(getattr(torch, dtype)).float())
    ids = token_ids(23, seed=4)
    tee = private_tee(path, tmp_path / "pads", engine=Engine(str(path), dtype=dtype))
    assert tee.ops.wire_name == dtype
    torch.testing.assert_close(logits_of(tee, ids), reference_logits(reference, ids), atol=ATOL, rtol=0)
