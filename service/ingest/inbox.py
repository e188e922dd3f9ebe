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

One bad row never costs the others: when the database refuses a batch for its data (a value
it cannot store, a constraint), every delivery of it is stored alone; one refused even alone
is stored `dead` with the database's error as its reason, without the columns derived from
its body; one refused even so fails with `DeliveryRefused` (the receiver answers 400). Only
a failure of the connection itself reaches every waiter (the receiver answers 503).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Coroutine

import asyncpg
import structlog

from service import store
from service.ingest.wakeups import Waker
from service.store import NewDelivery

log = structlog.get_logger(__name__)

# SQLSTATE classes that belong to the data of a row, not to the connection or the server:
# 22 data exception (a NUL, an out-of-range value), 23 integrity constraint violation,
# 54 program limit exceeded (an index entry too large).
_DATA_SQLSTATE_CLASSES = ("22", "23", "54")


def is_data_error(exc: BaseException) -> bool:
    """Whether `exc` is the database (or asyncpg's encoder) refusing a value."""
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "") or "")[:2] in _DATA_SQLSTATE_CLASSES
    # asyncpg's client-side "invalid input for query argument" is an InterfaceError that is
    # also a ValueError; a dropped connection is never a ValueError.
    return isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError)


class DeliveryRefused(Exception):
    """The database refused a delivery even alone and reduced to a dead row."""


@dataclasses.dataclass(frozen=True, slots=True)
class Receipt:
    """A delivery's outcome: its seq (None when stored before, store.FORGOTTEN when its buddy
    was erased and nothing was stored) and the status it was stored with (its own, or `dead`
    when the database refused its row)."""

    seq: store.Stored
    status: str
    reason: str | None


class Inbox:
    def __init__(
        self, pool: store.Pool, waker: Waker, *, max_batch: int = 256, max_inflight: int = 1
    ) -> None:
        self._pool = pool
        self._waker = waker
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._pending: deque[tuple[store.NewDelivery, asyncio.Future[Receipt]]] = deque()
        self._inflight = 0
        self._tasks: set[asyncio.Task[object]] = set()

    async def store(self, delivery: store.NewDelivery) -> Receipt:
        """Durably store one delivery.

        Raises `DeliveryRefused`, or what the connection raised (the caller answers 503).
        """
        future: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
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
                    outcomes = await self._insert(batch)
                except Exception as exc:  # the connection failed: every waiter answers 503
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                shards = set()
                for (delivery, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                        continue
                    future.set_result(outcome)
                    if isinstance(outcome.seq, int) and outcome.status == "accepted":
                        shards.add(delivery.shard)
                if shards:
                    # Not awaited by the requests: Hatched's answer never waits on Redis.
                    self._spawn(self._waker.wake_many(sorted(shards)))
        finally:
            self._inflight -= 1

    async def _insert(
        self, batch: list[tuple[NewDelivery, asyncio.Future[Receipt]]]
    ) -> list[Receipt | BaseException]:
        deliveries = [d for d, _ in batch]
        try:
            seqs = await store.insert_deliveries(self._pool, deliveries)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            log.warning("inbox_batch_refused", size=len(batch), error=_short(exc))
            return [await self._insert_alone(d) for d in deliveries]
        return [Receipt(seq, d.status, d.reason) for d, seq in zip(deliveries, seqs, strict=True)]

    async def _insert_alone(self, delivery: NewDelivery) -> Receipt | BaseException:
        """One delivery in its own statement; dead with the error when its row is refused.
        A connection failure is raised (and fails the rest of the batch with it)."""
        try:
            seq = (await store.insert_deliveries(self._pool, [delivery]))[0]
            return Receipt(seq, delivery.status, delivery.reason)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            error = _short(exc)
        # Keep what replay needs (id, raw headers and body); drop what was derived from them.
        dead = dataclasses.replace(
            delivery,
            event_type=None,
            event_id=None,
            buddy_id=None,
            shard=0,
            occurred_at=None,
            event_data=None,
            event_parser=None,
            status="dead",
            reason=f"store_refused: {error}",
        )
        log.warning("delivery_store_refused", error=error)
        try:
            seq = (await store.insert_deliveries(self._pool, [dead]))[0]
        except Exception as exc:
            if not is_data_error(exc):
                raise
            return DeliveryRefused(f"the database refuses this delivery: {_short(exc)}")
        return Receipt(seq, dead.status, dead.reason)

    async def close(self) -> None:
        # A flush finishing now may still spawn its wake-up: wait until nothing is left.
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _short(exc: BaseException) -> str:
    # Postgres quotes no value in these messages, but a message may still be long.
    return f"{type(exc).__name__}: {exc}"[:300]
