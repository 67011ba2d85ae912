"""How many threads the TEE's forward pass runs on (`TeeModel.threads`).

Beside a server that computes on this host's CPU cores the TEE runs every step on one thread (a second
one spins between parallel regions on a core the server needs); beside a GPU server only the short steps
(`tuning.SHORT_STEP_ROWS`) do, and a long prefill has every thread.
"""

from __future__ import annotations

import pytest
import torch
from conftest import token_ids
from support import in_process

from tsqp.tuning import SHORT_STEP_ROWS


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def threads_seen(tee, T: int) -> set[int]:
    seen: list[int] = []
    real = tee.ops.gate_up
    tee.ops.gate_up = lambda layer, h: seen.append(torch.get_num_threads()) or real(layer, h)
    try:
        tee.ops.open_session(T)
        tee.forward(token_ids(T), 0)
        tee.ops.close_session()
    finally:
        tee.ops.gate_up = real
    assert torch.get_num_threads() == 2  # restored after the step
    return set(seen)


def test_one_thread_beside_a_cpu_server_and_for_short_steps_beside_a_gpu(tiny_model, two_threads):
    tee, engine = in_process(tiny_model)
    assert tee.shares_cores  # the in-process engine reports its device: cpu
    long = SHORT_STEP_ROWS + 10
    assert threads_seen(tee, long) == {1}
    assert threads_seen(tee, 4) == {1}
    real_init = engine.op_init

    def gpu_init(*args):  # the init reply of a server on a GPU
        info, tensors = real_init(*args)
        return {**info, "device": "cuda:0"}, tensors

    engine.op_init = gpu_init
    tee.attach()
    assert not tee.shares_cores
    assert threads_seen(tee, long) == {2}
    assert threads_seen(tee, 4) == {1}
