"""Erasure of an end user and the tombstones it leaves (sql/0011_erasure.sql).

Every table that holds something of an erased user is in ERASED_TABLES, in one place: a table
added later that holds user or buddy data gets its DELETE here, and the whole list runs as one
statement inside the erasure's transaction (service/erasure.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from service.store.inbox import SHARD_LOCK_SPACE
from service.store.pool import Conn, Executor

# The user's buddies as the mirror knows them, and the buddies its bootstrap rows name.
USER_BUDDIES = """
SELECT buddy_id FROM buddies WHERE user_id = $1
UNION
SELECT buddy_id FROM bootstraps WHERE user_id = $1 AND buddy_id IS NOT NULL
"""

# Deliveries not applied yet (pending, dead, unmapped, duplicate: the partial status index) whose
# raw body names the user: the buddy they are about may not be in `buddies` yet (a hatch still
# waiting in the inbox). The byte search is only a filter; the caller parses each one and keeps
# those whose event names this user as owner. Applied deliveries need no search: their buddy is
# in `buddies`.
#
# The waiting seqs come from the partial status index as an array, so each delivery is one
# primary-key probe: joined instead, the planner reads the whole inbox to filter bodies first.
UNAPPLIED_NAMING = """
SELECT d.seq, d.delivery_id, d.format, d.headers, d.body, d.signed_at
FROM deliveries AS d
WHERE d.seq = ANY(ARRAY(SELECT s.seq FROM delivery_states AS s WHERE s.status <> 'applied'))
  AND d.buddy_id IS NOT NULL
  AND position(convert_to($1::text, 'UTF8') IN d.body) > 0
"""

# Deliveries about no buddy (unreadable, or of a type that names none) whose body holds the user
# id as a JSON string: personal data with nothing to apply. `deliveries_buddy_idx` serves
# `buddy_id IS NULL`, so this reads only such rows, which are few (dead and unmapped ones).
BUDDYLESS_NAMING = """
SELECT seq FROM deliveries
WHERE buddy_id IS NULL AND position(convert_to($1::text, 'UTF8') IN body) > 0
"""

# Transaction-level shard locks in the apply path's lock space (service/store/inbox.py): they
# wait for a worker draining the shard and keep the next one out until commit. Taken in sorted
# order, like the buddy rows after them, so erasures and workers never wait on each other in a
# cycle.
LOCK_SHARDS_XACT = f"""
SELECT pg_advisory_xact_lock({SHARD_LOCK_SPACE}, s) FROM unnest($1::int[]) AS s ORDER BY s
"""

# Holds off every new insert into the inbox (receiver, refresh, backfill) until the erasure
# commits, and waits for the ones in flight to commit first; those are then deleted below, and
# the later ones see the tombstones. SHARE ROW EXCLUSIVE rather than SHARE so that two erasures
# queue instead of deadlocking on their DELETEs. Held for the few milliseconds the deletes take.
LOCK_INBOX = "LOCK TABLE deliveries IN SHARE ROW EXCLUSIVE MODE"

# The parameters every statement below may use: $1 the user id (text), $2 the user's buddy ids
# (text[]), $3 further deliveries to delete (bigint[]: those about no buddy that name the
# user), $4 backfill checkpoint keys of runs that named only this user or its buddies (text[]).
ERASED_TABLES: tuple[tuple[str, str], ...] = (
    ("ledger", "DELETE FROM ledger WHERE buddy_id = ANY($2::text[])"),
    (
        # One IN list (not an OR of two): each state row is then a primary-key probe.
        "delivery_states",
        "DELETE FROM delivery_states WHERE seq IN"
        " (SELECT seq FROM deliveries WHERE buddy_id = ANY($2::text[])"
        " UNION ALL SELECT unnest($3::bigint[]))",
    ),
    (
        "deliveries",
        "DELETE FROM deliveries WHERE buddy_id = ANY($2::text[]) OR seq = ANY($3::bigint[])",
    ),
    (
        "bootstraps",
        "DELETE FROM bootstraps WHERE user_id = $1::text OR buddy_id = ANY($2::text[])",
    ),
    (
        "backfill_checkpoints",
        "DELETE FROM backfill_checkpoints WHERE run_key = ANY($4::text[])"
        " OR cursor = $1::text OR cursor = ANY($2::text[])",
    ),
    (
        # Also cascaded from `changes`; said here so the list stays the whole story.
        "subscription_outbox",
        "DELETE FROM subscription_outbox WHERE buddy_id = ANY($2::text[])",
    ),
    (
        "changes",
        "DELETE FROM changes WHERE buddy_id = ANY($2::text[]) OR user_id = $1::text",
    ),
    ("buddies", "DELETE FROM buddies WHERE buddy_id = ANY($2::text[])"),
)

# The payload suffix of an erasure's NOTIFY on the buddies channel (ERASE below), in place of a
# version (a stream of an erased buddy ends on it: tests/integration/test_erasure.py).
FORGOTTEN_SUFFIX = ":forgotten"

# All of it as one statement (the parts touch different tables; each sees the rows as they were
# when the statement began), answering how many rows went from each table, with a tombstone per
# buddy and NOTIFYs at commit: `<buddy_id>:forgotten` on the buddies channel drops the buddy from
# every serve process's read cache and ends its streams; the user id on the bootstraps channel
# makes that user's streams read again.
ERASE = (
    "WITH "
    + ",\n".join(f"gone_{table} AS ({sql} RETURNING 1)" for table, sql in ERASED_TABLES)
    + """,
