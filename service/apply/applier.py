"""Applying stored deliveries to the mirror: claim, normalise, project, write, in one transaction.

Used by the worker's wake-up jobs, by replay and by rebuild. Deliveries of one shard are applied
by one job at a time (a Postgres advisory lock per shard); buddy rows are locked in sorted order,
so even two jobs that meet on a buddy serialise instead of deadlocking.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import asyncpg
import structlog

from service import store
from service.apply.changes import Cause, CauseKind, diff, entry, grows
from service.apply.projector import Buddy, project
from service.hatched.refresh import REFRESH_EVENT, parse_snapshot
from service.ingest.events import PARSER, Event, Parsed, parse_delivery, stored_event
from service.store import erasure

log = structlog.get_logger(__name__)


@dataclass
class BatchResult:
    claimed: int = 0
    applied: int = 0
    duplicate: int = 0
    dead: int = 0
    retried: int = 0
    inconsistencies: int = 0
    forgotten: int = 0  # deliveries of erased buddies, deleted instead of applied
    changed: list[tuple[str, int]] = field(default_factory=list)
    # Buddies that webhooks (not refreshes) moved, those that broke rule 5's balance check,
    # and the fields refreshes had to correct: what the refresh scheduler and metrics need.
    touched: set[str] = field(default_factory=set)
    inconsistent: set[str] = field(default_factory=set)
    drift: list[str] = field(default_factory=list)

    def add(self, other: BatchResult, *, claimed: bool = True) -> None:
        self.claimed += other.claimed if claimed else 0
        self.applied += other.applied
        self.duplicate += other.duplicate
        self.dead += other.dead
        self.retried += other.retried
        self.inconsistencies += other.inconsistencies
        self.forgotten += other.forgotten
        self.changed.extend(other.changed)
        self.touched |= other.touched
        self.inconsistent |= other.inconsistent
        self.drift.extend(other.drift)


@dataclass(frozen=True, slots=True)
class ApplyLimits:
    batch_size: int = 500
    max_attempts: int = 8
    backoff_s: float = 1.0
    # MIRROR_CHANGES_ENABLED: whether applying writes change-feed entries.
    feed: bool = True


# Errors that belong to the data of a batch (the server refused a value, the projector tripped)
# rather than to the connection; connection errors propagate and the sweeper retries later.
_DATA_ERRORS = (
    asyncpg.PostgresError,
    ArithmeticError,
    AttributeError,
    LookupError,
    TypeError,
    ValueError,
)
_CONNECTION_ERRORS = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)


async def drain_shards(
    conn: store.Conn,
    shards: Sequence[int],
    limits: ApplyLimits,
    stopping: Callable[[], bool] = lambda: False,
) -> tuple[BatchResult, bool]:
    """Apply pending deliveries of `shards` until none is left, or until `stopping()` says so
    between batches. Returns the result and whether deliveries may be left. Call with the
    shards' locks held.

    A batch takes an equal share of `batch_size` from each shard still busy; a shard that
    gave less than its share is empty and drops out."""
    total = BatchResult()
    busy = list(shards)
    while busy:
        per_shard = -(-limits.batch_size // len(busy))
        result, claimed = await apply_batch(conn, busy, per_shard, limits)
        total.add(result)
        busy = [shard for shard in busy if claimed[shard] >= per_shard]
        if busy and stopping():
            return total, True
    return total, False


async def apply_batch(
    conn: store.Conn, shards: Sequence[int], per_shard: int, limits: ApplyLimits
) -> tuple[BatchResult, Counter[int]]:
    """One batch in one transaction; the result and the rows claimed from each shard."""
    try:
        async with conn.transaction():
            rows = await store.claim_batch(conn, shards, per_shard, PARSER)
            return await _apply_rows(conn, rows, limits.feed), Counter(r["shard"] for r in rows)
    except _DATA_ERRORS as exc:
        if isinstance(exc, _CONNECTION_ERRORS):
            raise
        # Something in the batch cannot be written (a value out of range, say). Apply the
        # buddies one by one so the poison is isolated and everyone else moves on.
        log.warning("batch_failed_isolating", shards=list(shards), error=error_kind(exc))
        return await _apply_isolated(conn, shards, per_shard, limits)


async def _apply_isolated(
    conn: store.Conn, shards: Sequence[int], per_shard: int, limits: ApplyLimits
) -> tuple[BatchResult, Counter[int]]:
    async with conn.transaction():
        rows = await store.claim_batch(conn, shards, per_shard, PARSER)
    groups: dict[str | None, list[asyncpg.Record]] = defaultdict(list)
    for row in rows:
        groups[_buddy_of(row)].append(row)
    result = BatchResult(claimed=len(rows))
    for buddy_id, group in groups.items():
        await _apply_group(conn, buddy_id, group, limits, result)
    return result, Counter(r["shard"] for r in rows)


async def _apply_group(
    conn: store.Conn,
    buddy_id: str | None,
    rows: list[asyncpg.Record],
    limits: ApplyLimits,
    result: BatchResult,
) -> None:
    """One buddy's deliveries together; if that fails, each alone, so only the poison waits."""
    seqs = [r["seq"] for r in rows]
    try:
        async with conn.transaction():
            part = await _apply_rows(conn, await store.claim_seqs(conn, seqs, PARSER), limits.feed)
        result.add(part, claimed=False)
        return
    except _DATA_ERRORS as exc:
        if isinstance(exc, _CONNECTION_ERRORS):
            raise
        if len(rows) > 1:
            for row in rows:
                await _apply_group(conn, buddy_id, [row], limits, result)
            return
        log.error(
            "delivery_apply_failed",
            delivery_id=rows[0]["delivery_id"],
            buddy_id=buddy_id,
            attempt=rows[0]["attempts"] + 1,
            error=error_kind(exc),
        )
        await store.retry_deliveries(
            conn, seqs, f"apply_error: {exc!r}"[:500], limits.max_attempts, limits.backoff_s
        )
        result.retried += 1


