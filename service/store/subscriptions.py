"""Subscriptions and their outboxes (sql/0014_subscriptions.sql): the admin API's rows, and the
statements the worker's sender runs for the subscriptions it owns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from service.store.changes import CHANGE_DOC, CHANGE_ID, Position
from service.store.pool import Conn, Executor

# Session advisory locks in their own space (two-key form): holding one is owning the
# subscription, so exactly one worker process sends its changes at a time; the lock goes with
# the connection if the process dies.
SUBSCRIPTION_LOCK_SPACE = 73_113
# Tells every worker's sender that a subscription was created, deleted or enabled.
SUBSCRIPTIONS_CHANNEL = "hatched_mirror_subscriptions"

# What a lag is counted from: the outbox, plus the feed past the cursor that the filter keeps.
# Counted up to LAG_COUNT_MAX entries, so that the status of a subscription disabled for days
# (and every scrape, which reads it) stays a bounded read.
LAG_COUNT_MAX = 1_000_000
_FEED_AHEAD = """
FROM changes AS c
WHERE (c.txid, c.id) > (s.cursor_txid, s.cursor_id)
  AND (s.fields IS NULL OR c.changed ?| s.fields)
"""
_STATS = f"""
    least({LAG_COUNT_MAX}, (
        SELECT count(*) FROM (
            SELECT 1 FROM subscription_outbox AS o
            WHERE o.subscription_id = s.subscription_id LIMIT {LAG_COUNT_MAX}
        ) AS queued
    ) + (
        SELECT count(*) FROM (SELECT 1 {_FEED_AHEAD} LIMIT {LAG_COUNT_MAX}) AS ahead
    )) AS lag,
    coalesce(
        (SELECT c.committed_at FROM subscription_outbox AS o
         JOIN changes AS c ON c.txid = o.txid AND c.id = o.id
         WHERE o.subscription_id = s.subscription_id ORDER BY o.txid, o.id LIMIT 1),
        (SELECT c.committed_at {_FEED_AHEAD} ORDER BY c.txid, c.id LIMIT 1)
    ) AS oldest_pending_at
"""
_COLUMNS = """
s.subscription_id, s.url, s.fields, s.description, s.status, s.created_at, s.last_success_at,
s.last_error, s.failing_since
"""

# A new subscription starts at the feed's present: every change committed from now on (and
# those of transactions still running, which sort after the xmin).
# The NOTIFY (sent at commit) has the workers' senders look at once.
CREATE = f"""
WITH created AS (
    INSERT INTO subscriptions (subscription_id, url, fields, description, secret,
                               cursor_txid, cursor_id)
    SELECT $1, $2, $3, $4, $5, pg_snapshot_xmin(pg_current_snapshot())::text::bigint, 0
    WHERE (SELECT count(*) FROM subscriptions) < $6
    RETURNING subscription_id, url, fields, description, secret, status, created_at
)
SELECT created.*, pg_notify('{SUBSCRIPTIONS_CHANNEL}', created.subscription_id) FROM created
"""

LIST = f"""
SELECT {_COLUMNS}, {_STATS} FROM subscriptions AS s ORDER BY s.created_at, s.subscription_id
"""
GET = f"SELECT {_COLUMNS}, {_STATS} FROM subscriptions AS s WHERE s.subscription_id = $1"
DELETE = f"""
WITH gone AS (DELETE FROM subscriptions WHERE subscription_id = $1 RETURNING 1)
SELECT count(*) AS deleted, (SELECT count(pg_notify('{SUBSCRIPTIONS_CHANNEL}', $1))
                             FROM gone) AS notified FROM gone
"""
# A disabled subscription resumes where it stopped: its outbox is due at once.
ENABLE = f"""
WITH enabled AS (
    UPDATE subscriptions SET status = 'active', failing_since = NULL
    WHERE subscription_id = $1
    RETURNING subscription_id
),
due AS (
    UPDATE subscription_outbox AS o SET next_attempt_at = now()
    FROM enabled AS e WHERE o.subscription_id = e.subscription_id
)
SELECT count(*) AS enabled, (SELECT count(pg_notify('{SUBSCRIPTIONS_CHANNEL}', $1))
                             FROM enabled) AS notified FROM enabled
