"""The round order of the server (tsqp/server/scheduler.py): per-client queues, each client's requests in
its own order, groups in the arrival order of their first request, a batch key's heads together, a held
group left queued for a later round."""

from __future__ import annotations

from tsqp.server.scheduler import Pending, Scheduler

QKV, GATE = ("qkv", 0, None), ("gate_up", 0, None)


def queued(scheduler: Scheduler, *requests: tuple[bytes, tuple | None]) -> list[Pending]:
    items = []
    for peer, key in requests:
        item = Pending(peer, b"", [])
        item.key = key
        scheduler.add(item)
        items.append(item)
    return items


def names(groups: list[list[Pending]], items: list[Pending]) -> list[list[int]]:
    return [[items.index(item) for item in group] for group in groups]


def test_a_batch_keys_queue_heads_run_together_in_arrival_order():
    scheduler = Scheduler(hold_s=0)
    items = queued(scheduler, (b"a", QKV), (b"b", QKV), (b"a", GATE), (b"c", GATE), (b"b", GATE), (b"c", None))
    groups = list(scheduler.round())
    # a's qkv with b's; then a's gate_up, joined by c's and b's heads; c's last one alone
    assert names(groups, items) == [[0, 1], [2, 3, 4], [5]]
    assert not scheduler.waiting() and scheduler.queues == {}


def test_a_client_never_runs_two_requests_in_one_group():
    scheduler = Scheduler(hold_s=0)
    items = queued(scheduler, (b"a", QKV), (b"a", QKV), (b"b", QKV))
    assert names(list(scheduler.round()), items) == [[0, 2], [1]]


def test_a_held_group_stays_queued_and_the_others_run():
    scheduler = Scheduler(hold_s=10.0)
    now = 0.0
    for key in (QKV, GATE):  # b was last answered qkv, and gate_up followed it before: b is on its way
        scheduler.rendezvous.answered(b"b", key, now)
    scheduler.rendezvous.answered(b"b", QKV, 1e18)  # recent for any perf_counter
    items = queued(scheduler, (b"a", GATE), (b"a", None), (b"c", None))
    assert names(list(scheduler.round()), items) == [[2]]  # a holds its gate_up, and its request after it waits
    assert scheduler.waiting() == {b"a"} and items[0].held_until > 0
    assert scheduler.hold_deadline() == items[0].held_until
    items[0].held_until = 1e-9  # the hold ran out: the next round runs a's requests in order
    assert names(list(scheduler.round()), items) == [[0], [1]]
