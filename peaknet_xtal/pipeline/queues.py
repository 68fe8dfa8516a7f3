"""Bounded queues with leases: the back-pressure and the exactly-once bookkeeping of the pipeline.

Why leases: a model worker that dies mid-batch must not lose its frames, and a frame must not be
written twice.  A consumer therefore *leases* items (they stay counted against the capacity, held
by the queue) and the item is only forgotten when it is *acknowledged* (for the frame queue: when
the writer has the result).  If the lease holder dies, :meth:`LeaseQueue.release` puts its
un-acknowledged items back at the front.

Why a bound that counts leased items too: memory stays flat whatever the speed of the consumers;
a full queue makes the producer wait (back-pressure), it never grows.

Three layers, so that the logic is tested without Ray or threads:

- :class:`LeaseQueue`: the plain, non-blocking bookkeeping;
- :class:`AsyncLeaseQueue`: blocking ``put``/``lease`` on an :class:`asyncio.Condition` (no polling,
  no sleeps); this is what the Ray queue actor runs;
- :class:`LocalQueueClient`: a synchronous client of an :class:`AsyncLeaseQueue` running on an event
  loop thread, for the in-process (threaded) pipeline; :class:`..actors.RayQueueClient` is its Ray
  twin.  Both expose the same synchronous methods, which is all the worker and writer loops see.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

#: ``owner`` value for a lease that is not tracked (the item is simply handed over).
UNTRACKED: str | None = None


def item_key(item: Any) -> Hashable:
    """The identity of a queue item: ``Frame.key``, ``FrameResult.frame.key`` or ``item[0]``."""
    key = getattr(item, "key", None)
    if key is not None:
        return key
    frame = getattr(item, "frame", None)
    if frame is not None:
        return frame.key
    return item[0]


class LeaseQueue:
    """A bounded FIFO whose consumers lease items and acknowledge them when they are done.

    ``capacity`` bounds pending *plus* leased items.  Keys must be unique among the items the
    queue holds; an item offered under a key the queue already holds is dropped and counted as a
    duplicate (this is what collapses a re-processed frame whose first result is still queued).
    """

    def __init__(self, capacity: int = 3200, name: str = "queue") -> None:
        if capacity < 1:
            raise ValueError(f"queue capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.name = name
        self._pending: deque[tuple[Hashable, Any]] = deque()
        self._pending_keys: set[Hashable] = set()
        self._leases: dict[str, dict[Hashable, Any]] = {}
        self._owner: dict[Hashable, str] = {}
        self._reports: dict[str, dict[str, Any]] = {}
        self.closed = False
        self.aborted = False
        self.counts = {"put": 0, "leased": 0, "acked": 0, "requeued": 0, "duplicates": 0,
                       "dropped": 0}
        self.started = time.time()

    # -- state ---------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._owner)

    @property
    def space(self) -> int:
        return self.capacity - self.depth - self.in_flight

    @property
    def finished(self) -> bool:
        """No consumer will ever get another item: aborted, or closed and fully acknowledged."""
        return self.aborted or (self.closed and not self._pending and not self._owner)

    # -- producer side -------------------------------------------------------------------------
    def offer(self, items: Sequence[Any]) -> int:
        """Accept as many leading ``items`` as fit; returns how many were used (kept or dropped)."""
        if self.closed:
            return 0
        taken = 0
        for item in items:
            key = item_key(item)
            if key in self._pending_keys or key in self._owner:
                self.counts["duplicates"] += 1
                taken += 1
                continue
            if self.space <= 0:
                break
            self._pending.append((key, item))
            self._pending_keys.add(key)
            self.counts["put"] += 1
            taken += 1
        return taken

    def close(self) -> None:
        """No more items will be offered; consumers finish once everything is acknowledged."""
        self.closed = True

    def abort(self) -> int:
        """Stop now (Ctrl-C): drop what is pending, let leased items finish; returns # dropped."""
        dropped = len(self._pending)
        self._pending.clear()
        self._pending_keys.clear()
        self.counts["dropped"] += dropped
        self.closed = self.aborted = True
        return dropped

    # -- consumer side -------------------------------------------------------------------------
    def take(self, owner: str | None, n: int) -> list[Any]:
        """Lease up to ``n`` items to ``owner`` (hand them over untracked if ``owner`` is None)."""
        out: list[Any] = []
        while self._pending and len(out) < n:
            key, item = self._pending.popleft()
            self._pending_keys.discard(key)
            if owner is not None:
                self._leases.setdefault(owner, {})[key] = item
                self._owner[key] = owner
            out.append(item)
        self.counts["leased"] += len(out)
        return out

    def ack(self, keys: Iterable[Hashable]) -> int:
        """Forget these keys for good (done); also drops a re-queued copy still pending."""
        done = 0
        for key in keys:
            key = tuple(key) if isinstance(key, list) else key
            owner = self._owner.pop(key, None)
            if owner is not None:
                self._leases[owner].pop(key, None)
                done += 1
            elif key in self._pending_keys:
                self._pending_keys.discard(key)
                self._pending = deque(kv for kv in self._pending if kv[0] != key)
                done += 1
        self.counts["acked"] += done
        return done

    def release(self, owner: str) -> int:
        """Put every un-acknowledged item leased to ``owner`` back at the front (it died)."""
        held = self._leases.pop(owner, {})
        for key in reversed(list(held)):
            self._owner.pop(key, None)
            if not self.aborted:
                self._pending.appendleft((key, held[key]))
                self._pending_keys.add(key)
        self.counts["requeued"] += len(held) if not self.aborted else 0
        return len(held)

    def leased_to(self, owner: str) -> list[Hashable]:
        return list(self._leases.get(owner, {}))

    # -- monitoring ----------------------------------------------------------------------------
    def report(self, owner: str, stats: dict[str, Any]) -> None:
        """Remember the latest statistics a consumer sent along (busy time, pid, ...)."""
        self._reports[owner] = dict(stats)

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "capacity": self.capacity, "depth": self.depth,
                "in_flight": self.in_flight, "closed": self.closed, "aborted": self.aborted,
                "finished": self.finished, "time": time.time(), **self.counts,
                "reports": {k: dict(v) for k, v in self._reports.items()}}


