"""The first-user bootstrap flow behind `POST /v1/users/{user_id}/buddy` (service/bootstrap.py).

The guard: one row of `bootstraps` per user and audience. Of any number of concurrent or repeated
calls one INSERT wins and runs the flow against Hatched (reuse-or-create the egg, mark it ready,
hatch); the others follow the row, so there is never a second egg. A request that dies mid-flow
is taken over once its lease runs out, and a failed flow is retried by the next call.

The end: the buddy arrives with `buddy.hatched`, and a trigger on `buddies`
(sql/0005_bootstrap.sql) completes the row and NOTIFYs `hatched_mirror_bootstraps` with the user
id. When that delivery is late the worker polls `GET /operations/{id}` (`poll_operation`, every
few seconds, bounded) and mirrors the buddy itself; a cron (`poll_stalled_hatches`) restarts
polling that lost its job.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import structlog
from arq.connections import ArqRedis
from redis.exceptions import RedisError
from starlette.responses import Response

from service import store
from service.config import Settings
from service.hatched_api import (
    BudgetExhausted,
    HatchedAPI,
    HatchedAPIError,
    HatchedUnavailable,
    RateLimited,
    RemoteBuddy,
)
from service.problems import PROBLEM_TYPE, Problem
from service.projector import Buddy, iso
from service.queue import shard_of, wake
from service.refresh import store_snapshot

log = structlog.get_logger(__name__)

CHANNEL = "hatched_mirror_bootstraps"
POLL_JOB = "bootstrap_poll"
# A request running the flow holds its row this long; after it, another request may take over.
LEASE_S = 90.0
# Statuses of an egg that may be hatched as they are (anything else is "waiting": mark it ready).
_HATCHABLE = ("ready", "hatching", "hatched")


@dataclass(frozen=True)
class Knobs:
    """MIRROR_BOOTSTRAP_* settings: when the worker starts polling, how often, for how long."""

    poll_after_s: float = 10.0
    poll_every_s: float = 2.0
    poll_max_s: float = 120.0

    @classmethod
    def of(cls, settings: Settings) -> Knobs:
        return cls(
            poll_after_s=float(getattr(settings, "bootstrap_poll_after_s", cls.poll_after_s)),
            poll_every_s=float(getattr(settings, "bootstrap_poll_every_s", cls.poll_every_s)),
            poll_max_s=float(getattr(settings, "bootstrap_poll_max_s", cls.poll_max_s)),
        )

    @property
    def stalled_after_s(self) -> float:
        """A hatch whose poll is this overdue lost its job; the cron polls it."""
        return max(3 * self.poll_every_s, 5.0)


# --- errors --------------------------------------------------------------------------------


class HatchedProblem(Problem):
    """A problem with RFC 9457 extension members (publish_url, active, hatched_code, ...)."""

    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(status, code, title, detail, headers)
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        return {
            **self.extra,
            "type": PROBLEM_TYPE + self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }

    def response(self) -> Response:
        return Response(
            orjson.dumps(self.body()),
            status_code=self.status,
            headers=self.headers,
            media_type="application/problem+json",
        )

    def stored(self) -> dict[str, Any]:
        return {**self.body(), "headers": self.headers}

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> HatchedProblem:
        core = {"type", "title", "status", "detail", "code", "headers"}
        return cls(
            int(stored.get("status") or 502),
            str(stored.get("code") or "hatched_error"),
            str(stored.get("title") or "Hatched error"),
            str(stored.get("detail") or ""),
            stored.get("headers") or {},
            {k: v for k, v in stored.items() if k not in core},
        )


def hatched_problem(exc: HatchedAPIError) -> HatchedProblem:
    """Hatched's refusal as this API's problem, with a stable code and Hatched's own details."""
    extra: dict[str, Any] = {"hatched_code": exc.code, "hatched_status": exc.status}
    if exc.request_id:
        extra["hatched_request_id"] = exc.request_id
    details = exc.details if isinstance(exc.details, Mapping) else {}
    if isinstance(exc, RateLimited | BudgetExhausted):
        wait = exc.retry_after_s if isinstance(exc, RateLimited) else 5.0
        seconds = max(1, int(wait + 0.999))
        return HatchedProblem(
            429,
            "hatched_rate_limited",
            "Hatched rate limit reached",
            f"Hatched's request budget is spent ({exc.message}); retry after {seconds}s",
            {"Retry-After": str(seconds)},
            {**extra, "retry_after_s": seconds},
        )
    if isinstance(exc, HatchedUnavailable) or (exc.status or 0) >= 500:
        return HatchedProblem(
            502,
            "hatched_unavailable",
            "Hatched unavailable",
            f"Hatched did not answer usably: {exc.message}; retry later",
            {"Retry-After": "5"},
            extra,
        )
    if exc.status == 402:
        return HatchedProblem(
            402,
            "hatched_payment_required",
            "Hatched plan exhausted",
            f"Hatched refused for billing reasons ({exc.code}): {exc.message}",
            extra=extra,
        )
    if exc.status == 409 and exc.code == "no_published_config":
        publish_url = details.get("publish_url") or details.get("publishUrl")
        hint = f"; publish one at {publish_url}" if publish_url else ""
        return HatchedProblem(
            409,
            "no_published_config",
            "No published buddy configuration",
            f"Hatched has no published buddy configuration to hatch from{hint}",
            extra={**extra, "publish_url": publish_url},
        )
    if exc.status == 409 and exc.code == "active_egg_limit":
        return HatchedProblem(
            409,
            "active_egg_limit",
            "Too many unhatched eggs",
            f"the user holds the most unhatched eggs Hatched allows and none could be reused: "
            f"{exc.message}",
            extra={**extra, "active": details.get("active")},
        )
    return HatchedProblem(
        502,
        "hatched_error",
        "Hatched refused the request",
        f"Hatched answered {exc.status} {exc.code}: {exc.message}",
        extra=extra,
    )


