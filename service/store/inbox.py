"""The inbox: stored deliveries (`deliveries`) and their outcomes (`delivery_states`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, NamedTuple

import asyncpg
import orjson

from service.store.pool import Conn, Executor

# Shard locks live in their own advisory-lock space (two-key form) so they never meet the above.
SHARD_LOCK_SPACE = 73_112


# --- the inbox -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewDelivery:
    delivery_id: str
    format: str
    event_type: str | None
    event_id: str | None
    buddy_id: str | None
    shard: int
    occurred_at: datetime | None
    signed_at: datetime
    headers: dict[str, str]
    body: bytes
    status: str
    reason: str | None
    # sha256 of the webhook's "{timestamp}.{hmac}" (None for REST snapshots): the replay key.
    signature: bytes | None = None
    # The event's data as JSON text (service.ingest.events.stored_data) and the version of the
    # normaliser that wrote it: the worker applies this rather than parsing the body again.
    event_data: str | None = None
    event_parser: int | None = None

    def row(self) -> tuple[object, ...]:
        """Its fields in the order of the type inbox_delivery, the headers as JSON text."""
        return (
            self.delivery_id,
            self.format,
            self.event_type,
            self.event_id,
            self.buddy_id,
            self.shard,
            self.occurred_at,
            self.signed_at,
            orjson.dumps(self.headers).decode(),
            self.body,
            self.status,
            self.reason,
            self.signature,
            self.event_data,
            self.event_parser,
        )


async def insert_delivery(conn: Executor, d: NewDelivery) -> Stored:
    """The seq of the stored row, None when the delivery id was already stored, or FORGOTTEN."""
    return (await insert_deliveries(conn, [d]))[0]


# The raw delivery and its state row in one statement: both or neither; a delivery of an erased
# buddy is not stored, and one whose id or signature was stored before is skipped. The
# statement is a function (sql/0017_store_deliveries.sql) so that Postgres plans it once per
# connection instead of on every flush, where planning was a quarter of the flush's time; its
# argument is one array of rows (sql/0018_store_delivery_rows.sql), which asyncpg encodes in
# about half the CPU of one array per column.
INSERT_DELIVERIES = "SELECT delivery_id, seq FROM store_deliveries($1::inbox_delivery[])"

# What storing a delivery came to: its seq, None when its id (or its signature: a replay) was
# stored before, or FORGOTTEN when its buddy was erased (nothing stored).
FORGOTTEN: Final = "forgotten"
Stored = int | None | Literal["forgotten"]


async def insert_deliveries(conn: Executor, batch: Sequence[NewDelivery]) -> list[Stored]:
    """Store many deliveries in one statement; for each, its seq, None if already stored (a
    delivery id or signature repeated inside the batch counts as stored by its first
    occurrence), or FORGOTTEN if its buddy was erased."""
    first: dict[str, NewDelivery] = {}
    signatures: set[bytes] = set()
    for d in batch:
        if d.delivery_id in first or (d.signature is not None and d.signature in signatures):
            continue
        first[d.delivery_id] = d
        if d.signature is not None:
            signatures.add(d.signature)
    stored: dict[str, Stored] = {}
    for r in await conn.fetch(INSERT_DELIVERIES, [d.row() for d in first.values()]):
        stored[r["delivery_id"]] = r["seq"] if r["seq"] is not None else FORGOTTEN
    out: list[Stored] = []
    for d in batch:
        outcome = stored.get(d.delivery_id)
        if first.get(d.delivery_id) is not d:
            # A repeat inside the batch: a duplicate, but forgotten with a forgotten first.
            outcome = FORGOTTEN if outcome == FORGOTTEN else None
        out.append(outcome)
    return out


PRUNE_SIGNATURES = """
DELETE FROM delivery_signatures WHERE signed_at < now() - make_interval(secs => $1)
"""


async def prune_signatures(conn: Executor, older_than_s: float) -> int:
    """Forget signatures that can no longer pass the timestamp check (they are refused as
    stale before any lookup)."""
    result = await conn.execute(PRUNE_SIGNATURES, older_than_s)
    return int(result.split()[-1])


# A delivery the worker may apply now: pending, and not backing off after a failed attempt.
# Every query below reads it as `delivery_states AS s`; `status = 'accepted'` is the pending
# index's predicate, so each of them can take that index.
_DUE = "s.status = 'accepted' AND (s.next_attempt_at IS NULL OR s.next_attempt_at <= now())"


# What the worker reads of a stored delivery: the event as the receiver stored it when the
# normaliser that wrote it is the worker's own (`parser`, the parameter holding
# service.ingest.events.PARSER), else the raw headers and body to parse again (an older row, a
# REST snapshot, a dead delivery replayed). Only one of the two is sent: the body is most of a
# row's bytes.
def _stored(parser: str) -> str:
    return f"""d.delivery_id, d.format, d.signed_at, d.event_type, d.event_id, d.buddy_id,
       d.occurred_at,
       CASE WHEN d.event_parser = {parser}::smallint THEN d.event_data END AS event_data,
       CASE WHEN d.event_parser IS DISTINCT FROM {parser}::smallint THEN d.headers END AS headers,
       CASE WHEN d.event_parser IS DISTINCT FROM {parser}::smallint THEN d.body END AS body"""


# Up to $2 due deliveries from each of the shards $1 (each an index range of the pending
# index), locked, in receipt order: a buddy's deliveries share a shard, so each buddy's come
# in order. One shard for a wake-up job; several when a job takes on idle shards.
CLAIM_BATCH = f"""
SELECT c.seq, sh.shard, c.attempts, c.replayed, {_stored("$3")}
FROM unnest($1::int[]) AS sh(shard)
CROSS JOIN LATERAL (
    SELECT s.seq, s.attempts, s.replayed FROM delivery_states AS s
    WHERE s.shard = sh.shard AND {_DUE}
    ORDER BY s.seq
    LIMIT $2
    FOR UPDATE SKIP LOCKED
) AS c
JOIN deliveries AS d ON d.seq = c.seq
ORDER BY c.seq
"""


async def claim_batch(
    conn: Conn, shards: Sequence[int], per_shard: int, parser: int
) -> list[asyncpg.Record]:
    return list(await conn.fetch(CLAIM_BATCH, list(shards), per_shard, parser))


CLAIM_SEQS = f"""
SELECT s.seq, s.attempts, s.replayed, {_stored("$2")}
FROM delivery_states AS s JOIN deliveries AS d ON d.seq = s.seq
WHERE s.seq = ANY($1::bigint[]) AND s.status = 'accepted'
ORDER BY s.seq
FOR UPDATE OF s SKIP LOCKED
"""


async def claim_seqs(conn: Conn, seqs: Sequence[int], parser: int) -> list[asyncpg.Record]:
    return list(await conn.fetch(CLAIM_SEQS, list(seqs), parser))


# Probes of the unique index delivery_states_applied_event_idx (sql/0006, 0008), written
# exactly as its expression and predicate so the planner takes it: at most one row per id,
# statistics or not.
SEEN_EVENT_IDS = """
SELECT event_id FROM delivery_states
WHERE event_id IS NOT NULL
  AND (CASE WHEN status = 'applied' THEN event_id END) = ANY($1::text[])