class AsyncLeaseQueue:
    """:class:`LeaseQueue` with waiting: a full queue blocks ``put``, an empty one blocks ``lease``.

    Waiting is on an :class:`asyncio.Condition`, so a blocked caller costs nothing and wakes as soon
    as the state changes (the reference implementation polled every shard with sleeps).
    """

    def __init__(self, capacity: int = 3200, name: str = "queue") -> None:
        self.core = LeaseQueue(capacity, name)
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # created lazily, inside the running loop
            self._cond = asyncio.Condition()
        return self._cond

    async def put(self, items: Sequence[Any], timeout: float | None = None) -> bool:
        """Block until every item is accepted; False if the queue closed (or ``timeout`` passed)."""
        remaining = list(items)
        cond = self._condition()
        deadline = None if timeout is None else time.monotonic() + timeout
        async with cond:
            while remaining:
                if self.core.closed:
                    return False
                taken = self.core.offer(remaining)
                if taken:
                    remaining = remaining[taken:]
                    cond.notify_all()
                    continue
                if not await self._wait(cond, deadline):
                    return False
        return True

    async def lease(self, owner: str | None, n: int, timeout: float | None = None,
                    report: dict[str, Any] | None = None) -> list[Any] | None:
        """Up to ``n`` items (a partial batch is fine); ``[]`` on timeout; ``None`` if finished."""
        cond = self._condition()
        deadline = None if timeout is None else time.monotonic() + timeout
        async with cond:
            if report is not None and owner is not None:
                self.core.report(owner, report)
            while True:
                items = self.core.take(owner, n)
                if items:
                    cond.notify_all()
                    return items
                if self.core.finished:
                    return None
                if not await self._wait(cond, deadline):
                    return []

    @staticmethod
    async def _wait(cond: asyncio.Condition, deadline: float | None) -> bool:
        if deadline is None:
            await cond.wait()
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            await asyncio.wait_for(cond.wait(), left)
        except TimeoutError:
            return False
        return True

    async def _mutate(self, fn: Any, *args: Any) -> Any:
        cond = self._condition()
        async with cond:
            out = fn(*args)
            cond.notify_all()
            return out

    async def ack(self, keys: Sequence[Hashable]) -> int:
        return await self._mutate(self.core.ack, keys)

    async def release(self, owner: str) -> int:
        return await self._mutate(self.core.release, owner)

    async def close(self) -> None:
        await self._mutate(self.core.close)

    async def abort(self) -> int:
        return await self._mutate(self.core.abort)

    async def report(self, owner: str, stats: dict[str, Any]) -> None:
        await self._mutate(self.core.report, owner, stats)

    async def stats(self) -> dict[str, Any]:
        return self.core.stats()


class EventLoopThread:
    """A private asyncio loop on a daemon thread, hosting in-process :class:`AsyncLeaseQueue` s."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="peaknet-queues",
                                        daemon=True)
        self._thread.start()

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class LocalQueueClient:
    """Synchronous handle on an :class:`AsyncLeaseQueue` living on an :class:`EventLoopThread`."""

    def __init__(self, queue: AsyncLeaseQueue, runner: EventLoopThread) -> None:
        self.queue = queue
        self.runner = runner

    def put(self, items: Sequence[Any], timeout: float | None = None) -> bool:
        return self.runner.call(self.queue.put(items, timeout))

    def lease(self, owner: str | None, n: int, timeout: float | None = None,
              report: dict[str, Any] | None = None) -> list[Any] | None:
        return self.runner.call(self.queue.lease(owner, n, timeout, report))

    def ack(self, keys: Sequence[Hashable]) -> int:
        return self.runner.call(self.queue.ack(list(keys)))

    def release(self, owner: str) -> int:
        return self.runner.call(self.queue.release(owner))

    def close(self) -> None:
        self.runner.call(self.queue.close())

    def abort(self) -> int:
        return self.runner.call(self.queue.abort())

    def report(self, owner: str, stats: dict[str, Any]) -> None:
        self.runner.call(self.queue.report(owner, stats))

    def stats(self) -> dict[str, Any]:
        return self.runner.call(self.queue.stats())
