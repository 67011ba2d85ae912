"""Server-side sessions over a real server subprocess: several TEE clients at once, isolation between
them, and the session lifetime (close, idle timeout, memory cap).

Every client is its own `client.Client` with its own ZeroMQ socket, as separate TEE processes are.
"""

from __future__ import annotations

import secrets
import threading
import time
from contextlib import suppress

import pytest
import torch
from conftest import token_ids

from tsqp.errors import ServerError
from tsqp.tee.compose import tee_model
from tsqp.tee.generate import generate
from tsqp.tee.launcher import ServerProcess
from tsqp.tee.sampling import SamplingOptions
from tsqp.wire.client import Client

NEW_TOKENS = 24
UNKNOWN = "unknown or expired session"


@pytest.fixture(scope="module")
def server(tiny_model):
    with ServerProcess(str(tiny_model), start_timeout_s=60) as process:
        yield process


class TeeClient:
    """One TEE process's worth of state: a socket client and a TeeModel on it."""

    def __init__(self, model_dir, endpoint: str):
        self.client = Client(endpoint, timeout_s=30)
        self.tee = tee_model(model_dir, self.client.call, self.client.stats)
        self.tee.attach()

    def close(self) -> None:
        self.client.close()


def jobs(n: int) -> list[tuple[list[int], SamplingOptions]]:
    """Distinct prompts; half greedy, half sampled with their own seed."""
    return [
        (
            token_ids(5 + i, seed=40 + i).tolist(),
            SamplingOptions() if i % 2 == 0 else SamplingOptions(temperature=0.8, top_p=0.9, seed=i),
        )
        for i in range(n)
    ]


def run_sequentially(model_dir, endpoint, work) -> list[list[int]]:
    client = TeeClient(model_dir, endpoint)
    try:
        return [generate(client.tee, prompt, NEW_TOKENS, options).generated_ids for prompt, options in work]
    finally:
        client.close()


def run_concurrently(model_dir, endpoint, work) -> tuple[list[list[int]], list[list[float]]]:
    """One thread and one socket per job, all starting together; returns tokens and token arrival times."""
    results: list = [None] * len(work)
    arrivals: list[list[float]] = [[] for _ in work]
    errors: list[BaseException] = []
    start = threading.Barrier(len(work))

    def worker(i: int) -> None:
        try:
            client = TeeClient(model_dir, endpoint)
            try:
                prompt, options = work[i]
                start.wait(timeout=30)
                results[i] = generate(
                    client.tee,
                    prompt,
                    NEW_TOKENS,
                    options,
                    on_token=lambda token: arrivals[i].append(time.perf_counter()),
                ).generated_ids
            finally:
                client.close()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return results, arrivals


@pytest.mark.parametrize("clients", [2, 4])
def test_concurrent_clients_get_their_sequential_tokens(server, tiny_model, clients):
    work = jobs(clients)
    sequential = run_sequentially(tiny_model, server.endpoint, work)
    concurrent, arrivals = run_concurrently(tiny_model, server.endpoint, work)
    assert concurrent == sequential
    assert all(len(tokens) == NEW_TOKENS for tokens in concurrent)
    # Requests interleave by round trip: every client has its first token before any client has its last.
    assert max(times[0] for times in arrivals) < min(times[-1] for times in arrivals)


def test_a_client_cannot_use_another_clients_session(server, tiny_model):
    owner, intruder = TeeClient(tiny_model, server.endpoint), TeeClient(tiny_model, server.endpoint)
    try:
        owner.tee.ops.open_session(16)
        stolen = owner.tee.ops.session
        config = owner.tee.config
        hidden = torch.randn(1, config.hidden_size)
        # Extend it (qkv writes the cache), read it (attn_out multiplies by the cached values), free it.
        for method, args, tensors in [
            ("qkv", {"layer": 0, "pos": 0}, [hidden]),
            ("attn_out", {"layer": 0, "pos": 0, "tile": 1}, [torch.ones(config.num_heads)]),
            ("gate_up", {"layer": 0}, [hidden]),
            ("close_session", {}, []),
        ]:
            with pytest.raises(ServerError, match=UNKNOWN):
                intruder.client.call(method, args, tensors, session=stolen)
        with pytest.raises(ServerError, match=UNKNOWN):  # a guessed id fares no better
            intruder.client.call("qkv", {"layer": 0, "pos": 0}, [hidden], session=secrets.token_bytes(16))
        # The owner's session survived the attempts and still computes.
        logits = owner.tee.forward(torch.tensor([3, 4, 5]), 0, last_only=True)
        assert logits.shape == (1, config.vocab_size) and torch.isfinite(logits).all()
        owner.tee.ops.close_session()
    finally:
        owner.close()
        intruder.close()


