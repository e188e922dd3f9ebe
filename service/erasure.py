"""Forget an end user: DELETE /v1/users/{user_id} and `hatched-mirror forget` both run this.

One transaction per user, online, beside the receiver and the workers:

1. Find the user's buddies: mirrored ones (`buddies.user_id`), those its bootstrap rows name, and
   those of deliveries not applied yet whose event names the user as owner (a hatch still
   waiting in the inbox has no `buddies` row yet).
2. Lock as the apply path does, in its order: the buddies' shard locks (waiting for a worker
   that is draining one of those shards), then the buddy rows (sorted). No worker can be in the
   middle of applying to these buddies, and none starts until commit.
3. Lock the inbox against inserts for the rest of the transaction (milliseconds): deliveries
   already being stored commit first and are deleted here; later ones see the tombstones.
4. Look again: if the user gained a buddy meanwhile whose shard is not locked, start over with
   it included.
5. Delete everything listed in store.erasure.ERASED_TABLES, write a tombstone per buddy, NOTIFY
   every serve process (read cache, streams), commit.

Afterwards, with Postgres committed, the caller drops the buddies' refresh schedules from Redis
(`forget_refreshes`; a refresh job that still runs finds the tombstone and stores nothing).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg
import structlog
from arq.connections import ArqRedis
from arq.connections import create_pool as create_redis

from service import metrics, store
from service.apply.applier import parse_row
from service.bootstrap.repository import CHANNEL as USERS_CHANNEL
from service.coerce import text
from service.config import Settings
from service.hatched.backfill import Target
from service.hatched.debounce import cancel_refreshes
from service.ingest.wakeups import redis_settings, shard_of
from service.store import erasure as sql

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class Erased:
    """What an erasure removed: rows per table. `buddy_ids` is for dropping their Redis keys;
    never log it."""

    user_id: str
    buddy_ids: tuple[str, ...]
    removed: dict[str, int]

    @property
    def buddies(self) -> int:
        return len(self.buddy_ids)


class ErasureBusy(Exception):
    """The user kept gaining buddies on other shards while being erased; try again."""


class _Moved(Exception):
    def __init__(self, found: set[str]) -> None:
        self.found = found


async def _candidates(conn: store.Conn, user_id: str, known: set[str]) -> tuple[set[str], set[int]]:
    """The user's buddy ids (with those already `known`), and the shards their deliveries are
    stored under."""
    buddies = await sql.user_buddies(conn, user_id) | known
    shards: set[int] = set()
    for row in await sql.unapplied_naming(conn, user_id):
        parsed = parse_row(row)
        event = parsed.event
        if event is not None and text(event.data.get("user_id")) == user_id:
            buddies.add(event.buddy_id)
    if buddies:
        shards.update(
            r["shard"]
            for r in await conn.fetch(
                "SELECT DISTINCT shard FROM deliveries WHERE buddy_id = ANY($1::text[])",
                sorted(buddies),
            )
        )
    return buddies, shards


def _checkpoint_keys(user_id: str, buddy_ids: set[str]) -> list[str]:
    """Backfill runs that named only this user, one of its buddies, or all of them."""
    targets = [Target("user", (user_id,))]
    targets += [Target("buddy", (b,)) for b in sorted(buddy_ids)]
    if len(buddy_ids) > 1:
        targets.append(Target("buddy", tuple(sorted(buddy_ids))))
    return [t.run_key for t in targets]


async def _erase_once(
    conn: store.Conn, user_id: str, known: set[str], shard_count: int
) -> tuple[set[str], dict[str, int]]:
    async with conn.transaction():
        buddies, stored_shards = await _candidates(conn, user_id, known)
        shards = {shard_of(b, shard_count) for b in buddies} | stored_shards
        await sql.lock_shards_xact(conn, sorted(shards))
        await store.lock_buddies(conn, buddies)
        await sql.lock_inbox(conn)
        again, again_shards = await _candidates(conn, user_id, buddies)
        new = again - buddies
        if new or not again_shards <= shards:
            raise _Moved(buddies | again)
        seqs = await sql.buddyless_naming(conn, user_id)
        removed = await sql.erase(
            conn,
            user_id,
            sorted(buddies),
            seqs,
            _checkpoint_keys(user_id, buddies),
            buddies_channel=store.NOTIFY_CHANNEL,
            users_channel=USERS_CHANNEL,
        )
        return buddies, removed


async def forget_user(pool: store.Pool, user_id: str, *, shards: int) -> Erased:
    """Erase one user (see the module's docstring). Raises ErasureBusy, or what Postgres
    raised (nothing was erased then)."""
    known: set[str] = set()
    async with pool.acquire() as conn:
        for _ in range(MAX_ATTEMPTS):
            try:
                buddies, removed = await _erase_once(conn, user_id, known, shards)
                break
            except _Moved as moved:
                known = moved.found
            except asyncpg.DeadlockDetectedError:
                # Two erasures whose users share shards, one of them having restarted with a
                # larger set: one gives way and tries again.
                continue
        else:
            raise ErasureBusy(user_id)
    metrics.ERASURES.inc()
    # Counts only: the ids themselves are what was asked to be forgotten.
    log.info("user_forgotten", erased_buddies=len(buddies), removed=removed)
    return Erased(user_id, tuple(sorted(buddies)), removed)


async def forget_refreshes(redis: ArqRedis, queue_name: str, erased: Erased) -> int | None:
    """Drop the erased buddies' refresh schedules from Redis; how many keys and queue entries
    went, or None when Redis failed (Postgres is erased all the same, and a refresh job that
    still runs finds the tombstone)."""
    try:
        return await cancel_refreshes(redis, queue_name, erased.buddy_ids)
    except Exception as exc:  # any Redis failure
        log.warning("erasure_redis_unavailable", error=repr(exc))
        return None


async def forget_users(
    settings: Settings, user_ids: Sequence[str]
) -> AsyncIterator[tuple[str, Erased | None, int | None]]:
    """`hatched-mirror forget`: each user in turn, with (user id, what went or None when the
    user kept changing, Redis keys removed or None when Redis is unreachable or unset)."""
    pool = await store.create_pool(settings.postgres_dsn, size=1, timeout_s=settings.db_timeout_s)
    redis: ArqRedis | None = None
    try:
        if settings.redis_url is not None:
            try:
                redis = await create_redis(
                    redis_settings(settings.redis_url, settings.redis_timeout_s),
                    default_queue_name=settings.queue_name,
                )
            except Exception as exc:  # Postgres holds the data; Redis only schedules refreshes
                log.warning("erasure_redis_unavailable", error=repr(exc))
        for user_id in user_ids:
            try:
                erased = await forget_user(pool, user_id, shards=settings.shards)
            except ErasureBusy:
                yield user_id, None, None
                return
            keys = None
            if redis is not None:
                keys = await forget_refreshes(redis, settings.queue_name, erased)
            yield user_id, erased, keys
    finally:
        if redis is not None:
            await redis.aclose()
        await pool.close()