def error_kind(exc: BaseException) -> str:
    """What a failed apply logs: the kind of error, never its message, which may quote a value
    from the delivery (Postgres echoes a value it refuses). The whole message is kept with the
    delivery (`delivery_states.reason`, GET /v1/deliveries), where erasure reaches it."""
    sqlstate = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__} (SQLSTATE {sqlstate})" if sqlstate else type(exc).__name__


def parse_row(row: asyncpg.Record) -> Parsed:
    """A stored delivery as an event: from the data the receiver stored with it when its
    normaliser is this one (store's claims send it only then), else read again from its raw
    bytes (webhooks of older rows and REST snapshots)."""
    data = row.get("event_data")
    if data is not None:
        return stored_event(
            row["delivery_id"],
            row["event_type"],
            row["event_id"],
            row["buddy_id"],
            row["occurred_at"],
            row["signed_at"],
            data,
        )
    if row["format"] == "rest":
        return parse_snapshot(row["delivery_id"], bytes(row["body"]), row["signed_at"])
    return parse_delivery(bytes(row["body"]), row["headers"], row["format"], row["signed_at"])


def _buddy_of(row: asyncpg.Record) -> str | None:
    return parse_row(row).buddy_id


async def _apply_rows(conn: store.Conn, rows: list[asyncpg.Record], feed_on: bool) -> BatchResult:
    result = BatchResult(claimed=len(rows))
    if not rows:
        return result
    finished: list[tuple[int, str, str | None]] = []
    events: dict[str, list[tuple[int, Event]]] = defaultdict(list)
    seqs_of: dict[str, list[int]] = defaultdict(list)
    replayed = {row["seq"] for row in rows if row["replayed"]}
    for row in rows:
        parsed = parse_row(row)
        if parsed.buddy_id is not None:
            seqs_of[parsed.buddy_id].append(row["seq"])
        if parsed.status != "accepted" or parsed.event is None:
            # The receiver classifies these already; a changed parser may reclassify on replay.
            finished.append((row["seq"], parsed.status, parsed.reason))
            result.dead += parsed.status == "dead"
            continue
        events[parsed.event.buddy_id].append((row["seq"], parsed.event))

    # v1 names the underlying event: a second delivery of it must not count twice.
    event_ids = [e.event_id for evs in events.values() for _, e in evs if e.event_id]
    seen = await store.seen_event_ids(conn, event_ids)
    for buddy_id, evs in list(events.items()):
        fresh = []
        for seq, event in evs:
            if event.event_id is not None and event.event_id in seen:
                finished.append((seq, "duplicate", f"event_id {event.event_id} already applied"))
                result.duplicate += 1
                continue
            if event.event_id is not None:
                seen.add(event.event_id)
            fresh.append((seq, event))
        events[buddy_id] = fresh

    current = await store.lock_buddies(conn, events)
    # A buddy without a row may have been erased: a delivery that raced the erasure into the
    # inbox, or a replay, must not bring it back. Only such batches pay this probe.
    absent = [(b, seq) for b, seqs in seqs_of.items() if b not in current for seq in seqs]
    if absent:
        gone = await erasure.purge_forgotten(conn, absent)
        purged = {seq for b, seq in absent if b in gone}
        result.forgotten += len(purged)
        for buddy_id in gone:
            events.pop(buddy_id, None)
        finished = [f for f in finished if f[0] not in purged]
    writes: list[tuple[Buddy, int]] = []
    ledger = []
    feed = []
    for buddy_id in sorted(events):
        evs = events[buddy_id]
        if not evs:
            continue
        state, version = current.get(buddy_id, (None, 0))
        outcome = project(state, buddy_id, evs)
        ledger.extend(outcome.ledger)
        result.inconsistencies += outcome.inconsistencies
        if outcome.inconsistencies:
            result.inconsistent.add(buddy_id)
        if state is not None:
            result.drift.extend(outcome.drift)
        if any(e.type != REFRESH_EVENT for _, e in evs):
            result.touched.add(buddy_id)
        if state is None or outcome.buddy != state:
            # What a reader sees differently; nothing (or `last_event_at` alone) keeps the
            # version, so versions and feed entries (when written) match one to one.
            changed = diff(state, outcome.buddy) if feed_on else {}
            grew = bool(changed) if feed_on else grows(state, outcome.buddy)
            new_version = version + 1 if grew else version
            writes.append((outcome.buddy, new_version))
            if grew:
                result.changed.append((buddy_id, new_version))
            if changed:
                feed.append(entry(outcome.buddy, new_version, _cause(evs, replayed), changed))
        finished.extend((seq, "applied", None) for seq, _ in evs)
        result.applied += len(evs)

    await store.write_batch(
        conn, buddies=writes, ledger=ledger, outcomes=finished, changed=result.changed, feed=feed
    )
    return result


