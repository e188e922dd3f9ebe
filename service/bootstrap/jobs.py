"""The worker's side of bootstrap: poll a hatch whose `buddy.hatched` is late."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import structlog
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from service import store
from service.apply.context import WorkerContext
from service.bootstrap.flow import mirror_remote
from service.bootstrap.problems import stored
from service.bootstrap.repository import (
    POLL_JOB,
    _complete_mirrored,
    _hatch_age,
    _stalled,
    _start_poll,
    finish_hatch,
)
from service.config import Settings
from service.hatched.client import HatchedAPI
from service.hatched.errors import HatchedAPIError, RateLimited
from service.hatched.remote import _text
from service.ingest.wakeups import wake
from service.problems import Problem

log = structlog.get_logger(__name__)


async def schedule_poll(
    redis: ArqRedis, settings: Settings, user_id: str, key: str, delay_s: float
) -> None:
    """Queue a poll `delay_s` from now. Polls due in the same slot share one job id, so two
    schedulers (the chain and the cron) never double the rate. A lost job is the cron's."""
    slot = int((time.time() + delay_s) / max(settings.bootstrap_poll_every_s, 0.5))
    try:
        async with asyncio.timeout(max(settings.redis_timeout_s, 1.0) * 2):
            await redis.enqueue_job(
                POLL_JOB,
                user_id,
                key,
                _job_id=f"{POLL_JOB}:{user_id}:{key}:{slot}",
                _defer_by=max(0.0, delay_s),
                _queue_name=settings.queue_name,
            )
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("bootstrap_poll_not_queued", user_id=user_id, error=repr(exc))


async def _wake_shard(ctx: WorkerContext, shard: int) -> None:
    await wake(ctx["redis"], ctx["settings"].queue_name, shard)


def _failure(code: str, status: int, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return stored(Problem(status, code, title, detail, extra=extra))


async def poll_operation(ctx: WorkerContext, user_id: str, audience_key: str) -> str:
    """One poll of a hatch whose buddy.hatched has not come; re-queues itself until it ends."""
    settings: Settings = ctx["settings"]
    pool: store.Pool = ctx["pool"]
    hatched: HatchedAPI | None = ctx.get("hatched")
    age = await _hatch_age(pool, user_id, audience_key)
    if age is None:
        return "done"  # completed, failed or restarted meanwhile: nothing to poll
    if age < settings.bootstrap_poll_after_s:
        await schedule_poll(
            ctx["redis"], settings, user_id, audience_key, settings.bootstrap_poll_after_s - age
        )
        return "waiting"
    if hatched is None:
        return "hatched_api_not_configured"
    row = await _start_poll(pool, user_id, audience_key)
    if row is None:
        return "done"
    if row["age_s"] > settings.bootstrap_poll_max_s:
        error = _failure(
            "hatch_timeout",
            504,
            "Hatch timed out",
            f"no buddy {settings.bootstrap_poll_max_s:g}s after the hatch started; the next "
            "bootstrap call retries",
            operation_id=row["operation_id"],
        )
        await finish_hatch(pool, row, "failed", error=error)
        log.warning("bootstrap_hatch_timeout", user_id=user_id, operation_id=row["operation_id"])
        return "failed"
    try:
        operation = await hatched.get_operation(row["operation_id"])
        status = str(operation.get("status") or "").lower()
        result = operation.get("result")
        buddy_id = (
            _text(result.get("buddy_id") or result.get("buddyId"))
            if isinstance(result, Mapping)
            else None
        )
        if status in ("completed", "succeeded", "success", "done") and buddy_id:
            buddy = await hatched.get_buddy(buddy_id)
            if buddy is not None:
                # Stored first: should that fail, the row is still `hatching` and polled again.
                await mirror_remote(
                    pool, buddy, settings.shards, lambda shard: _wake_shard(ctx, shard)
                )
                await finish_hatch(pool, row, "mirroring", buddy_id=buddy_id)
                log.info("bootstrap_polled_buddy", user_id=user_id, buddy_id=buddy_id)
                return "mirroring"
        elif status in ("failed", "error", "cancelled", "canceled", "expired"):
            cause = operation.get("error")
            cause = cause if isinstance(cause, Mapping) else {}
            error = _failure(
                "hatch_failed",
                502,
                "Hatch failed",
                f"Hatched could not hatch the egg: {cause.get('message') or status}; the next "
                "bootstrap call retries",
                operation_id=row["operation_id"],
                hatched_code=cause.get("code"),
            )
            await finish_hatch(pool, row, "failed", error=error)
            log.warning("bootstrap_hatch_failed", user_id=user_id, error=cause)
            return "failed"
        delay = settings.bootstrap_poll_every_s
    except HatchedAPIError as exc:
        log.warning("bootstrap_poll_error", user_id=user_id, error=str(exc))
        retry_after = exc.retry_after_s if isinstance(exc, RateLimited) else 0.0
        delay = max(settings.bootstrap_poll_every_s, retry_after)
    await schedule_poll(ctx["redis"], settings, user_id, audience_key, delay)
    return "pending"


async def poll_stalled_hatches(ctx: WorkerContext) -> int:
    """Cron: poll hatches whose poll job was lost (Redis flushed, worker killed); finish rows
    whose buddy is already mirrored. Bounded work per run."""
    pool: store.Pool = ctx["pool"]
    rows = await _stalled(pool, ctx["settings"], 20)
    for row in rows:
        await poll_operation(ctx, row["user_id"], row["audience_key"])
    completed = await _complete_mirrored(pool)
    if rows or completed:
        log.info("bootstrap_stalled_polled", polled=len(rows), completed=completed)
    return len(rows)
