"""The shared-memory arena and the causal query-tile packing: same logits as the zmq path and transformers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import reference_logits, token_ids, wait_for

from tsqp.stats import Stats
from tsqp.tee.compose import tee_model
from tsqp.tee.launcher import ServerProcess
from tsqp.wire.arena import SHM_DIR, Arena, sweep_stale
from tsqp.wire.client import Client
from tsqp.wire.protocol import query_tiles

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs /dev/shm")


@pytest.fixture(scope="module")
def gqa_model(checkpoints):
    return checkpoints("shm-gqa", seed=5, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def server(gqa_model):
    with ServerProcess(str(gqa_model)) as process:
        yield process


def run_split(
    model_dir, endpoint, shm: bool, ids, tile: int, chunks: list[int], verify: bool = True, pipeline: str = "off"
):
    """Logits of ids fed in the given chunk lengths, and the client's counters."""
    stats = Stats()
    with Client(endpoint, stats=stats, shm=shm) as client:
        tee = tee_model(model_dir, client, stats, verify=verify, pipeline=pipeline)
        tee.attach()
        tee.ops.attention.tile, tee.ops.attention.min_chunk_scores = tile, 0
        tee.ops.open_session(ids.shape[0])
        logits, pos = [], 0
        for length in chunks:
            logits.append(tee.forward(ids[pos : pos + length], pos=pos))
            pos += length
        tee.ops.close_session()
        arena_path = client.arena.path if client.arena is not None else None
    return torch.cat(logits), stats, arena_path


@pytest.mark.parametrize("pipeline", ["off", "on"])
@pytest.mark.parametrize("tile, chunks", [(64, [300]), (7, [300]), (16, [100, 1, 199]), (512, [37])])
def test_shm_equals_zmq_and_transformers(checkpoints, gqa_model, server, tile, chunks, pipeline):
    ids = token_ids(sum(chunks), seed=tile)
    expected = reference_logits(checkpoints.reference("shm-gqa"), ids)
    over_shm, shm_stats, arena_path = run_split(gqa_model, server.endpoint, True, ids, tile, chunks, pipeline=pipeline)
    over_zmq, zmq_stats, _ = run_split(gqa_model, server.endpoint, False, ids, tile, chunks, pipeline=pipeline)
    torch.testing.assert_close(over_shm, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(over_shm, over_zmq, atol=1e-5, rtol=0)  # BLAS may block differently by alignment
    # The same tensors cross either way; only the carrier differs.
    assert shm_stats.rpc_calls == zmq_stats.rpc_calls
    assert abs(shm_stats.bytes_received - zmq_stats.bytes_received) < 0.01 * zmq_stats.bytes_received
    assert arena_path is not None and not arena_path.exists(), "the client removes its arena file on close"


def test_query_tiles_cover_exactly_the_causal_rows():
    heads, T, pos, tile = 3, 45, 10, 8
    tiles, total = query_tiles(T, pos, heads, tile)
    assert [t.row for t in tiles] == list(range(0, T, tile))
    assert sum(t.rows for t in tiles) == T
    offset = 0
    for t in tiles:
        assert t.offset == offset
        assert t.keys == pos + t.row + t.rows  # every earlier key and the tile's own, nothing later
        offset += heads * t.rows * t.keys
    assert total == offset
    square = heads * T * (pos + T)
    exact_triangle = heads * sum(pos + i + 1 for i in range(T))
    assert exact_triangle <= total < square


def test_triangle_halves_the_attention_bytes(gqa_model, server):
    """Scores and probabilities cross as causal tiles: about half the bytes of the full square."""
    T, tile = 256, 16
    ids = token_ids(T, seed=3)
    _, stats, _ = run_split(gqa_model, server.endpoint, False, ids, tile, [T], verify=False)
    heads, layers = 4, 2
    _, packed = query_tiles(T, 0, heads, tile)
    square = heads * T * T
    assert packed < 0.6 * square
    # Received: per layer the packed scores plus the small per-token results; sent: the packed probabilities.
    assert stats.bytes_received >= layers * packed * 4
    assert stats.bytes_received < layers * square * 4


def test_stale_arena_of_a_dead_process_is_swept():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = SHM_DIR / f"tsqp-arena-{int(dead.stdout)}-deadbeef"
    stale.write_bytes(b"\0" * 4096)
    mine = Arena.create()
    try:
        sweep_stale()
        assert not stale.exists()
        assert mine.path.exists(), "a live process's arena stays"
    finally:
        mine.unlink()
        stale.unlink(missing_ok=True)


def test_arena_views_are_bounds_checked():
    arena = Arena.create(size=1 << 16)
    try:
        assert arena.view(torch.float32, [16], 256).shape == (16,)
        for offset, shape in [(1 << 16, [1]), (0, [1 << 15]), (3, [1]), (-256, [1])]:
            with pytest.raises(Exception, match="arena"):
                arena.view(torch.float32, shape, offset)
    finally:
        arena.unlink()


def test_interrupted_client_removes_its_arena():
    """Ctrl-C during a run: the private server stops and the arena file goes.

    The test waits for this client's own arena (its pid is in the name): in a full run another process's
    arena could appear first, and a SIGINT sent while the client still imports is not a run's Ctrl-C."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tsqp",
            "bench",
            "--preset",
            "tiny",
            "--tokens",
            "64",
            "--decode",
            "4000",
            "--transport",
            "shm",
            "--no-verify",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as at a terminal, however this test runner was started: a runner started in the background
        # by a shell without job control ignores SIGINT, its children inherit that, and Python then never
        # raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    own = f"tsqp-arena-{process.pid}-*"
    try:
        assert wait_for(lambda: list(SHM_DIR.glob(own)), timeout=60), "no arena appeared"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130, process.stderr.read()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
    assert not list(SHM_DIR.glob(own))
    assert os.path.isdir(SHM_DIR)