def _cause(evs: list[tuple[int, Event]], replayed: set[int]) -> Cause:
    """One entry stands for all of a buddy's deliveries in the batch (readers only ever see
    their combined effect); it names the last one received."""
    seq, event = evs[-1]
    if event.type == REFRESH_EVENT:
        kind: CauseKind = "refresh"
    elif seq in replayed:
        kind = "replay"
    else:
        kind = "delivery"
    return Cause(kind, event.delivery_id, event.type)


async def rebuild_buddy(conn: store.Conn, buddy_id: str, *, feed: bool = True) -> bool:
    """Recompute one buddy from its stored deliveries alone, through the same projector.

    Online: only this buddy's row is locked, for one short transaction; a live apply of the same
    buddy waits for it and then sees the rebuilt state. Returns whether anything changed.
    """
    async with conn.transaction():
        current = await store.lock_buddies(conn, [buddy_id])
        if buddy_id not in current and await erasure.is_forgotten(conn, buddy_id):
            return False  # erased: nothing of it may be written again
        events = []
        for row in await store.applied_deliveries(conn, buddy_id, PARSER):
            parsed = parse_row(row)
            if parsed.event is not None and parsed.status == "accepted":
                events.append((row["seq"], parsed.event))
        outcome = project(None, buddy_id, events)
        state, version = current.get(buddy_id, (None, 0))
        if state is not None and outcome.buddy == state:
            await store.write_batch(conn, ledger=outcome.ledger)
            return False
        changed = diff(state, outcome.buddy) if feed else {}
        grew = bool(changed) if feed else grows(state, outcome.buddy)
        new_version = version + 1 if grew else version
        await store.write_batch(
            conn,
            buddies=[(outcome.buddy, new_version)],
            ledger=outcome.ledger,
            changed=[(buddy_id, new_version)] if grew else [],
            feed=[entry(outcome.buddy, new_version, Cause("rebuild"), changed)] if changed else [],
        )
        return True