"""


async def create(
    conn: Executor,
    subscription_id: str,
    url: str,
    fields: Sequence[str] | None,
    description: str | None,
    secret: str,
    max_subscriptions: int,
) -> asyncpg.Record | None:
    """The new row, or None when `max_subscriptions` exist already."""
    row: asyncpg.Record | None = await conn.fetchrow(
        CREATE,
        subscription_id,
        url,
        list(fields) if fields is not None else None,
        description,
        secret,
        max_subscriptions,
    )
    return row


async def list_all(conn: Executor) -> list[asyncpg.Record]:
    return list(await conn.fetch(LIST))


async def get(conn: Executor, subscription_id: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(GET, subscription_id)
    return row


async def delete(conn: Executor, subscription_id: str) -> bool:
    return bool(await conn.fetchval(DELETE, subscription_id))


async def enable(conn: Executor, subscription_id: str) -> bool:
    return bool(await conn.fetchval(ENABLE, subscription_id))


# --- The sender's statements (service/subscriptions/sender.py) ---

# The subscriptions some worker should be sending for.
SENDABLE = """
SELECT subscription_id, url, fields, secret, cursor_txid, cursor_id
FROM subscriptions WHERE status <> 'disabled' ORDER BY subscription_id
"""
TRY_OWN = f"SELECT pg_try_advisory_lock({SUBSCRIPTION_LOCK_SPACE}, hashtext($1))"
DISOWN = f"SELECT pg_advisory_unlock({SUBSCRIPTION_LOCK_SPACE}, hashtext($1))"


@dataclass(frozen=True, slots=True)
class Sendable:
    subscription_id: str
    url: str
    fields: tuple[str, ...] | None
    secret: str
    cursor: Position


async def sendable(conn: Executor) -> list[Sendable]:
    return [
        Sendable(
            r["subscription_id"],
            r["url"],
            tuple(r["fields"]) if r["fields"] is not None else None,
            r["secret"],
            Position(r["cursor_txid"], r["cursor_id"]),
        )
        for r in await conn.fetch(SENDABLE)
    ]


async def try_own(conn: Conn, subscription_id: str) -> bool:
    return bool(await conn.fetchval(TRY_OWN, subscription_id))


async def disown(conn: Conn, subscription_id: str) -> None:
    await conn.execute(DISOWN, subscription_id)


# A change as the sender holds it, from a FROM item `page` of `changes` columns plus change_id,
# attempts and due_in_s: its place, buddy, the change's JSON and id exactly as GET /v1/changes
# has them.
_PENDING = f"""
SELECT page.txid, page.id, page.buddy_id, page.committed_at, page.change_id,
       {CHANGE_DOC} AS doc, page.attempts, page.due_in_s
"""

# Copy the next visible feed entries past the cursor that the filter keeps into the outbox, and
# move the cursor past everything scanned, in one statement; answers the entries queued (with
# their JSON) and, on every row, what was scanned, the cursor after and `held`. Visible: of
# transactions below the snapshot's xmin, so the cursor never passes an entry that commits
# later (see service/store/changes.py). `held`: entries past the cursor wait behind an older
# transaction still running. With nothing queued the answer is one row of nulls and those.
FILL = f"""
WITH bound AS (
    SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin
),
scan AS (
    SELECT c.txid, c.id, c.buddy_id, c.changed
    FROM changes AS c
    WHERE (c.txid, c.id) > ($2, $3) AND c.txid < (SELECT xmin FROM bound)
    ORDER BY c.txid, c.id
    LIMIT $5
),
queued AS (
    INSERT INTO subscription_outbox (subscription_id, txid, id, buddy_id)
    SELECT $1, txid, id, buddy_id FROM scan
    WHERE $4::text[] IS NULL OR changed ?| $4::text[]
    ON CONFLICT DO NOTHING
    RETURNING txid, id
),
last AS (
    SELECT txid, id FROM scan ORDER BY txid DESC, id DESC LIMIT 1
),
moved AS (
    UPDATE subscriptions AS s SET cursor_txid = l.txid, cursor_id = l.id
    FROM last AS l WHERE s.subscription_id = $1
    RETURNING s.cursor_txid, s.cursor_id
),
meta AS (
    SELECT (SELECT count(*) FROM scan) AS scanned,
           (SELECT cursor_txid FROM moved) AS cursor_txid,
           (SELECT cursor_id FROM moved) AS cursor_id,
           -- The newest entry, from the end of the primary key (as FEED_BOUNDS does).
           coalesce((SELECT max(txid) FROM changes) >= (SELECT xmin FROM bound), false) AS held
)
SELECT meta.*, e.*
FROM meta LEFT JOIN (
    {_PENDING}
    FROM (
        SELECT c.*, {CHANGE_ID} AS change_id, 0 AS attempts, 0::float8 AS due_in_s
        FROM queued AS q JOIN changes AS c ON c.txid = q.txid AND c.id = q.id
    ) AS page
) AS e ON true
ORDER BY e.txid, e.id
"""


@dataclass(frozen=True, slots=True)
class Pending:
    """An outbox entry: a change not yet acknowledged by the subscription's endpoint."""

    position: Position
    buddy_id: str
    attempts: int
    # Seconds until it may be sent (a retry's backoff left; 0 or less: now).
    due_in_s: float
    committed_at: datetime
    change_id: str
    doc: str


def _pending(row: asyncpg.Record) -> Pending:
    return Pending(
        Position(row["txid"], row["id"]),
        row["buddy_id"],
        row["attempts"],
        row["due_in_s"],
        row["committed_at"],
        row["change_id"],
        row["doc"],
    )


