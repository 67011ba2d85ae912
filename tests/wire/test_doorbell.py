"""The arena's doorbell: lone small requests and their replies through shared memory instead of ZeroMQ.

The slot protocol on its own, then a real server: calls go by the doorbell and give the same results,
a reply goes by ZeroMQ when the client has stopped polling, and hostile bytes on either side are
refused without taking the other down.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
import types

import msgpack
import pytest
import torch
from conftest import reference_logits, run_tsqp, token_ids, wait_for

from tsqp.errors import ProtocolError
from tsqp.tee.compose import tee_model
from tsqp.tee.launcher import ServerProcess
from tsqp.wire import doorbell
from tsqp.wire.arena import SHM_DIR
from tsqp.wire.client import Client
from tsqp.wire.doorbell import CONTROL_BYTES, REPLY_LENGTH, REQUEST_LENGTH, SLOT_BYTES, Doorbell
from tsqp.wire.transport import private_endpoint
from tsqp.wire.waiting import DoorbellWait

pytestmark = pytest.mark.skipif(
    not (SHM_DIR.is_dir() and doorbell.supported()), reason="needs /dev/shm and an x86-64 processor"
)


@pytest.fixture
def block():
    with mmap.mmap(-1, CONTROL_BYTES) as buffer:
        yield buffer


def test_a_rung_request_is_taken_once_and_answered_with_its_flag(block):
    client, server = Doorbell(block), Doorbell(block)
    assert server.take() is None
    flag = client.ring(b"request header")
    assert server.take() == (flag, b"request header")
    assert server.take() is None, "a request is new once"
    assert client.reply(flag) is None
    server.answer(flag, b"reply header")
    assert client.reply(flag) == b"reply header"
    assert client.reply(flag % 255 + 1) is None


def test_flags_cycle_without_zero_and_a_ring_clears_the_old_reply(block):
    client, server = Doorbell(block), Doorbell(block)
    seen = []
    for i in range(600):
        flag = client.ring(b"r%d" % i)
        taken = server.take()
        assert taken == (flag, b"r%d" % i)
        seen.append(flag)
        server.answer(flag, b"a%d" % i)
    assert set(seen) == set(range(1, 256))
    client.ring(b"next")
    assert client.reply(seen[-1]) is None, "the previous reply cannot pass for the next one's"


def test_a_new_mapping_does_not_replay_the_last_request(block):
    Doorbell(block).ring(b"old")
    assert Doorbell(block).take() is None  # e.g. the server attaching the grown arena


def test_hostile_lengths_are_bounded(block):
    client, server = Doorbell(block), Doorbell(block)
    flag = client.ring(b"x")
    struct.pack_into("<I", block, REQUEST_LENGTH, 2**32 - 1)
    assert len(server.take()[1]) == SLOT_BYTES
    server.answer(flag, b"y")
    struct.pack_into("<I", block, REPLY_LENGTH, 2**31)
    assert len(client.reply(flag)) == SLOT_BYTES


# -- through a real server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("doorbell-gqa", seed=11, num_key_value_heads=2)


@pytest.fixture(scope="module")
def server(model):
    with ServerProcess(str(model)) as process:
        yield process


def rung_within(client: Client, pings: int) -> bool:
    for _ in range(pings):
        assert client.call("ping").header["ok"] is True
        if client.doorbell_requests:
            return True
    return False


def test_calls_go_by_the_doorbell_and_give_the_same_logits(checkpoints, model, server):
    ids = token_ids(40, seed=8)
    with Client(server.endpoint, shm=True, timeout_s=30) as client:
        assert client.call("ping").header["ok"] is True
        assert client.doorbell is not None
        # the server polls for SERVER_SPIN_S after each request: a ping right after another finds it awake
        # (on a loaded machine not every time, so a few tries)
        assert rung_within(client, 2000), "no ping went by the doorbell"
        tee = tee_model(model, client)
        tee.attach()
        tee.ops.open_session(40)
        logits = tee.forward(ids)
    torch.testing.assert_close(logits, reference_logits(checkpoints.reference("doorbell-gqa"), ids), atol=1e-4, rtol=0)


def test_a_client_that_stopped_polling_gets_its_reply_by_zeromq(server):
    with Client(server.endpoint, shm=True, timeout_s=30) as client:
        client.waiter.zmq_spin_s = 0.0  # gives up polling at once: the server must notice
        client.waiter.futex = False  # as in an enclave: it sleeps on ZeroMQ, not on the wake word
        assert rung_within(client, 2000)
        for _ in range(100):
            assert client.call("ping").header["ok"] is True
        assert client.doorbell_requests > client.waiter.replies, "no rung request was answered by ZeroMQ"


@pytest.mark.skipif(not doorbell.futex_usable(), reason="needs Linux futexes outside an enclave")
def test_a_client_asleep_on_the_wake_word_gets_its_reply_in_the_slot(server, monkeypatch):
    monkeypatch.setenv("TSQP_DOORBELL_SPIN_MS", "0")  # sleeps at once: only the server's wake ends it
    with Client(server.endpoint, shm=True, timeout_s=30) as client:
        assert client.waiter.spin_s == 0.0, "read when the client is made"
        assert rung_within(client, 2000)
        replies, start = client.waiter.replies, client.doorbell_requests
        for _ in range(100):
            assert client.call("ping").header["ok"] is True
        rung = client.doorbell_requests - start
        assert rung > 0 and client.waiter.replies - replies == rung, "a rung request was answered by ZeroMQ"


@pytest.mark.skipif(not doorbell.futex_usable(), reason="needs Linux futexes outside an enclave")
def test_a_client_napping_until_its_reply_is_due_is_woken_by_an_early_reply(server, monkeypatch):
    monkeypatch.setenv("TSQP_DOORBELL_NAP", "1")
    with Client(server.endpoint, shm=True, timeout_s=30) as client:
        assert client.waiter.nap, "read when the client is made"
        client.waiter.slice_s = 5.0  # naps and sleeps of 5 s unless woken
        assert rung_within(client, 2000)
        assert 0 < client.waiter.reply_due["ping"] < 1.0, "the client learns when a ping's reply is due"
        rung, slow = client.doorbell_requests, 0
        for _ in range(20):
            client.waiter.reply_due["ping"] = 5.0  # as if pings took 5 s: it naps (a slice at a time) unless woken
            started = time.perf_counter()
            assert client.call("ping").header["ok"] is True
            slow += time.perf_counter() - started > 2.5
        assert client.doorbell_requests > rung, "no ping went by the doorbell"
        assert slow == 0, "a nap outlasted its reply: the server's wake did not end it"
        assert client.waiter.reply_due["ping"] < 5.0


def test_a_nap_lasts_at_most_a_sleepers_slice(block):
    bell = Doorbell(block)
    if not bell.word:
        pytest.skip("no futex here")
    flag = bell.ring(b"nobody answers")
    waiter = DoorbellWait()
    waiter.reply_due["qkv"] = 60.0  # a prefill's qkv took a minute
    request = types.SimpleNamespace(method="qkv", sent_at=time.perf_counter(), bell=bell, flag=flag)
    started = time.perf_counter()
    waiter._nap(request)
    assert time.perf_counter() - started < 1.0, "the nap outlasted a sleeper's slice: a dead server is noticed late"


def test_the_wake_word_wakes_a_sleeper_and_a_late_sleeper_does_not_wait(block):
    client, server = Doorbell(block), Doorbell(block)
    if not client.word:
        pytest.skip("no futex here")
    seq = client.wake_seq()
    server.wake()
    started = time.perf_counter()
    client.sleep(seq, 5.0)  # the word moved on before the wait: the kernel returns at once
    assert time.perf_counter() - started < 1.0
    seq = client.wake_seq()
    waker = threading.Timer(0.2, server.wake)
    waker.start()
    started = time.perf_counter()
    client.sleep(seq, 10.0)
    waker.join()
    assert 0.1 < time.perf_counter() - started < 5.0, "woken by the wake, not by the timeout"
    started = time.perf_counter()
    client.sleep(client.wake_seq(), 0.3)  # nobody wakes it: the timeout does
    assert time.perf_counter() - started >= 0.25


def test_a_zmq_client_never_rings(server):
    with Client(server.endpoint, shm=False, timeout_s=30) as client:
        for _ in range(10):
            client.call("ping")
        assert client.doorbell is None and client.doorbell_requests == 0


def test_garbage_rung_into_the_doorbell_gets_an_error_and_the_server_serves_on(server):
    with Client(server.endpoint, shm=True, timeout_s=30) as client:
        client.call("ping")
        bell = client.doorbell
        hostile = {"v": 1, "id": 10**9, "method": "echo", "tensors": [["float32", [4], 10**12]]}
        attach = {"v": 1, "id": 10**9, "method": "attach_arena", "args": {"name": "tsqp-x", "size": 1}, "tensors": []}
        for junk in (b"\xc1\xc1\xc1", msgpack.packb(hostile), msgpack.packb(attach), b""):
            bell.waiting(True)  # so the server answers in the slot, where the test reads it
            flag = bell.ring(junk)  # taken at the server's next look, awake or not
            assert wait_for(lambda flag=flag: bell.reply(flag) is not None, timeout=10), junk
            bell.waiting(False)
            error = msgpack.unpackb(bell.reply(flag))
            assert error["ok"] is False and error["error"], error
            assert client.call("ping").header["ok"] is True
        assert server.process.poll() is None


LIAR = """
import sys
from tsqp.server import loop as module
from tsqp.wire.doorbell import Doorbell
from tsqp.server.engine import Engine
import msgpack

