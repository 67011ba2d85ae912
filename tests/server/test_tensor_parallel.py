"""A tensor-parallel server: `tsqp serve --tensor-parallel 2` as real subprocesses on gloo (two CPU ranks).

Logits equal transformers' on GQA (kv heads split), MQA (the one kv head replicated), MHA with tied
embeddings, biases with a vocabulary that does not split evenly, Qwen2 (q, k, v biases) and Gemma 3 (q/k
norms, windows), every result Freivalds-checked as the TEE always does; greedy tokens equal the unsharded
server's, with two clients at once, also when their rows share one product; private mode's masked products
and a helper's pads; a killed rank is one clear client error, and a dead rank 0 ends the others. Without
processes: the shard math, and that each rank reads only its share of the checkpoint.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, reference_logits, run_tsqp, token_ids, wait_for
from support import decode_at_once

from tsqp.errors import TsqpError
from tsqp.model.checkpoint import Checkpoint
from tsqp.model.config import ModelConfig
from tsqp.server.engine import Engine
from tsqp.server.parallel import Ranks
from tsqp.server.sharded import shards
from tsqp.tee.compose import attach, tee_model
from tsqp.tee.generate import generate
from tsqp.tee.launcher import ServerProcess
from tsqp.tee.private import PrivateOptions
from tsqp.tee.remote import InProcess, Synchronous
from tsqp.wire.client import Client

ATOL = 1e-4
PRIVATE_ATOL = 1e-3  # test_private's bound: float64 products of pads 2^20 times the input
START_TIMEOUT_S = 90.0
RANKS = ["--tensor-parallel", "2"]
CONFIGS: dict[str, dict] = {
    "gqa": dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2),
    "mqa": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1),
    "mha": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True
    ),
    "bias": dict(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        vocab_size=201,  # 101 + 100 rows: the last rank's share is padded
    ),
    "qwen2": dict(  # q, k and v biases split with their rows, o_proj's none
        family="qwen2", hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2
    ),
    "gemma3": dict(  # q/k norms and windows in the TEE, over each rank's heads
        family="gemma3",
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=50.0,
    ),
}
NEW_TOKENS = 12


def model(checkpoints, name: str) -> Path:
    return checkpoints("tp-" + name, seed=200 + list(CONFIGS).index(name), **CONFIGS[name])


@pytest.fixture(scope="module")
def sharded(checkpoints):
    """get(name) -> (folder, transformers reference, a running 2-rank server), one server per config."""
    with ExitStack() as stack:
        servers: dict[str, ServerProcess] = {}

        def get(name: str):
            path = model(checkpoints, name)
            if name not in servers:
                server = ServerProcess(str(path), start_timeout_s=START_TIMEOUT_S, extra_args=RANKS)
                servers[name] = stack.enter_context(server)
            return path, checkpoints.reference("tp-" + name), servers[name]

        yield get


def followers(pid: int) -> list[int]:
    """The processes whose parent is pid: the ranks a server started."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- the answers of a sharded server ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers(sharded, name):
    """A prefill, then more tokens on the same session (the sharded KV caches read back), all verified."""
    path, reference, server = sharded(name)
    ids = token_ids(37, vocab=CONFIGS[name].get("vocab_size", 200), seed=37)
    with Client(server.endpoint, timeout_s=60, alive=server.exit_reason) as client:
        tee = tee_model(path, client.call)
        attach(tee)
        tee.ops.open_session(ids.shape[0])
        logits = torch.cat([tee.forward(ids[:30]), tee.forward(ids[30:], pos=30)])
        tee.ops.close_session()
    torch.testing.assert_close(logits, reference_logits(reference, ids), atol=ATOL, rtol=0)
    assert set(tee.ops.checker.checks) == {"embedding", "qkv", "scores", "attn_out", "gate_up", "down", "lm_head"}
    assert max(tee.ops.checker.margin.values()) < 0.5  # the assembled results sit as deep inside the tolerance


@pytest.mark.parametrize("attention", ["tee", "decode"])
@pytest.mark.parametrize("name", ["gqa", "bias"])
def test_attention_in_the_tee_on_a_sharded_server(sharded, name, attention):
    """qkv's values gathered from the ranks' kv heads, o_proj summed over them: the logits stay transformers'."""
    path, reference, server = sharded(name)
    ids = token_ids(37, vocab=CONFIGS[name].get("vocab_size", 200), seed=37)
    with Client(server.endpoint, timeout_s=60, alive=server.exit_reason) as client:
        tee = tee_model(path, client.call, attention=attention)
        attach(tee)
        tee.ops.open_session(ids.shape[0])
        logits = torch.cat([tee.forward(ids[:30]), tee.forward(ids[30:31], pos=30), tee.forward(ids[31:], pos=31)])
        tee.ops.close_session()
    torch.testing.assert_close(logits, reference_logits(reference, ids), atol=ATOL, rtol=0)
    assert tee.ops.checker.checks["o_proj"] > 0 and max(tee.ops.checker.margin.values()) < 0.5