"""


async def seen_event_ids(conn: Conn, event_ids: Sequence[str]) -> set[str]:
    if not event_ids:
        return set()
    return {r["event_id"] for r in await conn.fetch(SEEN_EVENT_IDS, list(event_ids))}


# The outcomes of a batch, joined to their rows by seq. `d.seq = ANY(...)` as well, so those
# rows can be read in one scan of the primary key: without it the planner hashed the whole
# table against the few hundred seqs (a sequential scan per batch, about a third of Postgres's
# CPU per applied delivery at 110,000 rows; see also random_page_cost in store/pool.py).
def _finish_deliveries(seqs: str, statuses: str, reasons: str) -> str:
    return f"""
UPDATE delivery_states AS d
SET status = u.status, reason = u.reason, attempts = d.attempts + 1,
    applied_at = now(), next_attempt_at = NULL
FROM unnest({seqs}::bigint[], {statuses}::text[], {reasons}::text[]) AS u(seq, status, reason)
WHERE d.seq = u.seq AND d.seq = ANY({seqs}::bigint[])
"""


RETRY_DELIVERIES = """
UPDATE delivery_states
SET attempts = attempts + 1, reason = $2,
    status = CASE WHEN attempts + 1 >= $3 THEN 'dead' ELSE 'accepted' END,
    applied_at = CASE WHEN attempts + 1 >= $3 THEN now() END,
    next_attempt_at = CASE WHEN attempts + 1 >= $3 THEN NULL
                      ELSE now() + make_interval(secs => $4 * power(2, attempts)) END
