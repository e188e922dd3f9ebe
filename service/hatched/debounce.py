"""Debounced REST refreshes: a burst of events for one buddy costs one call."""

from __future__ import annotations

import time
from collections.abc import Sequence

import structlog
from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix, retry_key_prefix

log = structlog.get_logger(__name__)


REFRESH_JOB = "refresh_buddy"


async def request_refresh(
    redis: ArqRedis, queue_name: str, buddy_id: str, *, priority: bool, delay_s: float = 0.0
) -> None:
    """One queued refresh per buddy (and kind): a burst of events costs one REST call.

    Debounced: each request moves the buddy's due time to `delay_s` from now, and the queued
    job, when it comes up early, defers itself to that time (see `refresh_due`). Priority
    refreshes (a broken balance check, an operator's request) have their own job id, so an
    ordinary one already waiting cannot swallow them.
    """
    if delay_s > 0 and not priority:
        await redis.set(
            due_key(queue_name, buddy_id), repr(time.time() + delay_s), ex=int(delay_s) + 300
        )
    await redis.enqueue_job(
        REFRESH_JOB,
        buddy_id,
        priority,
        _job_id=f"refresh{'!' if priority else ''}:{buddy_id}",
        _defer_by=delay_s or None,
        _queue_name=queue_name,
    )


def due_key(queue_name: str, buddy_id: str) -> str:
    return f"{queue_name}:refresh-due:{buddy_id}"


async def refresh_due_in(redis: ArqRedis, queue_name: str, buddy_id: str) -> float:
    """Seconds until the buddy's debounced refresh is due (0 or less: now)."""
    due = await redis.get(due_key(queue_name, buddy_id))
    return float(due) - time.time() if due is not None else 0.0


async def cancel_refreshes(redis: ArqRedis, queue_name: str, buddy_ids: Sequence[str]) -> int:
    """Drop what Redis holds about refreshes of these buddies (erasure): the debounce due time
    and the queued jobs, whose ids and arguments name the buddy. Returns the keys and queue
    entries removed. A job already running is left to finish: it finds the tombstone."""
    job_ids = [f"refresh{kind}:{b}" for b in buddy_ids for kind in ("", "!")]
    keys = [due_key(queue_name, b) for b in buddy_ids]
    for job_id in job_ids:
        keys += [job_key_prefix + job_id, retry_key_prefix + job_id, result_key_prefix + job_id]
    if not keys:
        return 0
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(queue_name, *job_ids)
        pipe.delete(*keys)
        queued, deleted = await pipe.execute()
    return int(queued) + int(deleted)
