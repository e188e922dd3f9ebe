"""The arq worker: apply wake-ups per shard, a sweeper for anything left pending, metrics.

Jobs may run more than once (a worker killed mid-batch, a sweep racing a wake-up); that is
designed for: a batch commits or not as a whole, and rows already final are never claimed again.
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import structlog
from arq import cron
from arq.worker import Retry, Worker, func
from redis.exceptions import RedisError

from service import metrics, store
from service.apply.applier import ApplyLimits, BatchResult, apply_batch, drain_shards
from service.apply.context import WorkerContext
from service.bootstrap import jobs as bootstrap_jobs
from service.bootstrap import repository
from service.config import Settings
from service.hatched import refresh
from service.hatched.client import HatchedAPI
from service.hatched.debounce import REFRESH_JOB, refresh_due_in, request_refresh
from service.hatched.errors import BudgetExhausted, HatchedAPIError
from service.hatched.ratelimit import RedisTokenBucket
from service.ingest.wakeups import APPLY_JOB, redis_settings, shard_of, wake, wake_key
from service.store import erasure
from service.subscriptions.sender import Sender

log = structlog.get_logger(__name__)


async def startup(ctx: WorkerContext) -> None:
    settings: Settings = ctx["settings"]
    ctx["pool"] = await store.create_pool(
        settings.postgres_dsn, size=settings.db_pool_size, timeout_s=settings.db_timeout_s
    )
    ctx["limits"] = ApplyLimits(
        batch_size=settings.apply_batch_size,
        max_attempts=settings.apply_max_attempts,
        backoff_s=settings.apply_backoff_s,
        feed=settings.changes_enabled,
    )

    ctx["hatched"] = None
    if settings.hatched_api_enabled:
        bucket = RedisTokenBucket(ctx["redis"], settings.hatched_api_rate_per_min)
        ctx["hatched"] = HatchedAPI.from_settings(
            settings,
            bucket=bucket,
            on_request=metrics.observe_hatched_call,
            timeout=httpx.Timeout(settings.hatched_api_timeout_s, connect=5),
            # A job waiting for budget would hold a worker slot that applying needs: wait
            # briefly, then defer the job instead (see refresh_buddy).
            budget_wait_s=1.0,
        )
    # The change feed pushed to subscriptions: each worker process takes the subscriptions no
    # other one owns (service/subscriptions/sender.py).
    ctx["sender"] = Sender(settings)
    ctx["sender"].start()


async def shutdown(ctx: WorkerContext) -> None:
    sender = ctx.get("sender")
    if sender is not None:
        await sender.close()
    hatched = ctx.get("hatched")
    if hatched is not None:
        await hatched.aclose()
    pool = ctx.get("pool")
    if pool is not None:
        await pool.close()


async def apply_shard(ctx: WorkerContext, shard: int) -> int:
    """Drain one shard. Holding the shard's advisory lock serialises jobs of the same shard."""
    settings: Settings = ctx["settings"]
    started = time.perf_counter()

    def stopping() -> bool:
        return bool(ctx.get("stopping"))

    async with ctx["pool"].acquire() as conn:
        await store.lock_shard(conn, shard)
        try:
            # Only now may the next delivery enqueue another wake-up: everything stored
            # before this point is drained by this job (see service/ingest/wakeups.py).
            await ctx["redis"].delete(wake_key(settings.queue_name, shard))
            result, left = await drain_shards(conn, [shard], ctx["limits"], stopping)
        finally:
            await store.unlock_shards(conn, [shard])
        if not left:
            result.add(await apply_idle_shards(conn, ctx["limits"]))
    if left:
        # Shutting down with work left: hand the shard to the next worker now, not at the
        # next sweep.
        await wake(ctx["redis"], settings.queue_name, shard, force=True)
    metrics.APPLY_SECONDS.observe(time.perf_counter() - started)
    if result.claimed:
        metrics.APPLY_BATCH.observe(result.claimed)
    for status in ("applied", "duplicate", "dead"):
        if count := getattr(result, status):
            metrics.APPLIED.labels(status=status).inc(count)
    if result.inconsistencies:
        metrics.INCONSISTENCIES.inc(result.inconsistencies)
    if result.forgotten:
        metrics.TOMBSTONE_HITS.labels(path="apply").inc(result.forgotten)
    if result.changed and ctx["limits"].feed:  # one feed entry per buddy whose version grew
        metrics.CHANGES_WRITTEN.inc(len(result.changed))
    for field_name in result.drift:
        metrics.REFRESH_DRIFT.labels(field=field_name).inc()
    await _schedule_refreshes(ctx, result)
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