WHERE seq = ANY($1::bigint[])
"""


async def retry_deliveries(
    conn: Conn, seqs: Sequence[int], reason: str, max_attempts: int, backoff_s: float
) -> None:
    """A failed attempt: back off exponentially, and give up as `dead` after `max_attempts`."""
    await conn.execute(RETRY_DELIVERIES, list(seqs), reason, max_attempts, backoff_s)


TRY_LOCK_SHARDS = f"""
SELECT shard FROM unnest($1::int[]) AS shard WHERE pg_try_advisory_lock({SHARD_LOCK_SPACE}, shard)
"""
LOCK_SHARD = f"SELECT pg_advisory_lock({SHARD_LOCK_SPACE}, $1)"
UNLOCK_SHARDS = f"SELECT pg_advisory_unlock({SHARD_LOCK_SPACE}, s) FROM unnest($1::int[]) AS s"


async def lock_shard(conn: Conn, shard: int) -> None:
    """Wait for the shard's lock: the job holding it is draining the shard."""
    await conn.execute(LOCK_SHARD, shard)


async def try_lock_shards(conn: Conn, shards: Sequence[int]) -> list[int]:
    """Those of `shards` whose lock this session now holds (the others are being drained)."""
    return [r["shard"] for r in await conn.fetch(TRY_LOCK_SHARDS, list(shards))]


async def unlock_shards(conn: Conn, shards: Sequence[int]) -> None:
    await conn.execute(UNLOCK_SHARDS, list(shards))


# Distinct shards by hopping along the pending index (one probe per shard found), rather than
# reading every pending entry: during a large backlog every finishing job asks this.
DUE_SHARDS_CTE = f"""
WITH RECURSIVE due AS (
    (SELECT s.shard FROM delivery_states AS s WHERE {_DUE} ORDER BY s.shard LIMIT 1)
    UNION ALL
    SELECT (SELECT s.shard FROM delivery_states AS s
            WHERE {_DUE} AND s.shard > due.shard
            ORDER BY s.shard LIMIT 1)
    FROM due WHERE due.shard IS NOT NULL
)
"""
DUE_SHARDS = DUE_SHARDS_CTE + "SELECT shard FROM due WHERE shard IS NOT NULL"


async def due_shards(conn: Executor) -> list[int]:
    """Shards holding deliveries that may be applied now."""
    return [r["shard"] for r in await conn.fetch(DUE_SHARDS)]


# Each due shard's oldest due delivery (seq is receipt order) decides whether it is late.
STALLED_SHARDS = (
    DUE_SHARDS_CTE
    + f"""
SELECT due.shard
FROM due
CROSS JOIN LATERAL (
    SELECT s.seq FROM delivery_states AS s
    WHERE s.shard = due.shard AND {_DUE}
    ORDER BY s.seq LIMIT 1
) AS oldest
JOIN deliveries AS d ON d.seq = oldest.seq
WHERE d.received_at < now() - make_interval(secs => $1)
"""
)


async def stalled_shards(conn: Executor, older_than_s: float) -> list[int]:
    return [r["shard"] for r in await conn.fetch(STALLED_SHARDS, older_than_s)]


# The oldest pending delivery is the one with the lowest seq (receipt order).
INBOX_STATS = """
SELECT s.pending, s.backoff, s.dead,
       coalesce(extract(epoch FROM now() - (SELECT received_at FROM deliveries
                                            WHERE seq = s.oldest)), 0)::float8 AS lag_s,
       coalesce(extract(epoch FROM now() - (SELECT received_at FROM deliveries
                                            WHERE seq = s.oldest_ready)), 0)::float8 AS ready_lag_s
FROM (
    SELECT count(*) FILTER (WHERE status = 'accepted') AS pending,
           count(*) FILTER (WHERE status = 'accepted' AND next_attempt_at > now()) AS backoff,
           min(seq) FILTER (WHERE status = 'accepted') AS oldest,
           min(seq) FILTER (WHERE status = 'accepted'
                            AND (next_attempt_at IS NULL OR next_attempt_at <= now()))
               AS oldest_ready,
           count(*) FILTER (WHERE status = 'dead') AS dead
    FROM delivery_states
    WHERE status IN ('accepted', 'dead')
) AS s
"""


class InboxBacklog(NamedTuple):
    pending: int  # accepted, not yet applied (those in backoff included)
    backoff: int  # of those, waiting out a retry backoff after a failed attempt
    lag_s: float  # age of the oldest pending delivery
    ready_lag_s: float  # age of the oldest pending delivery a worker may take now
    dead: int


async def inbox_backlog(conn: Executor) -> InboxBacklog:
    row = await conn.fetchrow(INBOX_STATS)
    assert row is not None
    return InboxBacklog(
        row["pending"], row["backoff"], row["lag_s"], row["ready_lag_s"], row["dead"]
    )