@dataclass(frozen=True, slots=True)
class Filled:
    scanned: int
    queued: list[Pending]
    cursor: Position | None  # None: nothing scanned, or the subscription is gone
    held: bool


async def fill(
    conn: Executor,
    subscription_id: str,
    cursor: Position,
    fields: Sequence[str] | None,
    limit: int,
) -> Filled:
    rows = await conn.fetch(
        FILL,
        subscription_id,
        cursor.txid,
        cursor.id,
        list(fields) if fields is not None else None,
        limit,
    )
    first = rows[0]
    moved = first["cursor_txid"]
    return Filled(
        first["scanned"],
        [_pending(r) for r in rows if r["txid"] is not None],
        Position(moved, first["cursor_id"]) if moved is not None else None,
        first["held"],
    )


# The outbox as a new owner finds it (what the previous one had not had acknowledged), oldest
# first, with each entry's backoff left.
LOAD = f"""
{_PENDING}
FROM (
    SELECT c.*, {CHANGE_ID} AS change_id, o.attempts,
           extract(epoch FROM o.next_attempt_at - now())::float8 AS due_in_s
    FROM subscription_outbox AS o
    JOIN changes AS c ON c.txid = o.txid AND c.id = o.id
    WHERE o.subscription_id = $1
    ORDER BY o.txid, o.id
    LIMIT $2
) AS page
ORDER BY page.txid, page.id
"""


async def load(conn: Executor, subscription_id: str, limit: int) -> list[Pending]:
    rows = await conn.fetch(LOAD, subscription_id, limit)
    return [_pending(r) for r in rows]


# The outcomes of a round of sends, in one statement: acknowledged entries leave the outbox;
# failed ones wait out their backoff. A success clears the failing clock; a failure starts it,
# and failing with no success for longer than the limit disables the subscription (keeping
# cursor and outbox, so an enable resumes where it stopped). Answers the status after, or
# null if the subscription was deleted.
SETTLE = """
WITH acked AS (
    DELETE FROM subscription_outbox AS o
    USING unnest($2::bigint[], $3::bigint[]) AS a(txid, id)
    WHERE o.subscription_id = $1 AND o.txid = a.txid AND o.id = a.id
    RETURNING 1
),
failed AS (
    UPDATE subscription_outbox AS o
    SET attempts = o.attempts + 1, next_attempt_at = now() + make_interval(secs => f.delay)
    FROM unnest($4::bigint[], $5::bigint[], $6::float8[]) AS f(txid, id, delay)
    WHERE o.subscription_id = $1 AND o.txid = f.txid AND o.id = f.id
    RETURNING 1
),
counts AS (
    SELECT cardinality($2::bigint[]) AS acked, cardinality($4::bigint[]) AS failed
)
UPDATE subscriptions AS s SET
    last_success_at = CASE WHEN n.acked > 0 THEN now() ELSE s.last_success_at END,
    last_error = CASE WHEN n.failed > 0 THEN $7 ELSE s.last_error END,
    failing_since = CASE
        WHEN n.acked > 0 THEN NULL
        WHEN n.failed > 0 THEN coalesce(s.failing_since, now())
        ELSE s.failing_since
    END,
    status = CASE
        WHEN s.status = 'disabled' THEN 'disabled'
        WHEN n.failed = 0 THEN CASE WHEN n.acked > 0 THEN 'active' ELSE s.status END
        WHEN n.acked = 0
             AND coalesce(s.failing_since, now()) <= now() - make_interval(secs => $8)
             THEN 'disabled'
        ELSE 'failing'
    END
FROM counts AS n
WHERE s.subscription_id = $1
RETURNING s.status
"""


async def settle(
    conn: Executor,
    subscription_id: str,
    acked: Sequence[Position],
    failed: Sequence[tuple[Position, float]],
    error: str | None,
    disable_after_s: float,
) -> str | None:
    """Record a round's outcomes; the subscription's status after, None if it is gone.

    A round with any failure leaves the subscription `failing`; only rounds with failures and
    no success count towards disabling it (a success shows the endpoint is up: a change it
    keeps refusing holds back only its own buddy, and shows as lag)."""
    status: str | None = await conn.fetchval(
        SETTLE,
        subscription_id,
        [p.txid for p in acked],
        [p.id for p in acked],
        [p.txid for p, _ in failed],
        [p.id for p, _ in failed],
        [delay for _, delay in failed],
        error,
        disable_after_s,
    )
    return status


# Per subscription, for the metrics (read at scrape time, like the inbox gauges).
STATS = f"SELECT s.subscription_id, s.status, {_STATS} FROM subscriptions AS s"


async def stats(conn: Executor) -> list[asyncpg.Record]:
    return list(await conn.fetch(STATS))
