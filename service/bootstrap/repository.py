"""The `bootstraps` table: one row per user and audience guards the flow."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from service import store
from service.apply.projector import Buddy
from service.config import Settings

log = structlog.get_logger(__name__)


CHANNEL = "hatched_mirror_bootstraps"
POLL_JOB = "bootstrap_poll"


LEASE_S = 90.0
# Statuses of an egg that may be hatched as they are (anything else is "waiting": mark it ready).


# --- Postgres ------------------------------------------------------------------------------

CLAIM = """
INSERT INTO bootstraps (user_id, audience_key, audience, status, claim)
VALUES ($1, $2, $3, 'starting', $4)
ON CONFLICT (user_id, audience_key) DO NOTHING
RETURNING *
"""

# A failed or completed-but-unmirrored row is retried by the next call (when $5); a request
# that died mid-flow, or a hatch nobody finished, is taken over once its lease has run out.
# The attempt before it is returned too (previous_*): a hatch that outlasted the poll may still
# be running at Hatched, and the new attempt asks about it before it makes anything new.
TAKE_OVER = """
UPDATE bootstraps AS b
SET status = 'starting', claim = $3, attempts = attempts + 1, error = NULL, operation_id = NULL,
    buddy_id = NULL, hatch_started_at = NULL, polls = 0, polled_at = NULL, updated_at = now()
FROM (
    SELECT operation_id AS previous_operation_id, egg_id AS previous_egg_id FROM bootstraps
    WHERE user_id = $1 AND audience_key = $2
    FOR UPDATE
) AS before
WHERE b.user_id = $1 AND b.audience_key = $2
  AND (($5 AND b.status IN ('failed', 'completed'))
       OR (b.status IN ('starting', 'mirroring')
           AND b.updated_at < now() - make_interval(secs => $4))
       OR (b.status = 'hatching' AND b.hatch_started_at < now() - make_interval(secs => $6)))
RETURNING b.*, before.previous_operation_id, before.previous_egg_id
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


async def _stalled(pool: store.Pool, settings: Settings, limit: int) -> list[asyncpg.Record]:
    return await pool.fetch(
        STALLED, settings.bootstrap_poll_after_s, settings.bootstrap_stalled_after_s, limit
    )


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