async def inbox_stats(conn: Executor) -> tuple[int, float, int]:
    """(pending deliveries, age of the oldest pending in seconds, dead deliveries)."""
    backlog = await inbox_backlog(conn)
    return backlog.pending, backlog.lag_s, backlog.dead


PRUNE_APPLIED = """
WITH gone AS (
    DELETE FROM delivery_states
    WHERE seq IN (
        SELECT seq FROM delivery_states
        WHERE status = 'applied' AND applied_at < now() - make_interval(secs => $1)
        ORDER BY applied_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    RETURNING seq
)
DELETE FROM deliveries WHERE seq IN (SELECT seq FROM gone)
"""


async def prune_applied(conn: Executor, older_than_s: float, limit: int) -> int:
    result = await conn.execute(PRUNE_APPLIED, older_than_s, limit)
    return int(result.split()[-1])


LIST_DELIVERIES = """
SELECT d.seq, d.delivery_id, s.status, s.reason, s.attempts, d.event_type, d.buddy_id, d.format,
       d.occurred_at, d.received_at, s.applied_at
FROM deliveries AS d JOIN delivery_states AS s ON s.seq = d.seq
WHERE ($1::text IS NULL OR s.status = $1)
  AND ($2::text IS NULL OR d.buddy_id = $2)
  AND ($3::bigint IS NULL OR d.seq < $3)
ORDER BY d.seq DESC
LIMIT $4
"""


async def list_deliveries(
    conn: Executor, *, status: str | None, buddy_id: str | None, before: int | None, limit: int
) -> list[asyncpg.Record]:
    return list(await conn.fetch(LIST_DELIVERIES, status, buddy_id, before, limit))


REQUEUE = """
UPDATE delivery_states AS s
SET status = 'accepted', attempts = 0, next_attempt_at = NULL, applied_at = NULL, reason = NULL,
    replayed = true
FROM deliveries AS d
WHERE d.seq = s.seq
  AND ($1::text[] IS NULL OR d.delivery_id = ANY($1))
  AND ($2::text[] IS NULL OR s.status = ANY($2))
  AND ($3::timestamptz IS NULL OR d.received_at >= $3)
  AND ($4::text[] IS NULL OR d.buddy_id = ANY($4))
RETURNING d.delivery_id, s.shard
"""


async def requeue(
    conn: Executor,
    *,
    delivery_ids: Sequence[str] | None = None,
    statuses: Sequence[str] | None = None,
    since: datetime | None = None,
    buddy_ids: Sequence[str] | None = None,
) -> list[tuple[str, int]]:
    """Put stored deliveries back to `accepted` so the worker applies them again.

    Safe for applied ones too: the projector ignores what a field already saw, and the ledger
    keeps one row per delivery.
    """
    rows = await conn.fetch(
        REQUEUE,
        list(delivery_ids) if delivery_ids is not None else None,
        list(statuses) if statuses is not None else None,
        since,
        list(buddy_ids) if buddy_ids is not None else None,
    )
    return [(r["delivery_id"], r["shard"]) for r in rows]


# The same UPDATE, answering how many per shard rather than a row per delivery: `replay` of a
# large inbox may requeue millions.
REQUEUE_BY_SHARD = f"""
WITH requeued AS ({REQUEUE})
SELECT shard, count(*) AS n FROM requeued GROUP BY shard ORDER BY shard
"""


async def requeue_by_shard(
    conn: Executor,
    *,
    delivery_ids: Sequence[str] | None,
    statuses: Sequence[str] | None,
    since: datetime | None,
) -> dict[int, int]:
    """`requeue` for the `replay` command: how many deliveries it requeued, per shard."""
    rows = await conn.fetch(
        REQUEUE_BY_SHARD,
        list(delivery_ids) if delivery_ids is not None else None,
        list(statuses) if statuses is not None else None,
        since,
        None,
    )
    return {r["shard"]: r["n"] for r in rows}


APPLIED_FOR_BUDDY = f"""
SELECT d.seq, {_stored("$2")}
FROM deliveries AS d JOIN delivery_states AS s ON s.seq = d.seq
WHERE d.buddy_id = $1 AND s.status = 'applied'
ORDER BY d.seq
"""


async def applied_deliveries(conn: Executor, buddy_id: str, parser: int) -> list[asyncpg.Record]:
    return list(await conn.fetch(APPLIED_FOR_BUDDY, buddy_id, parser))