tombstoned AS (
    INSERT INTO tombstones (buddy_hash)
    SELECT erasure_hash(b) FROM unnest($2::text[]) AS b
    ON CONFLICT (buddy_hash) DO NOTHING
    RETURNING 1
)
SELECT """
    + ", ".join(f"(SELECT count(*) FROM gone_{table}) AS {table}" for table, _ in ERASED_TABLES)
    + """,
    (SELECT count(*) FROM tombstoned) AS tombstones,
    (SELECT count(pg_notify($5::text, b || ':forgotten')) FROM unnest($2::text[]) AS b) AS notified,
    (SELECT count(pg_notify($6::text, $1::text))) AS user_notified
"""
)


async def user_buddies(conn: Executor, user_id: str) -> set[str]:
    return {r["buddy_id"] for r in await conn.fetch(USER_BUDDIES, user_id)}


async def unapplied_naming(conn: Executor, user_id: str) -> list[asyncpg.Record]:
    return list(await conn.fetch(UNAPPLIED_NAMING, user_id))


async def buddyless_naming(conn: Executor, user_id: str) -> list[int]:
    """Deliveries about no buddy whose body holds `"<user_id>"` (a JSON string of it)."""
    quoted = '"' + user_id.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return [r["seq"] for r in await conn.fetch(BUDDYLESS_NAMING, quoted)]


async def lock_shards_xact(conn: Conn, shards: Sequence[int]) -> None:
    await conn.execute(LOCK_SHARDS_XACT, sorted(set(shards)))


async def lock_inbox(conn: Conn) -> None:
    await conn.execute(LOCK_INBOX)


async def erase(
    conn: Conn,
    user_id: str,
    buddy_ids: Sequence[str],
    seqs: Sequence[int],
    checkpoint_keys: Sequence[str],
    *,
    buddies_channel: str,
    users_channel: str,
) -> dict[str, int]:
    """Delete everything listed in ERASED_TABLES and tombstone the buddies; rows per table."""
    row = await conn.fetchrow(
        ERASE,
        user_id,
        sorted(set(buddy_ids)),
        sorted(set(seqs)),
        list(checkpoint_keys),
        buddies_channel,
        users_channel,
    )
    assert row is not None
    return {table: row[table] for table, _ in ERASED_TABLES} | {"tombstones": row["tombstones"]}


FORGOTTEN_AMONG = """
SELECT b FROM unnest($1::text[]) AS b
WHERE EXISTS (SELECT 1 FROM tombstones AS t WHERE t.buddy_hash = erasure_hash(b))
"""


async def forgotten_among(conn: Executor, buddy_ids: Sequence[str]) -> set[str]:
    """Those of `buddy_ids` that were erased (have a tombstone)."""
    if not buddy_ids:
        return set()
    return {r["b"] for r in await conn.fetch(FORGOTTEN_AMONG, sorted(set(buddy_ids)))}


# Claimed deliveries of erased buddies (they raced the erasure into the inbox, or a replay
# brought them back): deleted with their state rows, a hit counted on each tombstone.
PURGE_FORGOTTEN = """
WITH x AS (
    SELECT x.buddy_id, x.seq, erasure_hash(x.buddy_id) AS hash
    FROM unnest($1::text[], $2::bigint[]) AS x(buddy_id, seq)
), gone AS (
    SELECT x.* FROM x JOIN tombstones AS t ON t.buddy_hash = x.hash
), states AS (
    DELETE FROM delivery_states WHERE seq IN (SELECT seq FROM gone)
), bodies AS (
    DELETE FROM deliveries WHERE seq IN (SELECT seq FROM gone)
), hits AS (
    UPDATE tombstones AS t SET hits = t.hits + g.n, last_hit_at = now()
    FROM (SELECT hash, count(*) AS n FROM gone GROUP BY hash) AS g
    WHERE t.buddy_hash = g.hash
)
SELECT DISTINCT buddy_id FROM gone
"""


async def purge_forgotten(conn: Conn, rows: Sequence[tuple[str, int]]) -> set[str]:
    """Of these (buddy_id, seq) deliveries, delete those of erased buddies; returns those
    buddies."""
    if not rows:
        return set()
    result = await conn.fetch(PURGE_FORGOTTEN, [b for b, _ in rows], [s for _, s in rows])
    return {r["buddy_id"] for r in result}


async def is_forgotten(conn: Executor, buddy_id: str) -> bool:
    return bool(await forgotten_among(conn, [buddy_id]))


async def count_hit(conn: Executor, buddy_id: str) -> None:
    """One more request for an erased buddy turned away (a refresh that was not made)."""
    await conn.execute(
        "UPDATE tombstones SET hits = hits + 1, last_hit_at = now()"
        " WHERE buddy_hash = erasure_hash($1)",
        buddy_id,
    )
