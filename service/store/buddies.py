"""Mirrored buddies and their ledger: the apply path's writes and the reads by key."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import fields
from datetime import datetime
from typing import Any

import asyncpg

from service.apply.projector import STATE_FIELDS, Buddy, LedgerEntry
from service.store.changes import insert_changes
from service.store.inbox import _finish_deliveries
from service.store.pool import Conn, Executor

NOTIFY_CHANNEL = "hatched_mirror_buddies"


_COLUMNS = ", ".join(STATE_FIELDS)
LOCK_BUDDIES = f"""
SELECT {_COLUMNS}, version FROM buddies
WHERE buddy_id = ANY($1::text[])
ORDER BY buddy_id
FOR UPDATE
"""


_STATE_COUNT = len(STATE_FIELDS)


def _buddy(record: asyncpg.Record) -> Buddy:
    """The state of a row selected as `_COLUMNS, ...`: its first columns, in field order
    (positional: building a dict of keywords per buddy was a cost on the apply path)."""
    return Buddy(*record[:_STATE_COUNT])


async def lock_buddies(conn: Conn, buddy_ids: Iterable[str]) -> dict[str, tuple[Buddy, int]]:
    """Current state and version of these buddies, row-locked in a fixed order (no deadlocks)."""
    rows = await conn.fetch(LOCK_BUDDIES, sorted(set(buddy_ids)))
    return {r["buddy_id"]: (_buddy(r), r["version"]) for r in rows}


_UPDATES = ", ".join(f"{name} = EXCLUDED.{name}" for name in STATE_FIELDS if name != "buddy_id")


# A whole batch in one statement (one plan, one round trip) rather than a statement per buddy:
# the rows travel as one JSON array, which Postgres turns into `buddies` records itself (JSON
# arrays to text[], objects to jsonb, ISO strings to timestamptz). `at`: the time a changed
# buddy's updated_at takes.
def _upsert_buddies(rows: str, at: str = "now()") -> str:
    return f"""
INSERT INTO buddies ({_COLUMNS}, version, updated_at)
SELECT {_COLUMNS}, version, {at}
FROM jsonb_populate_recordset(NULL::buddies, {rows}::jsonb)
ON CONFLICT (buddy_id) DO UPDATE SET {_UPDATES},
    version = EXCLUDED.version,
    updated_at = CASE WHEN EXCLUDED.version <> buddies.version THEN EXCLUDED.updated_at
                      ELSE buddies.updated_at END
"""


UPSERT_BUDDIES = _upsert_buddies("$1")


def _buddy_rows(rows: Sequence[tuple[Buddy, int]]) -> list[dict[str, object]]:
    # A Buddy's attributes are its fields (a plain dataclass), so vars() is the row.
    return [{**vars(b), "version": v} for b, v in rows]


async def save_buddies(conn: Conn, rows: Sequence[tuple[Buddy, int]]) -> None:
    """Write (state, version) pairs, one per buddy; `updated_at` moves only when the version
    did."""
    if rows:
        await conn.execute(UPSERT_BUDDIES, _buddy_rows(rows))


_LEDGER_FIELDS = tuple(f.name for f in fields(LedgerEntry))
INSERT_LEDGER = """
INSERT INTO ledger (delivery_id, seq, buddy_id, currency, amount, balance_after, reason,
                    reference_id, ledger_id, is_lucky, occurred_at)
SELECT delivery_id, seq, buddy_id, currency, amount, balance_after, reason,
       reference_id, ledger_id, is_lucky, occurred_at
