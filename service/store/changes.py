"""The change feed's table: the entries the apply statement writes, the reads, the pruning.

Readers see an entry only once every transaction older than its own has ended (the snapshot's
xmin, sql/0010_changes.sql), so the feed is in commit order: nothing new ever sorts before
what a reader has already passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from service.store.pool import Executor


# A part of WRITE_BATCH (service/store/buddies.py): the batch's entries as one JSON array.
# The table's defaults give each row its transaction id and sequence; `at` is its time.
def insert_changes(rows: str, at: str) -> str:
    return f"""
INSERT INTO changes (buddy_id, user_id, audience, version, cause_kind, delivery_id,
                     event_type, changed, committed_at)
SELECT buddy_id, user_id, audience, version, cause_kind, delivery_id, event_type, changed, {at}
FROM jsonb_populate_recordset(NULL::changes, {rows}::jsonb)
"""


@dataclass(frozen=True, order=True, slots=True)
class Position:
    """A place in the feed: after the entry (txid, id). (xmin, 0) is "after everything of the
    transactions below xmin"."""

    txid: int
    id: int


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX = 2**63  # every part is a Postgres bigint


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position and when a reader was there: the entry's commit time for a change_id, the
    time of the read for a next_cursor past an empty or filtered page. The token is fixed-width
    hex of (txid, id, microseconds), so string order is feed order; the time is what makes a
    cursor "older than the retention"."""

    position: Position
    at: datetime

    def token(self) -> str:
        micros = (self.at - _EPOCH) // timedelta(microseconds=1)
        return f"{self.position.txid:016x}{self.position.id:016x}{micros:016x}"

    @classmethod
    def parse(cls, token: str) -> Cursor | None:
        """None for anything this feed cannot have issued."""
        if len(token) != 48 or token.strip("0123456789abcdef"):
            return None
        txid, id_, micros = (int(token[i : i + 16], 16) for i in (0, 16, 32))
        if max(txid, id_, micros) >= _MAX:
            return None
        try:
            at = _EPOCH + timedelta(microseconds=micros)
        except OverflowError:
            return None
        return cls(Position(txid, id_), at)


START = Position(0, 0)

# Where readers may read up to, and where pruning stopped. `held`: entries of ended
# transactions wait behind an older one still running (a reader should look again soon).
# Asked as the newest txid (the primary key's last entry) rather than EXISTS (... txid >=
# xmin): xmin is known only at run time, so the planner guessed a third of the feed would
# match and scanned the table for the first, which on an idle feed (nothing matches) read
# all of it on every page and every stream poll.
FEED_BOUNDS = """
SELECT s.xmin, h.txid AS pruned_txid, h.id AS pruned_id,
       coalesce((SELECT max(txid) FROM changes) >= s.xmin, false) AS held
FROM (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin) AS s
CROSS JOIN changes_horizon AS h
"""


@dataclass(frozen=True, slots=True)
class Bounds:
    xmin: int
    pruned: Position
    held: bool


async def feed_bounds(conn: Executor) -> Bounds:
    row = await conn.fetchrow(FEED_BOUNDS)
    assert row is not None
    return Bounds(row["xmin"], Position(row["pruned_txid"], row["pruned_id"]), row["held"])


# A `changes` row's change_id (fixed-width hex of txid, id and commit microseconds: see Cursor)
# and the change's JSON, as the API pages and subscriptions send it. The JSON is built by
# Postgres and passed through as it is: rendering a thousand entries in Python cost more than
# reading them.
CHANGE_ID = """lpad(to_hex(c.txid), 16, '0') || lpad(to_hex(c.id), 16, '0')
    || lpad(to_hex((extract(epoch FROM c.committed_at) * 1000000)::bigint), 16, '0')"""
CHANGE_DOC = """json_build_object(
    'change_id', change_id,
    'buddy_id', buddy_id, 'user_id', user_id, 'audience', audience, 'version', version,
    'committed_at', to_char(committed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    'cause', json_build_object('kind', cause_kind, 'delivery_id', delivery_id,
                               'event_type', event_type),
    'changed', changed
)::text"""

# Keyset over the primary key, or the buddy or user index when one of those filters is given
# (each plan is made for its parameters: plan_cache_mode = force_custom_plan).
CHANGES_PAGE = f"""
SELECT txid, id, change_id, {CHANGE_DOC} AS doc
FROM (
    SELECT c.*, {CHANGE_ID} AS change_id
    FROM changes AS c
    WHERE (txid, id) > ($1, $2) AND txid < $3
      AND ($4::text IS NULL OR buddy_id = $4)
      AND ($5::text IS NULL OR user_id = $5)
      AND ($6::text[] IS NULL OR changed ?| $6)
    ORDER BY txid, id
    LIMIT $7
) AS page
ORDER BY txid, id
"""


async def changes_page(
    conn: Executor,
    after: Position,
    below_txid: int,
    *,
    buddy_id: str | None = None,
    user_id: str | None = None,
    fields: Sequence[str] | None = None,
    limit: int,
) -> list[asyncpg.Record]:
    """Entries after `after` of transactions below `below_txid` (a snapshot's xmin)."""
    return list(
        await conn.fetch(
            CHANGES_PAGE,
            after.txid,
            after.id,
            below_txid,
            buddy_id,
            user_id,
            list(fields) if fields else None,
            limit,
        )
    )


# Oldest first, by feed order, stopping at the first entry still within retention: a bounded
# read of the primary key per batch, however large the feed. The horizon remembers the last
# entry deleted, so a cursor that far behind is told it missed entries (410).
PRUNE_CHANGES = """
WITH head AS (
    SELECT txid, id, committed_at FROM changes ORDER BY txid, id LIMIT $2
),
keep AS (
    SELECT min(txid) AS txid FROM head
    WHERE committed_at >= now() - make_interval(secs => $1)
),
gone AS (
    DELETE FROM changes AS c
    USING head AS h
    WHERE c.txid = h.txid AND c.id = h.id
      AND h.txid < coalesce((SELECT txid FROM keep), 9223372036854775807)
    RETURNING c.txid, c.id
),
last AS (
    SELECT txid, id FROM gone ORDER BY txid DESC, id DESC LIMIT 1
),
moved AS (
    UPDATE changes_horizon AS z SET txid = l.txid, id = l.id
    FROM last AS l
    WHERE (l.txid, l.id) > (z.txid, z.id)
)
SELECT count(*) FROM gone
"""


async def prune_changes(conn: Executor, older_than_s: float, limit: int) -> int:
    deleted: int = await conn.fetchval(PRUNE_CHANGES, older_than_s, limit)
    return deleted