async def apply_idle_shards(conn: store.Conn, limits: ApplyLimits) -> BatchResult:
    """Apply one batch from the shards with due deliveries that no job is draining (their lock
    is free), ahead of their own wake-up jobs.

    Starting an arq job costs the worker's poll loop several Redis round trips, one job after
    another. On a busy machine that caps the jobs started per second, so with deliveries
    spread over every shard, each waited for its shard's job to be started in turn
    (bench/BENCHMARKS.md, Freshness). A job already running takes that work instead. The
    shard's own wake-up stays queued and finds little or nothing left; the wake-up protocol is
    unchanged, so nothing depends on this pass.
    """
    due = await store.due_shards(conn)
    locked = await store.try_lock_shards(conn, due) if due else []
    if not locked:
        return BatchResult()
    try:
        # One batch, then the locks go: a shard with a large backlog is its own job's work, and
        # holding many shards' locks for long would leave their jobs waiting on them.
        result, _ = await apply_batch(conn, locked, -(-limits.batch_size // len(locked)), limits)
    finally:
        await store.unlock_shards(conn, locked)
    return result


MAX_REFRESH_DEFERRALS = 10


async def _schedule_refreshes(ctx: WorkerContext, result: BatchResult) -> None:
    """With the REST API on: a broken balance check asks for a refresh now, with priority;
    any buddy webhooks moved gets one once its deliveries settle (one per burst, coalesced)."""
    settings: Settings = ctx["settings"]
    if ctx.get("hatched") is None:
        return
    for buddy_id in sorted(result.inconsistent):
        await request_refresh(
            ctx["redis"], settings.queue_name, buddy_id, priority=True, delay_s=1.0
        )
    if settings.refresh_settle_s > 0:
        for buddy_id in sorted(result.touched - result.inconsistent):
            await request_refresh(
                ctx["redis"],
                settings.queue_name,
                buddy_id,
                priority=False,
                delay_s=settings.refresh_settle_s,
            )


async def refresh_buddy(ctx: WorkerContext, buddy_id: str, priority: bool = False) -> str:
    """Fetch one buddy from Hatched and put the snapshot in the inbox, to apply like any other
    delivery. A failure leaves mirrored state exactly as it was."""
    settings: Settings = ctx["settings"]
    api: HatchedAPI | None = ctx.get("hatched")
    if api is None:
        return "disabled"
    if not priority and ctx.get("job_try", 1) < MAX_REFRESH_DEFERRALS:
        # Events kept coming after this refresh was queued: wait until they settle. Bounded,
        # so a buddy that never goes quiet is still refreshed now and then.
        wait_s = await refresh_due_in(ctx["redis"], settings.queue_name, buddy_id)
        if wait_s > 0.05:
            raise Retry(defer=wait_s)
    if await erasure.is_forgotten(ctx["pool"], buddy_id):
        # Erased (a refresh queued before, or reconciliation): not even fetched.
        await erasure.count_hit(ctx["pool"], buddy_id)
        metrics.TOMBSTONE_HITS.labels(path="refresh").inc()
        metrics.REFRESHES.labels(outcome="forgotten").inc()
        return "forgotten"
    try:
        remote = await api.get_buddy(buddy_id, priority=priority)
    except BudgetExhausted:
        if ctx.get("job_try", 1) < MAX_REFRESH_DEFERRALS:
            raise Retry(defer=random.uniform(2.0, 10.0)) from None
        # The budget stays spent on more urgent work; reconciliation comes back to this buddy.
        metrics.REFRESHES.labels(outcome="skipped_budget").inc()
        return "skipped_budget"
    except HatchedAPIError as exc:
        metrics.REFRESHES.labels(outcome="failed").inc()
        log.warning("refresh_failed", buddy_id=buddy_id, code=exc.code, status=exc.status)
        return "failed"
    if remote is None:
        metrics.REFRESHES.labels(outcome="not_found").inc()
        log.warning("refresh_not_found", buddy_id=buddy_id)
        return "not_found"
    if await refresh.store_snapshot(ctx["pool"], remote, shards=settings.shards) is None:
        # Erased while the call was made.
        metrics.TOMBSTONE_HITS.labels(path="refresh").inc()
        metrics.REFRESHES.labels(outcome="forgotten").inc()
        return "forgotten"
    await wake(ctx["redis"], settings.queue_name, shard_of(buddy_id, settings.shards))
    metrics.REFRESHES.labels(outcome="stored").inc()
    return "stored"


async def reconcile(ctx: WorkerContext) -> int:
    """Refresh the buddies refreshed longest ago (never first), within a share of the budget.

    Heals what webhooks alone cannot: deliveries Hatched gave up on while the mirror was down.
    """
    settings: Settings = ctx["settings"]
    if ctx.get("hatched") is None or settings.reconcile_after_s <= 0:
        return 0
    # Half a minute's budget per run (it runs every minute): live refreshes keep the rest.
    limit = max(1, settings.hatched_api_rate_per_min // 2)
    due = await store.due_for_refresh(ctx["pool"], settings.reconcile_after_s, limit)
    for buddy_id in due:
        await request_refresh(ctx["redis"], settings.queue_name, buddy_id, priority=False)
    if due:
        log.info("reconcile_queued", buddies=len(due))
    return len(due)


async def sweep(ctx: WorkerContext) -> int:
    """Re-wake shards whose deliveries waited too long: a lost wake-up or a Redis outage."""
    settings: Settings = ctx["settings"]
    pool = ctx["pool"]
    shards = await store.stalled_shards(pool, settings.sweep_after_s)
    for shard in shards:
        await wake(ctx["redis"], settings.queue_name, shard, force=True)
    if shards:
        metrics.SWEPT.inc(len(shards))
        log.warning("sweep_rewoke", shards=shards)
    await metrics.refresh_inbox_gauges(pool)
    return len(shards)


async def prune(ctx: WorkerContext) -> int:
    """Delete applied deliveries past retention, in small batches so no lock is held for long.

    Dead and unmapped deliveries stay until they are replayed or purged on purpose; the ledger
    and the mirror keep everything they derived from the pruned rows. Change-feed entries past
    MIRROR_CHANGES_RETENTION_DAYS go the same way. Returns the rows deleted.
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
    # A signature can verify until its timestamp is tolerance_s old; twice that (and a minute
    # of clock skew) and it is certainly refused as stale before any lookup.
    await store.prune_signatures(ctx["pool"], 2 * settings.signature_tolerance_s + 60)
    if total:
        metrics.PRUNED.inc(total)
        log.info("pruned", deliveries=total)
    changes = 0
    for _ in range(100):  # the change feed's own retention, in the same small batches
        deleted = await store.prune_changes(
            ctx["pool"], settings.changes_retention_days * 86400, settings.prune_batch_size
        )
        changes += deleted
        if deleted < settings.prune_batch_size:
            break
    if changes:
        metrics.CHANGES_PRUNED.inc(changes)
        log.info("pruned", changes=changes)
    return total + changes


class MirrorWorker(Worker):
    """arq's worker, made to ride out a Redis outage instead of exiting on the first error."""

    async def main(self) -> None:
        delay = 0.5
        while True:
            try:
                await super().main()
                return
            except (OSError, RedisError) as exc:
                # Retried here: an outage before the startup job (arq's first connection, or
                # its first commands on it, which run before ctx["redis"] is set). After that
                # the startup job has run and polling rides out outages (_poll_iteration).
                if "redis" in self.ctx:
                    raise
                log.warning("redis_unavailable_at_start", error=repr(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        # SIGTERM: a draining job finishes the batch in hand and hands its shard on, instead of
        # draining a busy shard until the completion wait runs out.
        self.ctx["stopping"] = True
        super().handle_sig_wait_for_completion(signum)

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (OSError, RedisError) as exc:
            # Deliveries wait safely in Postgres; the sweeper re-wakes them once Redis is back.
            log.warning("redis_unavailable", error=repr(exc))
            await asyncio.sleep(1.0)


def _job(function: Callable[..., Awaitable[Any]]) -> Any:
    """A job typed against WorkerContext, as arq's untyped `ctx: dict` registers it."""
    return function


def create_worker(
    settings: Settings, *, handle_signals: bool = True, burst: bool = False
) -> Worker:
    every = max(1, round(settings.sweep_after_s / 2))
    return MirrorWorker(
        functions=[
            func(_job(apply_shard), name=APPLY_JOB, max_tries=1000),
            func(_job(refresh_buddy), name=REFRESH_JOB, max_tries=MAX_REFRESH_DEFERRALS + 1),
            func(_job(bootstrap_jobs.poll_operation), name=repository.POLL_JOB, max_tries=3),
        ],
        cron_jobs=[
            cron(_job(sweep), second=set(range(0, 60, every)), run_at_startup=True),
            cron(_job(prune), minute=set(range(0, 60, 10)), second=30),
            cron(_job(reconcile), second=15),
            cron(_job(bootstrap_jobs.poll_stalled_hatches), second=set(range(0, 60, 5))),
        ],
        redis_settings=redis_settings(settings.redis_dsn, settings.redis_timeout_s),
        queue_name=settings.queue_name,
        on_startup=_job(startup),
        on_shutdown=_job(shutdown),
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
    worker.ctx["stopping"] = True
    # Stop the poll loop first, so no job starts after the ones waited for below (a job
    # cancelled half-way through opening a connection would leak it).
    main.cancel()
    await asyncio.gather(main, return_exceptions=True)
    running = [t for t in worker.tasks.values() if not t.done()]
    if running:
        _, late = await asyncio.wait(running, timeout=grace_s)
        # Past the grace period a job is cancelled: its transaction rolls back and the
        # sweeper (or arq's retry) applies its deliveries later.
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    # arq's close() gathers its job tasks without return_exceptions: hand it none that ended in
    # cancellation, or that CancelledError would surface here.
    for job_id, task in list(worker.tasks.items()):
        if task.done():
            del worker.tasks[job_id]
    try:
        await worker.close()
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we are being cancelled ourselves
        # else: a job task arq cancelled in close() itself; it was being stopped anyway