# -- lifetime: a server with a 1 MiB KV cache cap and a short idle timeout ---------------------------

IDLE_TIMEOUT_S = 0.6
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 8 * 4  # keys+values, 2 layers, 2 kv heads, head_dim 8, float32
BIG = 3 * (1 << 20) // (4 * KV_BYTES_PER_TOKEN)  # 3/4 MiB: one fits under the cap, two do not


@pytest.fixture(scope="module")
def long_model(checkpoints):
    return checkpoints("sessions-long", seed=7, num_key_value_heads=2, max_position_embeddings=8192)


@pytest.fixture(scope="module")
def strict_server(long_model):
    extra = ["--max-cache-mb", "1", "--idle-timeout", str(IDLE_TIMEOUT_S)]
    with ServerProcess(str(long_model), start_timeout_s=60, extra_args=extra) as process:
        yield process


@pytest.fixture
def pair(strict_server, long_model):
    a, b = TeeClient(long_model, strict_server.endpoint), TeeClient(long_model, strict_server.endpoint)
    assert a.tee.config.num_kv_heads * a.tee.config.head_dim * 2 * a.tee.config.num_layers * 4 == KV_BYTES_PER_TOKEN
    yield a, b
    for client in (a, b):
        with suppress(ServerError):  # a test may leave an expired session behind
            client.tee.ops.close_session()
        client.close()


def test_memory_cap_refuses_clearly_and_a_closed_session_frees_its_share(pair):
    a, b = pair
    with pytest.raises(ServerError, match="KV cache memory cap reached"):
        a.tee.ops.open_session(2 * BIG)  # alone larger than the cap
    a.tee.ops.open_session(BIG)
    with pytest.raises(ServerError, match="KV cache memory cap reached: a .*-token session needs"):
        b.tee.ops.open_session(BIG)
    with pytest.raises(ServerError, match="KV cache memory cap reached"):
        generate(b.tee, [1, 2, 3], BIG)  # generate reports the refusal as it is
    a.tee.ops.close_session()
    b.tee.ops.open_session(BIG)  # the closed session's memory is free again
    b.tee.ops.close_session()


def test_a_closed_session_is_refused(pair):
    a, _ = pair
    a.tee.ops.open_session(8)
    session = a.tee.ops.session
    a.tee.ops.close_session()
    with pytest.raises(ServerError, match=UNKNOWN):
        a.client.call("qkv", {"layer": 0, "pos": 0}, [torch.randn(1, a.tee.config.hidden_size)], session=session)


def test_an_idle_session_expires_and_frees_its_memory(pair):
    a, b = pair
    a.tee.ops.open_session(BIG)
    with pytest.raises(ServerError, match="memory cap"):
        b.tee.ops.open_session(BIG)
    time.sleep(IDLE_TIMEOUT_S + 0.5)  # the server expires idle sessions between requests
    b.tee.ops.open_session(BIG)  # a's memory came back without a's help
    with pytest.raises(ServerError, match=UNKNOWN):
        a.tee.forward(torch.tensor([1, 2]), 0)
    b.tee.ops.close_session()


def test_a_session_in_use_does_not_expire(pair):
    a, _ = pair
    result = generate(a.tee, [1, 2, 3], 12)  # each round trip renews the session
    assert len(result.generated_ids) == 12
    a.tee.ops.open_session(8)
    for pos in range(4):
        time.sleep(IDLE_TIMEOUT_S / 3)
        a.tee.forward(torch.tensor([pos + 1]), pos)
    a.tee.ops.close_session()


def test_a_decode_step_moves_one_token_and_one_row_of_scores(server, tiny_model):
    """Attention on the server: scores, attn_out, gate_up and down_qkv a layer (fused: down with the next
    layer's qkv), plus embedding, layer 0's qkv, the last down and lm_head; the bytes grow only by the
    scores/probs row."""
    client = TeeClient(tiny_model, server.endpoint)
    try:
        c = client.tee.config
        short = generate(client.tee, token_ids(10, seed=1).tolist(), 9)
        long = generate(client.tee, token_ids(100, seed=1).tolist(), 9)
    finally:
        client.close()
    for result in (short, long):
        assert result.decode_rpc_calls == result.decode_tokens * (4 * c.num_layers + 3)
    # Each step of the long run sees 90 more keys: one more row entry per head of scores out and probs in.
    row_growth = 90 * c.num_heads * 4 * 2 * c.num_layers * long.decode_tokens
    assert long.decode_bytes - short.decode_bytes == pytest.approx(row_growth, rel=0.02)
    prefill_scores = c.num_layers * c.num_heads * 100 * 101 // 2 * 4
    assert long.decode_bytes / long.decode_tokens < prefill_scores / 4  # nothing of size prompt^2 per step
