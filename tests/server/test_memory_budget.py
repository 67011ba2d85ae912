"""The server's memory budget (server/budget.py): every allocation a message can size is checked before it is
made, refused in one line when it does not fit, and the server goes on.

The attack: a model whose config allows a million positions, so that small messages name huge results (an
lm_head of 40,000 rows, a 40,000-token attention square, a session of a million tokens, a pad of a million
rows, an 8 GB arena). A real `tsqp serve` runs under an address-space limit with --max-memory-mb, is fed a
bounded number of such messages by a raw client, and must answer each with a result or a plain error (never
an internal error: an allocation that failed), keep its peak RSS under the budget, and serve a valid client
afterwards.
"""

from __future__ import annotations

import os
import random
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zmq
from conftest import (
    assert_one_line_error,
    build_checkpoint,
    kill_process,
    run_tsqp,
    split_logits,
    token_ids,
    wait_for,
)

from tsqp.errors import TsqpError
from tsqp.server.budget import Budget, MemoryBudgetExceeded, resident_bytes
from tsqp.server.engine import Engine
from tsqp.tee.remote import InProcess
from tsqp.wire.arena import SHM_DIR, shm_available
from tsqp.wire.client import Client
from tsqp.wire.pad_seeds import SEED_BYTES
from tsqp.wire.protocol import Message, pack, unpack

BUDGET_MB = 768
ADDRESS_SPACE_GB = 3  # the server's RLIMIT_AS: a 915 MB VmPeak when idle, room for what the budget admits
MESSAGES = 80
MIB = 1 << 20
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, LAYERS = 64, 4, 2, 16, 128, 4096, 2


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    """A small model that admits a million positions: a message's sizes are bounded by the budget alone."""
    path, _ = build_checkpoint(
        tmp_path_factory.mktemp("long-model"),
        seed=4,
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        num_hidden_layers=LAYERS,
        max_position_embeddings=1 << 20,
    )
    return path


# -- in process ---------------------------------------------------------------------------------------