def test_init_reply_is_the_unsharded_servers(sharded):
    path, _, server = sharded("gqa")
    with Client(server.endpoint, timeout_s=30) as client:
        split = client.call("init").args
    alone = InProcess(Engine(str(path)))("init").args
    varying = ("instance", "compute_start", "compute_s", "fused")
    assert {k: v for k, v in split.items() if k not in varying} == {k: v for k, v in alone.items() if k not in varying}
    assert split["fused"] is False and alone["fused"] is True  # rank 0 alone holds a whole result: calls apart


@pytest.fixture(scope="module")
def unsharded_tokens(checkpoints):
    """Greedy tokens of two prompts from the unsharded engine, in process."""
    path = model(checkpoints, "gqa")
    engine = Engine(str(path))
    tokens = []
    for seed in (1, 2):
        tee = tee_model(path, InProcess(engine))
        attach(tee)
        tokens.append(generate(tee, token_ids(6, seed=seed).tolist(), NEW_TOKENS).generated_ids)
    return tokens


def sharded_tokens(path, endpoint: str, seed: int, start: threading.Barrier | None = None) -> list[int]:
    with Client(endpoint, timeout_s=60) as client:
        tee = tee_model(path, client.call)
        attach(tee)
        if start is not None:
            start.wait(timeout=60)
        return generate(tee, token_ids(6, seed=seed).tolist(), NEW_TOKENS).generated_ids


def test_greedy_generation_equals_the_unsharded_server(sharded, unsharded_tokens):
    path, _, server = sharded("gqa")
    assert sharded_tokens(path, server.endpoint, seed=1) == unsharded_tokens[0]


def test_two_clients_at_once(sharded, unsharded_tokens):
    path, _, server = sharded("gqa")
    results: list = [None, None]
    start = threading.Barrier(2)

    def worker(i: int) -> None:
        try:
            results[i] = sharded_tokens(path, server.endpoint, seed=i + 1, start=start)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[i] = exc
            start.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == unsharded_tokens


@pytest.mark.subprocess
def test_two_clients_share_products_on_a_sharded_server(checkpoints):
    """Batching and tensor parallelism together: two clients decode at once on a 2-rank server, whose ranks
    run their requests' rows as one product; each gets the tokens it gets alone on the unsharded engine."""
    path = model(checkpoints, "gqa")
    prompts = [token_ids(4 + i, seed=60 + i).tolist() for i in range(2)]
    alone, together, stats = decode_at_once(path, prompts, [24, 24], extra_args=RANKS)
    assert together == alone
    assert stats["batched"] > 0, "no request shared a product"
    assert sum(int(size) * n for size, n in stats["batch_sizes"].items() if int(size) > 1) == stats["batched"]


@pytest.mark.parametrize("name", ["bias", "qwen2", "gemma3"])
def test_private_mode_on_a_sharded_server(sharded, name, tmp_path):
    """masked_linear on the sharded float64 weights (biases, padded vocabulary; Qwen2's; Gemma 3's), then the
    sharded server as another server's helper: its pads (z W^T) assembled from both ranks."""
    path, reference, server = sharded(name)
    ids = token_ids(11, vocab=CONFIGS[name].get("vocab_size", 200), seed=11)
    expected = reference_logits(reference, ids)
    with Client(server.endpoint, timeout_s=60) as client:
        tee = tee_model(path, client.call, private=PrivateOptions(pads_dir=tmp_path / "pads"))
        attach(tee)
        tee.ops.open_session(ids.shape[0])
        logits = tee.forward(ids)
        tee.ops.close_session()
        tee.ops.close()
        torch.testing.assert_close(logits, expected, atol=PRIVATE_ATOL, rtol=0)
        helper = PrivateOptions(pads_dir=tmp_path / "none", helper=Synchronous(client.call))
        tee = tee_model(path, InProcess(Engine(str(path))), private=helper)
        attach(tee)
        tee.ops.open_session(ids.shape[0])
        logits = tee.forward(ids)
        tee.ops.close()
    torch.testing.assert_close(logits, expected, atol=PRIVATE_ATOL, rtol=0)
    assert not (tmp_path / "none").exists()  # every pad came from the sharded helper


# -- faults -----------------------------------------------------------------------------------------


