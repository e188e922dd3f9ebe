"""Debounced REST refreshes: a burst of events for one buddy costs one call."""

from __future__ import annotations

import time

import structlog
from arq.connections import ArqRedis

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
