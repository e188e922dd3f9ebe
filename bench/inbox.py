"""Filling the inbox directly, the way the receiver would have stored each delivery, and
waking the worker the way the receiver does (service.queue.Waker)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.load import Delivery
from bench.procs import QUEUE, SECRET, BenchError, Proc
from service import store
from service.ingest.events import parse_delivery
from service.ingest.receiver import stored_delivery
from service.ingest.signatures import verify
from service.ingest.wakeups import Waker

COPY_BATCH = 5_000
_KEPT_PREFIXES = ("x-hatched-", "hatched-")


def as_stored(d: Delivery, shards: int) -> store.NewDelivery:
    """The row the receiver (service/ingest/receiver.py) builds for this delivery, same calls."""
    headers = {k.lower(): v for k, v in d.headers.items()}
    # A huge tolerance: rows are stored a little after signing, like a backlog would be.
    verified = verify(d.body, headers, [SECRET], time.time(), 10**9)
    signed_at = datetime.fromtimestamp(verified.timestamp, UTC)
    parsed = parse_delivery(d.body, headers, verified.format, signed_at)
    return stored_delivery(
        parsed,
        verified.format,
        signed_at,
        {k: v for k, v in headers.items() if k.startswith(_KEPT_PREFIXES)},
        d.body,
        shards=shards,
        signature=None,
    )


async def copy_in(conn: store.Conn, rows: Sequence[store.NewDelivery]) -> None:
    """Stored with the receiver's own statement, in large batches; the rows become visible to
    the worker together, when the caller commits."""
    for i in range(0, len(rows), COPY_BATCH):
        await store.insert_deliveries(conn, rows[i : i + COPY_BATCH])


async def wake_all(redis_url: str, shards: int) -> None:
    waker = Waker(redis_url, QUEUE, 2.0)
    try:
        for shard in range(shards):
            if not await waker.wake(shard):
                raise BenchError(f"could not wake shard {shard} through {redis_url}")
    finally:
        await waker.close()


async def pending(conn: store.Executor) -> bool:
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM delivery_states WHERE status = 'accepted')"
    )
    return found


async def wait_drained(
    conn: store.Executor, worker: Proc, within: float, poll_s: float = 0.05
) -> float:
    """perf_counter() at the first poll that finds nothing `accepted` (resolution: poll_s)."""
    deadline = time.monotonic() + within
    while await pending(conn):
        worker.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"backlog not drained within {within:.0f}s")
        await asyncio.sleep(poll_s)
    return time.perf_counter()


async def load_and_drain(
    pool: store.Pool,
    rows: Sequence[store.NewDelivery],
    *,
    redis_url: str,
    shards: int,
    worker: Proc,
    within: float = 900.0,
    before_drain: Callable[[], Awaitable[object]] | None = None,
) -> float:
    """COPY `rows` in one transaction, wake every shard, wait; returns the drain's seconds,
    counted from the commit (the worker was already idle and ready). `before_drain` runs
    between the two, outside the timing."""
    async with pool.acquire() as conn, conn.transaction():
        await copy_in(conn, rows)
    if before_drain is not None:
        await before_drain()
    started = time.perf_counter()
    await wake_all(redis_url, shards)
    return await wait_drained(pool, worker, within) - started


def drained_jobs(log: Path, offset: int) -> dict[str, Any]:
    """Wake-up jobs the worker logged (`shard_drained`) since byte `offset` of its log."""
    jobs = claimed = 0
    with log.open("rb") as f:
        f.seek(offset)
        for line in f:
            if b'"shard_drained"' not in line:
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            jobs += 1
            claimed += int(doc.get("claimed", 0))
    return {"jobs": jobs, "claimed": claimed, "per_job": round(claimed / jobs, 1) if jobs else 0}


async def outcome_counts(conn: store.Executor) -> dict[str, int]:
    rows = await conn.fetch("SELECT status, count(*) AS n FROM delivery_states GROUP BY status")
    return {r["status"]: r["n"] for r in rows}
