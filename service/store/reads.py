"""The read API's listings: buddies, a user's buddy, ledger and applied events, newest first."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from service.apply.projector import Buddy
from service.store.buddies import _COLUMNS, _buddy
from service.store.pool import Executor

LIST_BUDDIES = f"""
SELECT {_COLUMNS}, version, updated_at FROM buddies
WHERE ($1::text IS NULL OR user_id = $1)
  AND ($2::text IS NULL OR audience = $2)
  AND ($3::text IS NULL OR buddy_id > $3)
ORDER BY buddy_id
LIMIT $4
"""


async def list_buddies(
    conn: Executor, *, user_id: str | None, audience: str | None, after: str | None, limit: int
) -> list[tuple[Buddy, int, datetime]]:
    rows = await conn.fetch(LIST_BUDDIES, user_id, audience, after, limit)
    return [(_buddy(r), r["version"], r["updated_at"]) for r in rows]


BUDDY_OWNER = "SELECT user_id, audience FROM buddies WHERE buddy_id = $1"


async def buddy_owner(conn: Executor, buddy_id: str) -> tuple[str | None, str | None] | None:
    """Whose buddy it is (user id, audience), for user tokens; None when there is no such buddy."""
    row = await conn.fetchrow(BUDDY_OWNER, buddy_id)
    return (row["user_id"], row["audience"]) if row is not None else None


USER_BUDDY = f"""
SELECT {_COLUMNS}, version, updated_at FROM buddies
WHERE user_id = $1 AND ($2::text IS NULL OR audience = $2)
ORDER BY hatched_at DESC NULLS LAST, created_at DESC, buddy_id
LIMIT 1
"""


async def user_buddy(
    conn: Executor, user_id: str, audience: str | None
) -> tuple[Buddy, int, datetime] | None:
    row = await conn.fetchrow(USER_BUDDY, user_id, audience)
    return (_buddy(row), row["version"], row["updated_at"]) if row is not None else None


LIST_LEDGER = """
SELECT delivery_id, seq, currency, amount, balance_after, reason, reference_id, ledger_id,
       is_lucky, occurred_at
FROM ledger
WHERE buddy_id = $1
  AND ($2::text IS NULL OR currency = $2)
  AND ($3::timestamptz IS NULL OR (occurred_at, seq) < ($3, $4))
ORDER BY occurred_at DESC, seq DESC
LIMIT $5
"""


async def list_ledger(
    conn: Executor,
    buddy_id: str,
    *,
    currency: str | None,
    before: tuple[datetime, int] | None,
    limit: int,
) -> list[asyncpg.Record]:
    at, seq = before if before is not None else (None, None)
    return list(await conn.fetch(LIST_LEDGER, buddy_id, currency, at, seq, limit))


LIST_EVENTS = """
SELECT d.seq, d.delivery_id, d.event_id, d.event_type, d.format, d.occurred_at, d.received_at,
       s.applied_at
FROM deliveries AS d JOIN delivery_states AS s ON s.seq = d.seq
WHERE d.buddy_id = $1 AND s.status = 'applied' AND ($2::bigint IS NULL OR d.seq < $2)
ORDER BY d.seq DESC
LIMIT $3
"""


async def list_events(
    conn: Executor, buddy_id: str, *, before: int | None, limit: int
) -> list[asyncpg.Record]:
    return list(await conn.fetch(LIST_EVENTS, buddy_id, before, limit))
