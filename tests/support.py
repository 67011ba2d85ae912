"""What several test modules share beyond conftest's fixtures: the config features the split must match
transformers on, an attached in-process model and a link that counts its calls, several clients decoding at
once on a real server, and a running `tsqp api`."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import torch
from conftest import ORIGINAL_CACHE

from tsqp.server.engine import Engine
from tsqp.tee.compose import tee_model
from tsqp.tee.forward import TeeModel
from tsqp.tee.generate import generate
from tsqp.tee.launcher import ServerProcess
from tsqp.tee.remote import InProcess
from tsqp.wire.client import Client

LISTENING = re.compile(r"tsqp api: (https?://\S+)/v1 serves")

FEATURES: dict[str, dict] = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16),  # q_dim 64 != hidden 32
    "rope_theta": dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "rope_llama3": dict(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    ),
    "rope_linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "rms_norm_eps": dict(rms_norm_eps=0.05),
    "tied": dict(tie_word_embeddings=True),
    "attention_bias": dict(attention_bias=True),
    "mlp_bias": dict(mlp_bias=True),
}


# The other families' tiny models (conftest.build_checkpoint(family=...)): tied and untied, GQA and MQA,
# Qwen2's biases, and windows of 8 or 16 keys so that prompts of a few dozen tokens run past them.
GEMMA3_ROPES = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
    "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
}
FAMILY_MODELS: dict[str, dict] = {
    "mistral-window-gqa": dict(family="mistral", num_key_value_heads=2, sliding_window=8),
    "mistral-tied-mqa": dict(family="mistral", num_key_value_heads=1, sliding_window=None, tie_word_embeddings=True),
    "qwen2-gqa": dict(family="qwen2", num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2-tied-mqa": dict(family="qwen2", num_key_value_heads=1, tie_word_embeddings=True),
    "qwen2-window": dict(
        family="qwen2", num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=1
    ),
    "qwen3-gqa": dict(family="qwen3", num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
    "qwen3-tied-mqa-bias": dict(
        family="qwen3", num_key_value_heads=1, head_dim=8, attention_bias=True, tie_word_embeddings=True
    ),
    "gemma3-gqa": dict(
        family="gemma3",
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters=GEMMA3_ROPES,
        final_logit_softcapping=50.0,
    ),
    "gemma3-mqa": dict(
        family="gemma3",
        num_key_value_heads=1,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=16,
        layer_types=["full_attention", "sliding_attention"],
        rope_parameters=GEMMA3_ROPES,
    ),
}


@torch.inference_mode()
def transformers_greedy(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """transformers' generate, greedy, exactly new_tokens tokens (min_new_tokens holds eos off)."""
    out = model.generate(
        prompt[None],
        attention_mask=torch.ones_like(prompt)[None],
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
    )
    return out[0, prompt.shape[0] :].tolist()


class Counting(InProcess):
    """An in-process link that keeps each request's method, in order."""

    def __init__(self, engine: Engine):
        super().__init__(engine)
        self.methods: list[str] = []

    def __call__(self, method, *args, **kwargs):
        self.methods.append(method)
        return super().__call__(method, *args, **kwargs)


def in_process(model_dir) -> tuple[TeeModel, Engine]:
    engine = Engine(str(model_dir))
    tee = tee_model(model_dir, InProcess(engine))
    tee.attach()
    return tee, engine


def decode_at_once(model, prompts: list[list[int]], lengths: list[int], extra_args=()) -> tuple[list, list, dict]:
    """Each prompt greedily alone (in process), then all at once by client threads on one real server
    (sockets, arenas); (the solo tokens, the concurrent ones, the server's ping after them)."""
    engine = Engine(str(model))
    solo_tee = tee_model(model, InProcess(engine))
    solo_tee.attach()
    alone = [generate(solo_tee, p, n).generated_ids for p, n in zip(prompts, lengths, strict=True)]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    with ServerProcess(str(model), extra_args=list(extra_args)) as server:
        barrier = threading.Barrier(len(prompts))

        def run(i: int) -> None:
            try:
                with Client(server.endpoint, timeout_s=60) as client:
                    tee = tee_model(model, client)
                    tee.attach()
                    barrier.wait(timeout=60)
                    results[i] = generate(tee, prompts[i], lengths[i]).generated_ids
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors
        with Client(server.endpoint, timeout_s=30) as probe:
            stats = probe.call("ping").args
    return alone, [results[i] for i in range(len(prompts))], stats


@contextmanager
def api_process(*args: str, timeout: float = 120, entry: tuple[str, ...] = ("-m", "tsqp")):
    """Starts `tsqp api ARGS --port 0`, yields (base url, Popen) once it listens; stops it on exit.
    entry: what python runs in place of `-m tsqp` (a script that hands the command test-only parts)."""
    command = [sys.executable, "-X", "faulthandler", *map(str, entry), "api", "--port", "0", *map(str, args)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    url = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            if match := LISTENING.search(line):
                url = match.group(1)
                break
        assert url, "tsqp api did not start:\n" + "".join(lines)
        threading.Thread(target=lambda: [lines.append(x) for x in process.stderr], daemon=True).start()
        yield url, process, lines
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def real_model(preset: str):
    """(converted folder, GGUF file) of a real model preset, fetched into the caller's cache (`.ci/run`'s,
    where the README's first command already fetched SmolLM2), not the per-session one: once per machine."""
    from tsqp.model.fetch import fetched_gguf
    from tsqp.model.sources import resolve_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TSQP_CACHE", ORIGINAL_CACHE)
        return resolve_model(preset), fetched_gguf(preset)
