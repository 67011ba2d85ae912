"""Where a server computes (cores.py), how a client waits for a doorbell reply (waiting.py), and the arena's
views made once (arena.py).

A client polls for its reply only where the server computes apart from its cores (the server says where
it computes when it attaches the arena); on cores both share it sleeps, as before. The user's
TSQP_DOORBELL_SPIN_MS wins over either.
"""

from __future__ import annotations

import os

import pytest
import torch

from tsqp.errors import ProtocolError
from tsqp.tee.launcher import ServerProcess
from tsqp.wire import cores, doorbell
from tsqp.wire.arena import SHM_DIR, VIEWS_KEPT, Arena
from tsqp.wire.client import Client
from tsqp.wire.waiting import OWN_CORES_SPIN_S, DoorbellWait

CPUS = sorted(os.sched_getaffinity(0))


@pytest.fixture
def fresh_env(monkeypatch):
    monkeypatch.delenv("TSQP_DOORBELL_SPIN_MS", raising=False)
    monkeypatch.delenv("TSQP_DOORBELL_NAP", raising=False)


HERE = cores.host_id()


@pytest.mark.parametrize(
    ("server", "is_apart"),
    [
        ({"device": "cuda:0"}, True),  # a GPU, whatever it says of cores
        ({"device": "cpu", "compute_cores": []}, True),  # names no CPU
        ({"device": "cpu", "compute_cores": [2, 3], "host": HERE}, True),  # CPUs this process may not run on
        ({"device": "cpu", "compute_cores": [0, 1], "host": "another host"}, HERE is not None),
        ({"device": "cpu", "compute_cores": [1], "host": HERE}, False),  # one of this process's CPUs
        ({"device": "cpu", "compute_cores": [0, 1, 2]}, False),
        ({"device": "cpu"}, False),  # an older server names none: it shares them, for all the TEE knows
        ({"compute_cores": "all"}, False),
        ({"compute_cores": [True]}, False),
    ],
)
def test_a_server_computes_apart_only_on_a_gpu_another_host_or_other_cpus(monkeypatch, server, is_apart):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cores.apart(server) is is_apart


def test_a_client_polls_without_a_nap_only_where_the_server_computes_apart(fresh_env, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    wait = DoorbellWait()
    assert (wait.spin_s, wait.nap) == (0.0, True), "before the server says anything: no poll"
    wait.adapt({"compute_cores": [2, 3], "host": HERE})
    assert (wait.spin_s, wait.nap) == (OWN_CORES_SPIN_S, False)
    wait.adapt({"compute_cores": [0], "host": HERE})  # the server behind a new connection shares its cores
    assert (wait.spin_s, wait.nap) == (0.0, True)


def test_the_users_spin_wins_over_the_servers_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("TSQP_DOORBELL_SPIN_MS", "0")
    monkeypatch.setenv("TSQP_DOORBELL_NAP", "1")
    wait = DoorbellWait()
    wait.adapt({"compute_cores": [2, 3]})
    assert (wait.spin_s, wait.nap) == (0.0, True)
    monkeypatch.setenv("TSQP_DOORBELL_SPIN_MS", "3")
    wait = DoorbellWait()
    wait.adapt({"compute_cores": [0]})
    assert wait.spin_s == 0.003


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("waiting-tiny", seed=5)


@pytest.mark.skipif(
    not (SHM_DIR.is_dir() and doorbell.supported() and len(CPUS) >= 2), reason="needs /dev/shm, x86-64, two CPUs"
)
@pytest.mark.parametrize("apart", [True, False])
def test_the_server_names_its_cores_and_a_client_apart_from_them_polls(model, fresh_env, apart):
    """A real server whose main thread is moved to the last CPU, the client's to the others (apart), or both
    left on every CPU: the attach reply names the server's CPUs, the client polls only when apart, and its
    calls are answered in the slot either way."""
    mine = os.sched_getaffinity(0)
    with ServerProcess(str(model)) as server:
        try:
            if apart:
                os.sched_setaffinity(server.process.pid, {CPUS[-1]})
                os.sched_setaffinity(0, set(CPUS[:-1]))
            with Client(server.endpoint, shm=True, timeout_s=30) as client:
                for _ in range(200):
                    assert client.call("ping").header["ok"] is True
                polls = client.waiter.spin_s == OWN_CORES_SPIN_S and not client.waiter.nap
                assert polls is apart
                info = client.call("init").args  # the TEE's checks and pipeline read the same description
                assert info["compute_cores"] == ([CPUS[-1]] if apart else CPUS) and info["host"] == cores.host_id()
                assert cores.apart(info) is apart
                assert client.doorbell_requests > 0 and client.waiter.replies > 0
        finally:
            os.sched_setaffinity(0, mine)


def test_an_arena_hands_out_one_view_per_dtype_shape_and_offset():
    arena = Arena.create(size=1 << 20)
    try:
        a = arena.view(torch.float32, [2, 3], 4096)
        assert arena.view(torch.float32, (2, 3), 4096) is a, "a list and a tuple of the same shape"
        others = [arena.view(torch.float32, (3, 2), 4096), arena.view(torch.int64, (2, 3), 4096)]
        others.append(arena.view(torch.float32, (2, 3), 8192))
        assert all(o is not a for o in others)
        a.copy_(torch.arange(6.0).view(2, 3))
        assert arena.view(torch.float32, (6,), 4096).tolist() == list(range(6)), "views of the same bytes"
        with pytest.raises(ProtocolError):
            arena.view(torch.float32, (1 << 20,), 0)
        with pytest.raises(ProtocolError):
            arena.view(torch.float32, (2, 3), 100)
        for i in range(VIEWS_KEPT):
            arena.view(torch.uint8, (1,), 256 * i)
        assert len(arena.views) <= VIEWS_KEPT, "the views kept are bounded"
        assert arena.view(torch.float32, [2, 3], 4096) is not a, "made again after the views were let go"
    finally:
        arena.unlink()
    assert not arena.views