FROM jsonb_populate_recordset(NULL::ledger, $2::jsonb)
ON CONFLICT (delivery_id) DO NOTHING
"""

# Everything an applied batch writes, as one statement: the buddies (as save_buddies), their
# ledger rows, the deliveries' outcomes, the change-feed entries of the buddies whose version
# grew (so no change is committed without its entry, nor an entry without its change), and
# `buddy_id:version` notifications for the read API's live streams (sent at commit). Postgres
# runs every data-modifying WITH part whether or not the query reads it; the parts touch
# different tables, so none needs another's result. One round trip instead of five per batch:
# on a busy host each costs the worker a wake-up.
#
# The changed buddies' updated_at and their entries' committed_at are one time, read by this
# statement (`written_at`: a volatile function makes the CTE evaluated once), not the
# transaction's start (now()): the claim, the locks and the projection before this statement
# took a third of a change's way to a subscriber under load (bench/BENCHMARKS.md), time in
# which nothing had changed yet. This is the last statement before the commit.
WRITTEN_AT = "(SELECT t FROM written_at)"
WRITE_BATCH = f"""
WITH written_at AS (SELECT clock_timestamp() AS t),
buddies_written AS ({_upsert_buddies("$1", WRITTEN_AT)}),
ledger_written AS ({INSERT_LEDGER}),
outcomes_written AS ({_finish_deliveries("$3", "$4", "$5")}),
changes_written AS ({insert_changes("$7", WRITTEN_AT)})
SELECT pg_notify('{NOTIFY_CHANNEL}', x) FROM unnest($6::text[]) AS x
"""


async def write_batch(
    conn: Conn,
    *,
    buddies: Sequence[tuple[Buddy, int]] = (),
    ledger: Sequence[LedgerEntry] = (),
    outcomes: Iterable[tuple[int, str, str | None]] = (),
    changed: Sequence[tuple[str, int]] = (),
    feed: Sequence[dict[str, Any]] = (),
) -> None:
    """Write (state, version) pairs (`updated_at` moves only when the version did), ledger
    entries (one per delivery: a repeat is ignored), outcomes (seq, status, reason),
    change-feed entries (service/apply/changes.py, `entry`) and notifications of changed
    buddies, in one statement."""
    seqs, statuses, reasons = [], [], []
    for seq, status, reason in outcomes:
        seqs.append(seq)
        statuses.append(status)
        reasons.append(reason)
    if not (buddies or ledger or seqs or changed or feed):
        return
    await conn.execute(
        WRITE_BATCH,
        _buddy_rows(buddies),
        # Field by field: dataclasses.asdict deep-copies, a cost on the apply path.
        [{f: getattr(e, f) for f in _LEDGER_FIELDS} for e in ledger],
        seqs,
        statuses,
        reasons,
        [f"{b}:{v}" for b, v in changed],
        feed,
    )


GET_BUDDY = f"SELECT {_COLUMNS}, version, updated_at FROM buddies WHERE buddy_id = $1"


async def get_buddy(conn: Executor, buddy_id: str) -> tuple[Buddy, int, datetime] | None:
    row = await conn.fetchrow(GET_BUDDY, buddy_id)
    if row is None:
        return None
    return _buddy(row), row["version"], row["updated_at"]


GET_VERSION = "SELECT version FROM buddies WHERE buddy_id = $1"


async def get_version(conn: Executor, buddy_id: str) -> int | None:
    version: int | None = await conn.fetchval(GET_VERSION, buddy_id)
    return version


# --- read API ------------------------------------------------------------------------------


BUDDY_IDS_PAGE = """
SELECT buddy_id FROM buddies WHERE ($1::text IS NULL OR buddy_id > $1) ORDER BY buddy_id LIMIT $2
"""


async def buddy_ids_page(conn: Executor, after: str | None, limit: int) -> list[str]:
    return [r["buddy_id"] for r in await conn.fetch(BUDDY_IDS_PAGE, after, limit)]


async def count_buddies(conn: Executor) -> int:
    count: int = await conn.fetchval("SELECT count(*) FROM buddies")
    return count


DUE_FOR_REFRESH = """
SELECT buddy_id FROM buddies
WHERE refreshed_at IS NULL OR refreshed_at < now() - make_interval(secs => $1)
ORDER BY refreshed_at NULLS FIRST, buddy_id
LIMIT $2
"""


async def due_for_refresh(conn: Executor, older_than_s: float, limit: int) -> list[str]:
    return [r["buddy_id"] for r in await conn.fetch(DUE_FOR_REFRESH, older_than_s, limit)]
