"""`python -m tsqp ...` end to end: logits and bench outputs, and one clear line for every user error."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from conftest import (
    assert_one_line_error,
    free_port,
    reference_logits,
    rewrite_config,
    run_tsqp,
    token_ids,
)

from tsqp.tee.launcher import ServerProcess

REQUIRED_BENCH_KEYS = {"tokens", "prefill_s", "tokens_per_s", "rpc_calls", "bytes_sent", "bytes_received"}


@pytest.fixture(scope="module")
def shared_endpoint(tiny_model):
    """One running `tsqp serve` (tcp) for the client-side error tests."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=60):
        yield endpoint


def ids_arg(ids: torch.Tensor) -> str:
    return ",".join(str(int(i)) for i in ids)


# -- outputs ------------------------------------------------------------------------------------------


def test_logits_writes_float32_equal_to_transformers(tiny_model, tiny_reference, tmp_path):
    ids = token_ids(31, seed=31)
    out = tmp_path / "logits.npy"
    result = run_tsqp("logits", "--model", tiny_model, "--token-ids", ids_arg(ids), "--out", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    logits = np.load(out)
    assert logits.dtype == np.float32
    assert logits.shape == (31, 200)
    torch.testing.assert_close(torch.from_numpy(logits), reference_logits(tiny_reference, ids), atol=1e-4, rtol=0)


def test_logits_over_connect(tiny_model, tiny_reference, tmp_path, shared_endpoint):
    """--connect to a running `tsqp serve` (tcp), instead of a private server."""
    ids = token_ids(9, seed=9)
    out = tmp_path / "logits.npy"
    result = run_tsqp(
        "logits",
        "--model",
        tiny_model,
        "--token-ids",
        ids_arg(ids),
        "--out",
        out,
        "--connect",
        shared_endpoint,
        "--timeout",
        "30",
    )
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.from_numpy(np.load(out)), reference_logits(tiny_reference, ids), atol=1e-4, rtol=0)


def test_llama_model_path_is_the_model_default(tiny_model, tiny_reference, tmp_path):
    ids = token_ids(5, seed=5)
    out = tmp_path / "env.npy"
    result = run_tsqp("logits", "--token-ids", ids_arg(ids), "--out", out, env={"LLAMA_MODEL_PATH": str(tiny_model)})
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.from_numpy(np.load(out)), reference_logits(tiny_reference, ids), atol=1e-4, rtol=0)


def test_no_model_given(tmp_path):
    result = run_tsqp("logits", "--token-ids", "1,2", "--out", tmp_path / "x.npy")
    assert_one_line_error(result, "LLAMA_MODEL_PATH")


def test_diagnose_sizes_past_the_message_bound_fail_before_any_server_starts(tiny_model):
    result = run_tsqp("diagnose", "--model", tiny_model, "--sizes", "8,8192")
    assert_one_line_error(result, "--sizes entry must be below 4096 MB")
    assert "tsqp server:" not in result.stderr  # refused before a server was started


def test_bench_json(tiny_model, tmp_path):
    path = tmp_path / "bench.json"
    result = run_tsqp("bench", "--model", tiny_model, "--tokens", "20", "--json", path)
    assert result.returncode == 0, result.stderr
    figures = json.loads(path.read_text())
    assert REQUIRED_BENCH_KEYS <= set(figures)
    layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    assert figures["tokens"] == 20
    # embedding, qkv of layer 0, one fused call a layer, lm_head: `--attention auto` attends a prompt of up to
    # 128 tokens in the TEE
    assert figures["rpc_calls"] == layers + 3 and figures["attention"] == "decode" and figures["fused"] is True
    assert figures["prefill_s"] > 0
    assert figures["tokens_per_s"] == pytest.approx(20 / figures["prefill_s"])
    assert figures["bytes_sent"] > 20 * 32 * 4 and figures["bytes_received"] > 20 * 200 * 4