# --- Postgres ------------------------------------------------------------------------------

CLAIM = """
INSERT INTO bootstraps (user_id, audience_key, audience, status, claim)
VALUES ($1, $2, $3, 'starting', $4)
ON CONFLICT (user_id, audience_key) DO NOTHING
RETURNING *
"""

# A failed or completed-but-unmirrored row is retried by the next call (when $5); a request
# that died mid-flow, or a hatch nobody finished, is taken over once its lease has run out.
TAKE_OVER = """
UPDATE bootstraps
SET status = 'starting', claim = $3, attempts = attempts + 1, error = NULL, operation_id = NULL,
    buddy_id = NULL, hatch_started_at = NULL, polls = 0, polled_at = NULL, updated_at = now()
WHERE user_id = $1 AND audience_key = $2
  AND (($5 AND status IN ('failed', 'completed'))
       OR (status IN ('starting', 'mirroring') AND updated_at < now() - make_interval(secs => $4))
       OR (status = 'hatching' AND hatch_started_at < now() - make_interval(secs => $6)))
RETURNING *
"""


async def claim_row(
    pool: store.Pool,
    user_id: str,
    key: str,
    audience: str | None,
    claim: uuid.UUID,
    *,
    retry_failed: bool,
    hatch_stale_s: float,
) -> tuple[asyncpg.Record | None, bool]:
    """(the row, whether this request now runs the flow)."""
    row = await pool.fetchrow(CLAIM, user_id, key, audience, claim)
    if row is not None:
        return row, True
    row = await pool.fetchrow(TAKE_OVER, user_id, key, claim, LEASE_S, retry_failed, hatch_stale_s)
    if row is not None:
        return row, True
    return await get_row(pool, user_id, key), False


GET_ROW = "SELECT * FROM bootstraps WHERE user_id = $1 AND audience_key = $2"