def test_reservations_add_up_and_are_released():
    budget = Budget(100 * MIB)
    budget.limit += budget.incoming  # 100 MiB beside the room kept for a message being received
    budget.count("caches", lambda: 30 * MIB)
    budget.reserve(50 * MIB, "a first product")
    with pytest.raises(MemoryBudgetExceeded, match=r"a second product needs 30.0 MiB.*20.0 MiB left"):
        budget.reserve(30 * MIB, "a second product")
    budget.release()
    budget.reserve(60 * MIB, "after the first is answered")
    assert budget.in_use() == budget.base + budget.incoming + 90 * MIB
    assert budget.incoming == 9 * (100 * MIB // 64)  # 9 message parts of at most 1/64 of the budget each


def test_hostile_sizes_are_refused_before_they_are_allocated_and_the_engine_goes_on(long_model):
    engine = Engine(str(long_model), max_memory_bytes=0)  # the default: a share of the host's memory
    engine.budget.limit = engine.budget.base + engine.budget.incoming + 64 * MIB
    peer = b"peer"

    def call(method, *tensors, **args):
        session = args.pop("session", None)
        return engine.handle(peer, Message({"method": method, "args": args, "session": session}, list(tensors)))

    # 75,000 x 4096 float32 logits twice (the kernel's output and the reply's), and the input again (a batch
    # concatenates its requests' rows)
    with pytest.raises(MemoryBudgetExceeded, match=r"lm_head needs 2362.1 MiB"):
        call("lm_head", torch.zeros(75_000, HIDDEN))
    with pytest.raises(MemoryBudgetExceeded, match="session's KV cache"):
        call("open_session", capacity=1 << 18)
    with pytest.raises(MemoryBudgetExceeded, match="matmul"):
        call("matmul", torch.zeros(HEADS, 4096, HEAD_DIM), torch.zeros(HEADS, HEAD_DIM, 4096))
    with pytest.raises(MemoryBudgetExceeded, match="pad"):
        call("pad", op="qkv", layer=0, seed=b"s" * SEED_BYTES, rows=1 << 17)
    with pytest.raises(MemoryBudgetExceeded, match="float64 weights"):
        engine.budget.limit = (
            engine.budget.base + engine.budget.incoming + 256 * 1024
        )  # less than the float64 copies of the weights
        call("init", private=True)
    engine.budget.limit = engine.budget.base + engine.budget.incoming + 64 * MIB
    session = call("open_session", capacity=30_000)[0]["session"]  # 7.3 MiB of cache, kept
    assert engine.budget.report()["kv_cache"] == LAYERS * KV_HEADS * HEAD_DIM * 30_000 * 8
    call("qkv", torch.zeros(8000, HIDDEN), layer=0, pos=0, session=session)
    with pytest.raises(MemoryBudgetExceeded, match="scores of 8000 tokens"):  # 4 x 8000^2 / 2 floats
        call("scores", torch.zeros(8000, HEADS, HEAD_DIM), torch.zeros(8000, KV_HEADS, HEAD_DIM), **_at(session))
    assert engine.budget.reserved == 0, "a refused request leaves nothing reserved"
    ids = token_ids(17, vocab=VOCAB)
    expected = split_logits(long_model, InProcess(Engine(str(long_model))), ids)
    torch.testing.assert_close(split_logits(long_model, InProcess(engine), ids), expected, rtol=0, atol=0)


def _at(session: bytes) -> dict:
    return {"layer": 0, "pos": 0, "tile": 64, "session": session}


def test_a_batch_is_checked_as_a_whole(long_model):
    """Two clients' lm_head rows, each within the budget alone, do not fit together: one is refused."""
    engine = Engine(str(long_model))
    rows = 5000  # 78 MiB of logits, twice, and 1.2 MiB of input each
    engine.budget.limit = engine.budget.base + engine.budget.incoming + 200 * MIB
    items = [
        (bytes([i]), Message({"method": "lm_head", "args": {}}, [torch.randn(rows, HIDDEN)]), None) for i in (1, 2)
    ]
    outcomes = engine.handle_batch(items)
    assert isinstance(outcomes[0], tuple) and isinstance(outcomes[1], MemoryBudgetExceeded)
    assert engine.budget.reserved == 0
    engine.budget.limit = engine.budget.base + engine.budget.incoming + 400 * MIB
    assert all(isinstance(o, tuple) for o in engine.handle_batch(items))


def test_a_private_servers_float64_weights_are_counted_once(long_model):
    """A private-only server makes its float64 weights at load: resident when the budget settles, and counted
    by their counter; in use must be what is resident (plus the room kept for a message), not twice them."""
    engine = Engine(str(long_model), private_only=True)
    budget, float64 = engine.budget, engine.masked.total
    assert float64 > 0
    resident = resident_bytes()
    assert budget.report()["float64_weights"] == float64
    assert budget.in_use() - budget.incoming <= resident, "the float64 weights were counted twice"
    assert budget.in_use() - budget.incoming >= resident - 64 * MIB


def test_a_model_over_the_budget_is_refused_at_start(long_model):
    with pytest.raises(TsqpError, match="over the server's memory budget of 1 MiB: raise --max-memory-mb"):
        Engine(str(long_model), max_memory_bytes=MIB)


# -- a real server, fuzzed from outside -----------------------------------------------------------------


def _limit_address_space() -> None:
    limit = ADDRESS_SPACE_GB << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


class Attacker:
    """A raw DEALER: one message, one reply, in lockstep."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.next_id = 0

    def call(self, method: str, tensors=(), session=None, **args) -> dict:
        self.next_id += 1
        header = {"id": self.next_id, "method": method, "session": session, "args": args}
        self.sock.send_multipart(pack(header, list(tensors)))
        assert self.sock.poll(60_000), f"no reply to {method}"
        return unpack(self.sock.recv_multipart()).header

    def close(self) -> None:
        self.sock.close()


def hostile_messages(attacker: Attacker, rng: random.Random, arenas: list[Path]):
    """(what, reply header) for MESSAGES messages, each sizing an allocation from a few bytes to many GB."""
    sessions: list[tuple[bytes, int]] = []
    for _ in range(MESSAGES):
        kind = rng.choice(["session", "lm_head", "matmul", "scores", "pad", "arena", "close"])
        if kind == "session":
            capacity = rng.choice([rng.randint(1, 4096), rng.randint(1, 1 << 20), 1 << 20])
            reply = attacker.call("open_session", capacity=capacity)
            if reply["ok"]:
                sessions.append((reply["args"]["session"], capacity))
        elif kind == "close" and sessions:
            session, _ = sessions.pop(rng.randrange(len(sessions)))
            reply = attacker.call("close_session", session=session)
        elif kind == "lm_head":
            rows = rng.choice([rng.randint(1, 2000), rng.randint(1, 40_000)])  # frames under frames_bound
            reply = attacker.call("lm_head", [torch.zeros(rows, HIDDEN)])
        elif kind == "matmul":
            T = rng.choice([rng.randint(1, 512), rng.randint(1, 40_000)])
            reply = attacker.call("matmul", [torch.zeros(HEADS, T, HEAD_DIM), torch.zeros(HEADS, HEAD_DIM, T)])
        elif kind == "scores" and sessions:
            session, capacity = rng.choice(sessions)
            T = rng.randint(1, min(capacity, 40_000))
            q, k = torch.zeros(T, HEADS, HEAD_DIM), torch.zeros(T, KV_HEADS, HEAD_DIM)
            reply = attacker.call("scores", [q, k], session=session, layer=0, pos=0, tile=rng.choice([64, 4096]))
        elif kind == "pad":
            rows = rng.choice([rng.randint(1, 1024), rng.randint(1, 1 << 20)])
            reply = attacker.call("pad", op="gate_up", layer=1, seed=os.urandom(SEED_BYTES), rows=rows)
        elif kind == "arena" and shm_available():
            size = rng.choice([16 * MIB, 256 * MIB, 2 << 30, 8 << 30])
            path = SHM_DIR / f"tsqp-budget-{os.getpid()}-{len(arenas)}"
            with open(path, "wb") as f:  # sparse: no page is touched
                f.truncate(size)
            arenas.append(path)
            reply = attacker.call("attach_arena", name=path.name, size=size)
        else:
            continue
        yield kind, reply


def test_a_fuzzed_server_under_an_address_space_limit_stays_in_its_budget(long_model, tmp_path):
    endpoint = f"ipc://{tmp_path}/budget.sock"
    command = [sys.executable, "-m", "tsqp", "serve", "--model", str(long_model), "--listen", endpoint]
    server = subprocess.Popen(
        [*command, "--max-memory-mb", str(BUDGET_MB)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_limit_address_space,
    )
    arenas: list[Path] = []
    attacker = None
    try:
        assert wait_for(lambda: Path(endpoint[6:]).exists() or server.poll() is not None, timeout=60)
        assert server.poll() is None, server.stderr.read()
        attacker = Attacker(endpoint)
        outcomes, refused = [], 0
        for kind, reply in hostile_messages(attacker, random.Random(27), arenas):
            assert server.poll() is None, f"the server died after a {kind} message"
            error = reply.get("error", "")
            assert reply["ok"] or "internal error" not in error, f"{kind}: {error}"
            refused += "memory budget" in error
            outcomes.append((kind, reply["ok"]))
        peak = _peak_rss(server.pid)
        accepted = sum(ok for _, ok in outcomes)
        print(
            f"\n{len(outcomes)} hostile messages: {accepted} served, {refused} refused by the budget; "
            f"server peak RSS {peak / MIB:.0f} MiB, budget {BUDGET_MB} MiB, address space {ADDRESS_SPACE_GB} GB"
        )
        assert refused >= 10 and accepted >= 10, outcomes
        assert peak <= BUDGET_MB * MIB, f"peak RSS {peak / MIB:.0f} MiB over the {BUDGET_MB} MiB budget"

        # a valid client is served afterwards, with the right logits
        ids = token_ids(23, vocab=VOCAB)
        with Client(endpoint, timeout_s=60) as client:
            got = split_logits(long_model, client.call, ids)
        expected = split_logits(long_model, InProcess(Engine(str(long_model))), ids)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert server.poll() is None
    finally:
        if attacker is not None:
            attacker.close()
        kill_process(server, timeout=20)
        for path in arenas:
            path.unlink(missing_ok=True)


def test_a_message_part_past_the_budgets_frame_bound_drops_only_that_peer(long_model, tmp_path):
    """ZeroMQ refuses a part larger than frames_bound before it allocates it: no reply, and the server lives."""
    endpoint = f"ipc://{tmp_path}/frames.sock"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tsqp",
            "serve",
            "--model",
            str(long_model),
            "--listen",
            endpoint,
            "--max-memory-mb",
            "400",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: Path(endpoint[6:]).exists() or server.poll() is not None, timeout=60)
        assert server.poll() is None, server.stderr.read()
        bound = Budget(400 * MIB).frames_bound()
        attacker = Attacker(endpoint)
        header = {"id": 1, "method": "echo", "session": None, "args": {}}
        attacker.sock.send_multipart(pack(header, [torch.zeros(bound // 4 + 1024, dtype=torch.float32)]))
        assert not attacker.sock.poll(1500), "a part over the bound got a reply"
        attacker.close()
        assert server.poll() is None
        with Client(endpoint, timeout_s=30) as client:
            assert client.call("ping")
    finally:
        kill_process(server, timeout=20)


def test_the_budget_flag_is_checked_and_a_server_that_cannot_load_in_it_says_so(long_model, tmp_path):
    result = run_tsqp("serve", "--model", long_model, "--max-memory-mb", "-5", timeout=60)
    assert_one_line_error(result, "--max-memory-mb")
    endpoint = f"ipc://{tmp_path}/small.sock"
    result = run_tsqp("serve", "--model", long_model, "--listen", endpoint, "--max-memory-mb", "50", timeout=60)
    assert_one_line_error(result, "over the server's memory budget of 50 MiB", "raise --max-memory-mb")