def test_bench_defaults_to_the_tiny_preset_in_tsqp_cache(tmp_path):
    cache = tmp_path / "cache"
    path = tmp_path / "bench.json"
    result = run_tsqp("bench", "--tokens", "8", "--json", path, env={"TSQP_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    assert (cache / "presets" / "tiny" / "config.json").is_file()
    assert json.loads(path.read_text())["rpc_calls"] == 2 + 3  # tiny: 2 layers, one fused call each


# -- one clear line for each user error ----------------------------------------------------------------


def _missing(tmp_path, model):
    return tmp_path / "does-not-exist"


def _no_config(tmp_path, model):
    folder = tmp_path / "no-config"
    shutil.copytree(model, folder)
    (folder / "config.json").unlink()
    return folder


def _corrupt_config(tmp_path, model):
    folder = tmp_path / "corrupt-config"
    shutil.copytree(model, folder)
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    return folder


def _garbage_safetensors(tmp_path, model):
    folder = tmp_path / "garbage-weights"
    shutil.copytree(model, folder)
    (folder / "model.safetensors").write_bytes(os.urandom(256))
    return folder


def _truncated_safetensors(tmp_path, model):
    folder = tmp_path / "truncated-weights"
    shutil.copytree(model, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def _no_weights(tmp_path, model):
    folder = tmp_path / "no-weights"
    shutil.copytree(model, folder)
    (folder / "model.safetensors").unlink()
    return folder


def _gpt2(tmp_path, model):
    folder = tmp_path / "gpt2"
    shutil.copytree(model, folder)

    def edit(raw):
        raw["model_type"] = "gpt2"
        raw["architectures"] = ["GPT2LMHeadModel"]

    rewrite_config(folder, edit)
    return folder


BAD_MODELS = {
    "missing folder": (_missing, "does not exist"),
    "no config.json": (_no_config, "config.json"),
    "corrupt config.json": (_corrupt_config, "not valid JSON"),
    "garbage safetensors": (_garbage_safetensors, "model.safetensors"),
    "truncated safetensors": (_truncated_safetensors, "model.safetensors"),
    "no weights": (_no_weights, "model.safetensors"),
    "gpt2": (_gpt2, "unsupported architecture"),
}


@pytest.mark.parametrize("command", ["logits --connect", "serve"])
@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_model_folder(tiny_model, tmp_path, case, command, shared_endpoint):
    """The TEE reading its own folder (logits --connect) and the server reading its folder (serve)."""
    make, fragment = BAD_MODELS[case]
    folder = make(tmp_path, tiny_model)
    if command == "serve":
        args = ["serve", "--model", folder, "--listen", f"tcp://127.0.0.1:{free_port()}"]
    else:
        args = [
            "logits",
            "--model",
            folder,
            "--token-ids",
            "1,2,3",
            "--out",
            tmp_path / "x.npy",
            "--connect",
            shared_endpoint,
            "--timeout",
            "30",
        ]
    result = run_tsqp(*args, timeout=90)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("case", ["missing folder", "gpt2", "truncated safetensors"])
def test_bad_model_folder_with_private_server(tiny_model, tmp_path, case):
    """Without --connect the private server meets the bad folder first; its reason reaches the user."""
    make, fragment = BAD_MODELS[case]
    folder = make(tmp_path, tiny_model)
    result = run_tsqp(
        "logits",
        "--model",
        folder,
        "--token-ids",
        "1,2,3",
        "--out",
        tmp_path / "x.npy",
        "--start-timeout",
        "60",
        timeout=90,
    )
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize(
    "token_ids_text,fragment",
    [
        ("1,2,200", "token id 200 is out of range"),
        ("5,-1", "token id -1 is out of range"),
        ("1,two,3", "--token-ids"),
        (",", "--token-ids is empty"),
    ],
)
def test_bad_token_ids(tiny_model, tmp_path, token_ids_text, fragment, shared_endpoint):
    result = run_tsqp(
        "logits",
        "--model",
        tiny_model,
        f"--token-ids={token_ids_text}",
        "--out",
        tmp_path / "x.npy",
        "--connect",
        shared_endpoint,
        "--timeout",
        "30",
    )
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "x.npy").exists()


def test_unreachable_ipc_endpoint(tiny_model, tmp_path):
    start = time.monotonic()
    result = run_tsqp(
        "logits",
        "--model",
        tiny_model,
        "--token-ids",
        "1,2",
        "--out",
        tmp_path / "x.npy",
        "--connect",
        "ipc:///nonexistent/x.sock",
        timeout=60,
    )
    assert_one_line_error(result, "ipc:///nonexistent/x.sock")
    assert time.monotonic() - start < 30


def test_unreachable_tcp_endpoint(tiny_model, tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    result = run_tsqp(
        "logits",
        "--model",
        tiny_model,
        "--token-ids",
        "1,2",
        "--out",
        tmp_path / "x.npy",
        "--connect",
        endpoint,
        "--timeout",
        "3",
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert_one_line_error(result, endpoint, "3 s")
    assert elapsed < 30


def test_bad_endpoint_scheme(tiny_model, tmp_path):
    result = run_tsqp(
        "logits",
        "--model",
        tiny_model,
        "--token-ids",
        "1,2",
        "--out",
        tmp_path / "x.npy",
        "--connect",
        "http://127.0.0.1:80",
    )
    assert_one_line_error(result, "ipc://", "tcp://")


def test_different_model_on_the_server(other_model, tmp_path, shared_endpoint):
    result = run_tsqp(
        "logits",
        "--model",
        other_model,
        "--token-ids",
        "1,2",
        "--out",
        tmp_path / "x.npy",
        "--connect",
        shared_endpoint,
        "--timeout",
        "30",
    )
    assert_one_line_error(result, "different model")


def test_bench_needs_a_positive_token_count(tiny_model):
    result = run_tsqp("bench", "--model", tiny_model, "--tokens", "0")
    assert_one_line_error(result, "--tokens")
