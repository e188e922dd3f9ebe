"""The arq worker: apply wake-ups per shard, a sweeper for anything left pending, metrics.

Jobs may run more than once (a worker killed mid-batch, a sweep racing a wake-up); that is
designed for: a batch commits or not as a whole, and rows already final are never claimed again.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import structlog
from arq import cron
from arq.worker import Worker, func
from redis.exceptions import RedisError

from service import metrics, store
from service.applier import ApplyLimits, drain_shard
from service.config import Settings
from service.queue import APPLY_JOB, WAKE_TTL_S, redis_settings, wake_key

log = structlog.get_logger(__name__)


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    assert settings.database_url is not None
    ctx["pool"] = await store.create_pool(
        settings.database_url, size=settings.db_pool_size, timeout_s=settings.db_timeout_s
    )
    ctx["limits"] = ApplyLimits(
        batch_size=settings.apply_batch_size,
        max_attempts=settings.apply_max_attempts,
        backoff_s=settings.apply_backoff_s,
    )


async def shutdown(ctx: dict[str, Any]) -> None:
    pool = ctx.get("pool")
    if pool is not None:
        await pool.close()


async def apply_shard(ctx: dict[str, Any], shard: int) -> int:
    """Drain one shard. Holding the shard's advisory lock serialises jobs of the same shard."""
    settings: Settings = ctx["settings"]
    started = time.perf_counter()
    async with ctx["pool"].acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1, $2)", store.SHARD_LOCK_SPACE, shard)
        try:
            # Only now may the next delivery enqueue another wake-up: everything stored
            # before this point is drained by this job (see service/queue.py).
            await ctx["redis"].delete(wake_key(settings.queue_name, shard))
            result = await drain_shard(conn, shard, ctx["limits"])
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", store.SHARD_LOCK_SPACE, shard)
    metrics.APPLY_SECONDS.observe(time.perf_counter() - started)
    if result.claimed:
        metrics.APPLY_BATCH.observe(result.claimed)
    for status in ("applied", "duplicate", "dead"):
        if count := getattr(result, status):
            metrics.APPLIED.labels(status=status).inc(count)
    if result.inconsistencies:
        metrics.INCONSISTENCIES.inc(result.inconsistencies)
    if result.claimed:
        log.info(
            "shard_drained",
            shard=shard,
            claimed=result.claimed,
            applied=result.applied,
            duplicate=result.duplicate,
            retried=result.retried,
        )
    return result.claimed


async def sweep(ctx: dict[str, Any]) -> int:
    """Re-wake shards whose deliveries waited too long: a lost wake-up or a Redis outage."""
    settings: Settings = ctx["settings"]
    pool = ctx["pool"]
    shards = await store.stalled_shards(pool, settings.sweep_after_s)
    for shard in shards:
        await ctx["redis"].set(wake_key(settings.queue_name, shard), b"1", ex=WAKE_TTL_S)
        await ctx["redis"].enqueue_job(APPLY_JOB, shard, _queue_name=settings.queue_name)
    if shards:
        metrics.SWEPT.inc(len(shards))
        log.warning("sweep_rewoke", shards=shards)
    await metrics.refresh_inbox_gauges(pool)
    return len(shards)


async def prune(ctx: dict[str, Any]) -> int:
    """Delete applied deliveries past retention, in small batches so no lock is held for long.

    Dead and unmapped deliveries stay until they are replayed or purged on purpose; the ledger
    and the mirror keep everything they derived from the pruned rows.
    """
    settings: Settings = ctx["settings"]
    total = 0
    for _ in range(100):  # bounded work per run; the next run continues
        deleted = await store.prune_applied(
            ctx["pool"], settings.retention_days * 86400, settings.prune_batch_size
        )
        total += deleted
        if deleted < settings.prune_batch_size:
            break
    if total:
        metrics.PRUNED.inc(total)
        log.info("pruned", deliveries=total)
    return total


class MirrorWorker(Worker):
    """arq's worker, made to ride out a Redis outage instead of exiting on the first error."""

    async def main(self) -> None:
        delay = 0.5
        while True:
            try:
                await super().main()
                return
            except (OSError, RedisError) as exc:
                if self._pool is not None:
                    raise  # only the first connection is retried here; polling has its own
                log.warning("redis_unavailable_at_start", error=repr(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (OSError, RedisError) as exc:
            # Deliveries wait safely in Postgres; the sweeper re-wakes them once Redis is back.
            log.warning("redis_unavailable", error=repr(exc))
            await asyncio.sleep(1.0)


def create_worker(
    settings: Settings, *, handle_signals: bool = True, burst: bool = False
) -> Worker:
    assert settings.redis_url is not None
    every = max(1, round(settings.sweep_after_s / 2))
    return MirrorWorker(
        functions=[func(apply_shard, name=APPLY_JOB, max_tries=1000)],
        cron_jobs=[
            cron(sweep, second=set(range(0, 60, every)), run_at_startup=True),
            cron(prune, minute=set(range(0, 60, 10)), second=30),
        ],
        redis_settings=redis_settings(settings.redis_url, settings.redis_timeout_s),
        queue_name=settings.queue_name,
        on_startup=startup,
        on_shutdown=shutdown,
        ctx={"settings": settings},
        handle_signals=handle_signals,
        burst=burst,
        max_jobs=max(2, settings.db_pool_size - 1),
        keep_result=0,
        # The liveness probe reads this key; per pod, so one worker's clean exit (which deletes
        # its key) cannot fail the others', and fresh enough to catch a hung worker.
        health_check_interval=10,
        health_check_key=f"{settings.queue_name}:health-check:{socket.gethostname()}",
        poll_delay=settings.worker_poll_s,
        # SIGTERM: let the batch in hand commit before exiting.
        job_completion_wait=30,
    )


async def stop(worker: Worker, main: asyncio.Task[None], grace_s: float = 30.0) -> None:
    """Stop an in-process worker the way SIGTERM would: take no new job, let running ones end."""
    worker.allow_pick_jobs = False
    running = [t for t in worker.tasks.values() if not t.done()]
    if running:
        await asyncio.wait(running, timeout=grace_s)
    main.cancel()
    await asyncio.gather(main, return_exceptions=True)
    await worker.close()