async def get_row(conn: store.Executor, user_id: str, key: str) -> asyncpg.Record | None:
    return await conn.fetchrow(GET_ROW, user_id, key)


# The request running the flow records its outcome, unless the buddy arrived first (the
# trigger then completed the row, and this changes nothing).
FINISH_START = """
UPDATE bootstraps
SET status = $4, egg_id = coalesce($5, egg_id), operation_id = $6, buddy_id = $7, error = $8,
    hatch_started_at = CASE WHEN $4 = 'hatching' THEN now() END,
    claim = NULL, polls = 0, polled_at = NULL, updated_at = now()
WHERE user_id = $1 AND audience_key = $2 AND status = 'starting' AND claim = $3
RETURNING *
"""


async def finish_start(
    pool: store.Pool,
    user_id: str,
    key: str,
    claim: uuid.UUID,
    status: str,
    *,
    egg_id: str | None = None,
    operation_id: str | None = None,
    buddy_id: str | None = None,
    error: dict[str, Any] | None = None,
) -> asyncpg.Record | None:
    return await pool.fetchrow(
        FINISH_START, user_id, key, claim, status, egg_id, operation_id, buddy_id, error
    )


# The poller's outcome for the hatch it polled (a newer hatch or a completion wins).
FINISH_HATCH = """
UPDATE bootstraps SET status = $4, buddy_id = $5, error = $6, updated_at = now()
WHERE user_id = $1 AND audience_key = $2 AND status = 'hatching' AND operation_id = $3
RETURNING *
"""


async def finish_hatch(
    pool: store.Pool,
    row: asyncpg.Record,
    status: str,
    *,
    buddy_id: str | None = None,
    error: dict[str, Any] | None = None,
) -> bool:
    args = (row["user_id"], row["audience_key"], row["operation_id"], status, buddy_id, error)
    return await pool.fetchrow(FINISH_HATCH, *args) is not None


POLL_STATE = """
UPDATE bootstraps SET polls = polls + 1, polled_at = now()
WHERE user_id = $1 AND audience_key = $2 AND status = 'hatching'
RETURNING *, extract(epoch FROM now() - hatch_started_at)::float8 AS age_s
"""


async def _start_poll(pool: store.Pool, user_id: str, key: str) -> asyncpg.Record | None:
    return await pool.fetchrow(POLL_STATE, user_id, key)


HATCH_AGE = """
SELECT extract(epoch FROM now() - hatch_started_at)::float8 FROM bootstraps
WHERE user_id = $1 AND audience_key = $2 AND status = 'hatching'
"""


async def _hatch_age(pool: store.Pool, user_id: str, key: str) -> float | None:
    age: float | None = await pool.fetchval(HATCH_AGE, user_id, key)
    return age


STALLED = """
SELECT user_id, audience_key FROM bootstraps
WHERE status = 'hatching'
  AND coalesce(polled_at, hatch_started_at + make_interval(secs => $1))
      < now() - make_interval(secs => $2)
ORDER BY hatch_started_at
LIMIT $3
"""


async def _stalled(pool: store.Pool, knobs: Knobs, limit: int) -> list[asyncpg.Record]:
    return await pool.fetch(STALLED, knobs.poll_after_s, knobs.stalled_after_s, limit)


# Safety net for the trigger: a row whose buddy is mirrored is complete.
COMPLETE_MIRRORED = """
UPDATE bootstraps b SET status = 'completed', claim = NULL, error = NULL, updated_at = now()
FROM buddies d
WHERE b.status = 'mirroring' AND d.buddy_id = b.buddy_id
RETURNING b.user_id
"""


async def _complete_mirrored(pool: store.Pool) -> int:
    return len(await pool.fetch(COMPLETE_MIRRORED))


Found = tuple[Buddy, int, datetime]