class Liar(Doorbell):
    def answer(self, flag, header):
        if MODE == "garbage":
            header = b"\\xc1 not msgpack"
        else:
            fields = msgpack.unpackb(header)
            fields["id"] += 1
            header = msgpack.packb(fields)
        super().answer(flag, header)

MODE = sys.argv[3]
module.Doorbell = Liar
module.Server(Engine(sys.argv[1]), sys.argv[2]).serve_forever()
"""


@pytest.mark.parametrize("mode, message", [("garbage", "not valid msgpack"), ("other-id", "answers request")])
def test_a_lying_doorbell_reply_is_refused(model, mode, message):
    endpoint = private_endpoint()
    liar = subprocess.Popen([sys.executable, "-c", textwrap.dedent(LIAR), str(model), endpoint, mode])
    try:
        path = endpoint[len("ipc://") :]
        assert wait_for(lambda: os.path.exists(path), timeout=60)
        with Client(endpoint, shm=True, timeout_s=10) as client:
            with pytest.raises(ProtocolError, match=message):
                for _ in range(2000):  # the first calls go by ZeroMQ, until the server polls its doorbell
                    client.call("ping")
    finally:
        liar.terminate()
        liar.wait(timeout=10)


@pytest.mark.parametrize("flag, rung", [("--doorbell", True), ("--no-doorbell", False)])
def test_diagnose_reports_the_doorbell_and_zeromq_round_trips(tmp_path, flag, rung):
    report = tmp_path / "diagnose.json"
    result = run_tsqp("diagnose", flag, "--rounds", "200", "--sizes", "1", "--json", report)
    assert result.returncode == 0, result.stderr
    figures = json.loads(report.read_text())
    assert figures["transport"] == "shm" and figures["ping_by_doorbell"] is rung
    assert figures["ping_median_us"] > 0
    assert ("zmq_ping_median_us" in figures) is rung
    assert ("doorbell" in result.stdout) is rung


def test_a_discarded_request_answered_in_the_slot_is_dropped_at_the_next_submit(server):
    """An interrupted wait leaves a rung request whose reply lands in the slot, where no ZeroMQ reply will
    come to free it: the next submit drops it, so the client is back to nothing in flight."""
    with Client(server.endpoint, shm=True, timeout_s=30) as client:
        assert rung_within(client, 2000)
        for _ in range(2000):
            client.doorbell.waiting(True)  # as if the client were polling when it was interrupted
            request_id = client.submit("ping")
            request = client.in_flight[request_id]
            if request.flag:
                break
            client.doorbell.waiting(False)
            client.wait(request_id)
        assert request.flag, "no ping was rung"
        assert wait_for(lambda: request.bell.reply(request.flag) is not None, timeout=10)
        request.bell.waiting(False)
        client.discard(request_id)
        assert request_id in client.in_flight, "its reply is in the slot: nothing by ZeroMQ will free it"
        assert client.call("ping").header["ok"] is True
        assert client.in_flight == {} and client.placement.regions.live == {}
