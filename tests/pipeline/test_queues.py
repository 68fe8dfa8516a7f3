"""The lease queue: bounds, leases, acknowledgement, re-queue on death, abort; and its waiting."""
from __future__ import annotations

import asyncio

import pytest

from peaknet_xtal.pipeline.queues import (
    AsyncLeaseQueue,
    EventLoopThread,
    LeaseQueue,
    LocalQueueClient,
)


def items(*keys: int) -> list[tuple[str, int]]:
    return [(f"k{k}", k) for k in keys]


def test_capacity_counts_leased_items_so_memory_stays_bounded():
    q = LeaseQueue(capacity=3)
    assert q.offer(items(1, 2, 3, 4)) == 3  # the fourth does not fit
    assert q.take("w", 2) == items(1, 2)
    assert q.space == 0  # leased items still count
    assert q.offer(items(4)) == 0
    assert q.ack(["k1"]) == 1
    assert q.offer(items(4)) == 1


def test_release_puts_unacked_leases_back_at_the_front_in_order():
    q = LeaseQueue(capacity=10)
    q.offer(items(1, 2, 3, 4))
    assert q.take("w0", 3) == items(1, 2, 3)
    q.ack(["k2"])
    assert q.release("w0") == 2
    assert q.take("w1", 10) == items(1, 3, 4)
    assert q.counts["requeued"] == 2


def test_duplicate_keys_are_dropped_while_held_and_ack_cancels_a_requeued_copy():
    q = LeaseQueue(capacity=10)
    q.offer(items(1))
    assert q.offer(items(1)) == 1 and q.counts["duplicates"] == 1 and q.depth == 1
    q.take("w0", 1)
    q.release("w0")  # back in the queue ...
    assert q.ack(["k1"]) == 1  # ... but the writer already had it: no reprocessing
    assert q.depth == 0 and q.in_flight == 0


def test_finished_needs_close_and_every_ack():
    q = LeaseQueue(capacity=10)
    q.offer(items(1, 2))
    q.close()
    assert q.offer(items(3)) == 0
    q.take("w", 2)
    assert not q.finished  # leased, not yet acknowledged
    q.ack(["k1", "k2"])
    assert q.finished


def test_abort_drops_pending_and_finishes_at_once():
    q = LeaseQueue(capacity=10)
    q.offer(items(1, 2, 3))
    q.take("w", 1)
    assert q.abort() == 2
    assert q.finished and q.take("w2", 5) == []
    assert q.release("w") == 1 and q.depth == 0  # nothing comes back after an abort


def test_bad_capacity():
    with pytest.raises(ValueError, match="capacity"):
        LeaseQueue(capacity=0)


def test_async_put_blocks_on_a_full_queue_until_a_lease_is_acked():
    async def scenario() -> list[str]:
        q = AsyncLeaseQueue(capacity=2)
        log: list[str] = []
        await q.put(items(1, 2))

        async def producer() -> None:
            await q.put(items(3))
            log.append("put3")

        task = asyncio.create_task(producer())
        await asyncio.sleep(0.05)
        log.append("still-blocked" if not task.done() else "not-blocked")
        got = await q.lease("w", 1)
        log.append(f"leased-{got[0][0]}")
        await asyncio.sleep(0.05)
        log.append("blocked-after-lease" if not task.done() else "unblocked-early")
        await q.ack(["k1"])
        await asyncio.wait_for(task, 1.0)
        return log

    assert asyncio.run(scenario()) == ["still-blocked", "leased-k1", "blocked-after-lease", "put3"]


def test_async_lease_times_out_empty_then_returns_none_when_finished():
    async def scenario() -> tuple:
        q = AsyncLeaseQueue(capacity=4)
        first = await q.lease("w", 2, timeout=0.05, report={"busy_fraction": 0.5})
        await q.put(items(1))
        second = await q.lease("w", 2, timeout=0.05)  # partial batch is fine
        await q.close()
        waiter = asyncio.create_task(q.lease("w2", 2))  # must wait: k1 is not acked yet
        await asyncio.sleep(0.05)
        pending = not waiter.done()
        await q.ack(["k1"])
        third = await asyncio.wait_for(waiter, 1.0)
        stats = await q.stats()
        return first, second, pending, third, stats

    first, second, pending, third, stats = asyncio.run(scenario())
    assert first == [] and second == items(1) and pending and third is None
    assert stats["reports"]["w"]["busy_fraction"] == 0.5 and stats["acked"] == 1


def test_put_returns_false_once_closed():
    runner = EventLoopThread()
    try:
        client = LocalQueueClient(AsyncLeaseQueue(capacity=1), runner)
        assert client.put(items(1))
        client.abort()
        assert client.put(items(2)) is False
        assert client.lease("w", 1) is None
    finally:
        runner.stop()