async def find_mirrored(
    pool: store.Pool, user_id: str, audience: str | None, row: asyncpg.Record | None = None
) -> Found | None:
    """The user's buddy in the mirror: the one this bootstrap produced, else the newest."""
    if row is not None and row["buddy_id"]:
        found = await store.get_buddy(pool, row["buddy_id"])
        if found is not None:
            return found
    return await store.user_buddy(pool, user_id, audience)


# --- Hatched's side: an active buddy, or an egg hatching -----------------------------------


async def mirror_remote(
    pool: store.Pool, buddy: RemoteBuddy, shards: int, wake_shard: Callable[[int], Awaitable[Any]]
) -> None:
    """Into the inbox like any delivery; the worker applies it, and the trigger completes."""
    await store_snapshot(pool, buddy, shards=shards)
    await wake_shard(shard_of(buddy.buddy_id, shards))


async def start_flow(
    hatched: HatchedAPI, user_id: str, audience: str | None
) -> RemoteBuddy | tuple[str, str]:
    """Hatched's side of the flow: an active buddy, or (egg id, hatch operation id)."""
    page, _ = await hatched.list_buddies(user_id=user_id, status="active", priority=True)
    mine = [
        b
        for b in page
        if b.user_id in (None, user_id) and (audience is None or b.audience == audience)
    ]
    if mine:
        return max(mine, key=_newest)
    try:
        return await _hatch(hatched, await hatched.ensure_egg(user_id, audience, priority=True))
    except HatchedAPIError as exc:
        if exc.status != 409 or exc.code != "active_egg_limit":
            raise
        limit = exc
    # The user holds as many unhatched eggs as Hatched allows: hatch one of them instead.
    for egg in _reusable_eggs(limit.details, audience):
        try:
            return await _hatch(hatched, egg)
        except HatchedAPIError as exc:
            if exc.status != 409:
                raise
            log.info("bootstrap_egg_not_reusable", egg_id=egg["egg_id"], code=exc.code)
    raise limit


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _newest(buddy: RemoteBuddy) -> tuple[float, str]:
    return (buddy.created_at.timestamp() if buddy.created_at else 0.0, buddy.buddy_id)


def _reusable_eggs(details: Any, audience: str | None) -> list[dict[str, Any]]:
    """Eggs named in an active_egg_limit refusal, same audience first, other audiences never."""
    active = details.get("active") if isinstance(details, Mapping) else None
    known: list[dict[str, Any]] = []
    unknown: list[dict[str, Any]] = []
    for item in active if isinstance(active, list) else []:
        if isinstance(item, str) and item:
            unknown.append({"egg_id": item})
        elif isinstance(item, Mapping):
            egg_id = item.get("egg_id") or item.get("eggId") or item.get("id")
            if not isinstance(egg_id, str) or not egg_id:
                continue
            egg = {**item, "egg_id": egg_id}
            if "audience" not in item:
                unknown.append(egg)
            elif item.get("audience") == audience:
                known.append(egg)
    return known + unknown


async def _hatch(hatched: HatchedAPI, egg: Mapping[str, Any]) -> RemoteBuddy | tuple[str, str]:
    egg_id = egg.get("egg_id") or egg.get("id")
    if not isinstance(egg_id, str) or not egg_id:
        raise HatchedAPIError("egg without an id", status=200, code="invalid_response")
    status = egg.get("status")
    buddy_id = egg.get("buddy_id")
    if status == "hatched" and isinstance(buddy_id, str) and buddy_id:
        buddy = await hatched.get_buddy(buddy_id, priority=True)
        if buddy is not None:
            return buddy
    operation_id = egg.get("operation_id")
    if status == "hatching" and isinstance(operation_id, str) and operation_id:
        return egg_id, operation_id
    if status not in _HATCHABLE:
        try:
            await hatched.mark_egg_ready(egg_id, priority=True)
        except HatchedAPIError as exc:
            # An egg known only by id may already be past "ready"; the hatch call decides.
            if status is not None or exc.status != 409:
                raise
    started = await hatched.hatch_egg(egg_id, priority=True)
    operation_id = started.get("operation_id") or started.get("id")
    if not isinstance(operation_id, str) or not operation_id:
        raise HatchedAPIError("hatch answered without an operation id", code="invalid_response")
    return egg_id, operation_id