def test_a_killed_rank_is_one_clear_client_error(checkpoints):
    path = model(checkpoints, "gqa")
    with ServerProcess(str(path), start_timeout_s=START_TIMEOUT_S, extra_args=RANKS) as server:
        (follower,) = followers(server.process.pid)
        command = [sys.executable, "-m", "tsqp", "generate", "--model", str(path), "--token-ids", "1,2,3"]
        command += ["--max-new-tokens", "400", "--connect", server.endpoint, "--timeout", "60"]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as client:
            printed = selectors.DefaultSelector()
            printed.register(client.stdout, selectors.EVENT_READ)
            assert printed.select(timeout=60), "the client printed no token within 60 s"  # it is generating now
            os.kill(follower, signal.SIGKILL)
            killed = time.monotonic()
            try:
                stdout, stderr = client.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                client.kill()
                pytest.fail("the client hung after a rank was killed")
            seconds = time.monotonic() - killed
        result = subprocess.CompletedProcess(command, client.returncode, stdout, stderr)
        assert_one_line_error(result, "tensor-parallel rank 1", "killed by SIGKILL")
        assert seconds < 15, f"the error came {seconds:.1f} s after the kill"
        assert server.process.wait(timeout=15) == 1
        assert "tensor-parallel rank 1" in server.exit_reason()


def test_the_other_ranks_exit_when_rank_0_dies(checkpoints):
    path = model(checkpoints, "mqa")
    with ServerProcess(str(path), start_timeout_s=START_TIMEOUT_S, extra_args=RANKS) as server:
        (follower,) = followers(server.process.pid)
        server.process.send_signal(signal.SIGKILL)
        assert wait_for(lambda: not alive(follower), timeout=20), "rank 1 outlived rank 0"


def test_a_split_that_cannot_be_is_one_line(checkpoints, tmp_path):
    result = run_tsqp("serve", "--model", model(checkpoints, "gqa"), "--tensor-parallel", "3", timeout=60)
    assert_one_line_error(result, "--tensor-parallel 3", "8 query heads")


# -- without processes ------------------------------------------------------------------------------


def test_shards_keep_gqa_groups_whole(checkpoints):
    def config(name):
        return ModelConfig.from_model_dir(model(checkpoints, name))

    gqa = shards(config("gqa"), 2)  # 8 heads, 2 kv heads: one group each
    assert [(s.heads, s.kv_heads) for s in gqa] == [(range(0, 4), range(0, 1)), (range(4, 8), range(1, 2))]
    mqa = shards(config("mqa"), 2)  # the one kv head on both ranks
    assert [(s.heads, s.kv_heads) for s in mqa] == [(range(0, 2), range(0, 1)), (range(2, 4), range(0, 1))]
    bias = shards(config("bias"), 2)
    assert [(s.vocab, s.vocab_rows) for s in bias] == [(range(0, 101), 101), (range(101, 201), 101)]
    assert bias[1].columns("qkv") == (4 * 16 + 2 * 2 * 16, [(32, 32), (64 + 16, 16), (64 + 32 + 16, 16)])
    for world, fragment in [(3, "query heads"), (16, "query heads")]:
        with pytest.raises(TsqpError, match=fragment):
            shards(config("gqa"), world)
    with pytest.raises(TsqpError, match="kv heads"):
        shards(ModelConfig(**{**config("mqa").__dict__, "num_heads": 6, "num_kv_heads": 3}), 2)


def test_each_rank_loads_only_its_share(checkpoints):
    """The two ranks' weights put together are the checkpoint's: q, k, v, gate, up by rows, o and down by
    columns, the embedding and LM head by padded vocabulary rows, row-split biases whole."""
    path = model(checkpoints, "bias")
    checkpoint = Checkpoint(path)
    full = dict(checkpoint.tensors(checkpoint.where))
    ranks = [Engine(str(path), ranks=Ranks(rank, 2)) for rank in (0, 1)]
    p = "model.layers.1."

    def joined(part, dim=0):
        return torch.cat([part(engine) for engine in ranks], dim)

    q = joined(lambda e: e.layers[1].qk[: len(e.shard.heads) * 16])
    k = joined(lambda e: e.layers[1].qk[len(e.shard.heads) * 16 :])
    torch.testing.assert_close(q, full[p + "self_attn.q_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(k, full[p + "self_attn.k_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(joined(lambda e: e.layers[1].v), full[p + "self_attn.v_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(joined(lambda e: e.layers[1].o, 1), full[p + "self_attn.o_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(joined(lambda e: e.layers[1].down, 1), full[p + "mlp.down_proj.weight"], rtol=0, atol=0)
    gate = joined(lambda e: e.layers[1].gate_up[:48])
    torch.testing.assert_close(gate, full[p + "mlp.gate_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(joined(lambda e: e.layers[1].qk_bias[:32]), full[p + "self_attn.q_proj.bias"])
    assert all(torch.equal(e.layers[1].down_bias, full[p + "mlp.down_proj.bias"]) for e in ranks)
    embed = joined(lambda e: e.embed)
    assert embed.shape == (202, 64) and not embed[201:].any()  # one zero row pads the last share
    torch.testing.assert_close(embed[:201], full["model.embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(joined(lambda e: e.head)[:201], full["lm_head.weight"], rtol=0, atol=0)
