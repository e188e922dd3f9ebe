"""Group commit for the receiver: concurrent requests share one INSERT and one Redis trip.

A request's delivery joins the pending list and waits for its flush. Up to `max_inflight`
flushes run at once, each taking everything pending (up to `max_batch`): under light load a
delivery is flushed alone at once; under heavy load hundreds share a transaction, which is what
keeps the receiver at or above a bare one-INSERT-per-request endpoint while it also wakes the
workers. Nothing is answered before its flush committed.

One flush in flight (the default) is classic group commit: while a commit waits for its WAL
flush, the next batch gathers. Measured at 1,000 deliveries/s (bench/BENCHMARKS.md), four
flushes in flight split the same traffic into four times as many statements and wake-ups and
doubled the receiver's CPU per delivery, which is what pushed the ack p99 past 50 ms; one
flush also gave more closed-loop throughput.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine

from service import store
from service.ingest.wakeups import Waker


class Inbox:
    def __init__(
        self, pool: store.Pool, waker: Waker, *, max_batch: int = 256, max_inflight: int = 1
    ) -> None:
        self._pool = pool
        self._waker = waker
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._pending: deque[tuple[store.NewDelivery, asyncio.Future[store.Stored]]] = deque()
        self._inflight = 0
        self._tasks: set[asyncio.Task[object]] = set()

    async def store(self, delivery: store.NewDelivery) -> store.Stored:
        """Durably store one delivery; its seq, None when the delivery id was stored before,
        or store.FORGOTTEN when its buddy was erased (then nothing was stored).

        Raises what the database raised (the caller answers 503).
        """
        future: asyncio.Future[store.Stored] = asyncio.get_running_loop().create_future()
        self._pending.append((delivery, future))
        if self._inflight < self._max_inflight:
            self._spawn(self._flush())
        return await future

    def _spawn(self, coro: Coroutine[object, object, object]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        self._inflight += 1
        try:
            while self._pending:
                batch = [
                    self._pending.popleft() for _ in range(min(self._max_batch, len(self._pending)))
                ]
                try:
                    seqs = await store.insert_deliveries(self._pool, [d for d, _ in batch])
                except Exception as exc:  # every waiter answers 503 with it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                shards = set()
                for (delivery, future), seq in zip(batch, seqs, strict=True):
                    if not future.done():
                        future.set_result(seq)
                    if isinstance(seq, int) and delivery.status == "accepted":
                        shards.add(delivery.shard)
                if shards:
                    # Not awaited by the requests: Hatched's answer never waits on Redis.
                    self._spawn(self._waker.wake_many(sorted(shards)))
        finally:
            self._inflight -= 1

    async def close(self) -> None:
        # A flush finishing now may still spawn its wake-up: wait until nothing is left.
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