# --- what a user stream shows --------------------------------------------------------------


def progress(row: asyncpg.Record | None) -> dict[str, Any]:
    """What a stream shows before the buddy exists."""
    if row is None:
        return {
            "status": "none",
            "operation_id": None,
            "egg_id": None,
            "error": None,
            "started_at": None,
        }
    error = row["error"]
    if isinstance(error, Mapping):
        error = {k: v for k, v in error.items() if k != "headers"}
    started = row["hatch_started_at"]
    return {
        "status": row["status"],
        "operation_id": row["operation_id"],
        "egg_id": row["egg_id"],
        "error": error,
        "started_at": iso(started) if started is not None else None,
    }


# --- worker: the polling fallback ----------------------------------------------------------


async def schedule_poll(
    redis: ArqRedis, settings: Settings, user_id: str, key: str, delay_s: float
) -> None:
    """Queue a poll `delay_s` from now. Polls due in the same slot share one job id, so two
    schedulers (the chain and the cron) never double the rate. A lost job is the cron's."""
    knobs = Knobs.of(settings)
    slot = int((time.time() + delay_s) / max(knobs.poll_every_s, 0.5))
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


async def _wake_shard(ctx: dict[str, Any], shard: int) -> None:
    await wake(ctx["redis"], ctx["settings"].queue_name, shard)


def _failure(code: str, status: int, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return HatchedProblem(status, code, title, detail, extra=extra).stored()


async def poll_operation(ctx: dict[str, Any], user_id: str, audience_key: str) -> str:
    """One poll of a hatch whose buddy.hatched has not come; re-queues itself until it ends."""
    settings: Settings = ctx["settings"]
    pool: store.Pool = ctx["pool"]
    knobs = Knobs.of(settings)
    hatched: HatchedAPI | None = ctx.get("hatched")
    age = await _hatch_age(pool, user_id, audience_key)
    if age is None:
        return "done"  # completed, failed or restarted meanwhile: nothing to poll
    if age < knobs.poll_after_s:
        await schedule_poll(ctx["redis"], settings, user_id, audience_key, knobs.poll_after_s - age)
        return "waiting"
    if hatched is None:
        return "hatched_api_not_configured"
    row = await _start_poll(pool, user_id, audience_key)
    if row is None:
        return "done"
    if row["age_s"] > knobs.poll_max_s:
        error = _failure(
            "hatch_timeout",
            504,
            "Hatch timed out",
            f"no buddy {knobs.poll_max_s:g}s after the hatch started; the next bootstrap "
            "call retries",
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
        delay = knobs.poll_every_s
    except HatchedAPIError as exc:
        log.warning("bootstrap_poll_error", user_id=user_id, error=str(exc))
        retry_after = exc.retry_after_s if isinstance(exc, RateLimited) else 0.0
        delay = max(knobs.poll_every_s, retry_after)
    await schedule_poll(ctx["redis"], settings, user_id, audience_key, delay)
    return "pending"


async def poll_stalled_hatches(ctx: dict[str, Any]) -> int:
    """Cron: poll hatches whose poll job was lost (Redis flushed, worker killed); finish rows
    whose buddy is already mirrored. Bounded work per run."""
    pool: store.Pool = ctx["pool"]
    rows = await _stalled(pool, Knobs.of(ctx["settings"]), 20)
    for row in rows:
        await poll_operation(ctx, row["user_id"], row["audience_key"])
    completed = await _complete_mirrored(pool)
    if rows or completed:
        log.info("bootstrap_stalled_polled", polled=len(rows), completed=completed)
    return len(rows)
