"""Backfill: load buddies from Hatched's REST API into the mirror, resumably.

Each fetched buddy enters the inbox as a REST snapshot (service/hatched/refresh.py) and the worker
applies it like any delivery. Progress is checkpointed in Postgres after every page, so a run
that is interrupted continues where it stopped; a finished run starts over when asked again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from arq.connections import ArqRedis
from arq.connections import create_pool as create_redis
from tqdm import tqdm

from service import metrics, store
from service.config import Settings
from service.hatched import refresh
from service.hatched.client import HatchedAPI
from service.hatched.ratelimit import RedisTokenBucket
from service.hatched.remote import RemoteBuddy
from service.ingest.wakeups import redis_settings, shard_of, wake


@dataclass(frozen=True)
class Target:
    kind: str  # "all" | "buddy" | "user"
    ids: tuple[str, ...] = ()

    @property
    def run_key(self) -> str:
        if self.kind == "all":
            return "all"
        digest = hashlib.sha256("\n".join(self.ids).encode()).hexdigest()[:16]
        return f"{self.kind}:{digest}"


Progress = Callable[[int], object]


async def run(
    target: Target,
    *,
    api: HatchedAPI,
    pool: store.Pool,
    redis: ArqRedis,
    queue_name: str,
    shards: int,
    progress: Progress,
) -> int:
    """Load the target's buddies; returns how many this run (and earlier parts of it) loaded."""
    checkpoint = await store.get_checkpoint(pool, target.run_key)
    cursor, done = (None, 0)
    if checkpoint is not None and not checkpoint[2]:
        cursor, done = checkpoint[0], checkpoint[1]
        progress(done)

    async def keep(buddies: Sequence[RemoteBuddy]) -> int:
        """Store a page; how many were stored (an erased buddy is not)."""
        woken: set[int] = set()
        skipped = 0
        for buddy in buddies:
            if await refresh.store_snapshot(pool, buddy, shards=shards) is None:
                # An erased buddy: stored nowhere, counted on its tombstone.
                metrics.TOMBSTONE_HITS.labels(path="backfill").inc()
                skipped += 1
                continue
            woken.add(shard_of(buddy.buddy_id, shards))
        for shard in sorted(woken):
            await wake(redis, queue_name, shard)
        progress(len(buddies))
        return len(buddies) - skipped

    if target.kind == "all":
        async for page, next_cursor in api.iter_pages(cursor=cursor, status="active"):
            done += await keep(page)
            await store.save_checkpoint(pool, target.run_key, next_cursor, done, False)
    else:
        # For explicit lists the cursor is the position of the next id to load.
        start = int(cursor or 0)
        for position in range(start, len(target.ids)):
            item = target.ids[position]
            if target.kind == "buddy":
                found = await api.get_buddy(item)
                loaded = [found] if found is not None else []
            else:
                loaded = []
                async for page, _ in api.iter_pages(user_id=item, status="active"):
                    loaded.extend(page)
            done += await keep(loaded)
            await store.save_checkpoint(pool, target.run_key, str(position + 1), done, False)
    await store.save_checkpoint(pool, target.run_key, None, done, True)
    return done


async def run_from_settings(settings: Settings, target: Target) -> int:
    """`hatched-mirror backfill`: the clients from the settings, a progress bar, then `run`."""
    pool = await store.create_pool(settings.postgres_dsn, size=2, timeout_s=settings.db_timeout_s)
    redis = await create_redis(
        redis_settings(settings.redis_dsn, settings.redis_timeout_s),
        default_queue_name=settings.queue_name,
    )
    bucket = RedisTokenBucket(redis, settings.hatched_api_rate_per_min)
    api = HatchedAPI.from_settings(settings, bucket=bucket, on_request=metrics.observe_hatched_call)
    total = len(target.ids) if target.kind == "buddy" else None
    try:
        # Always shown (also in CI logs and pods), not only on a terminal.
        with tqdm(total=total, unit="buddy", desc="backfill", mininterval=1.0) as bar:
            return await run(
                target,
                api=api,
                pool=pool,
                redis=redis,
                queue_name=settings.queue_name,
                shards=settings.shards,
                progress=bar.update,
            )
    finally:
        await api.aclose()
        await redis.aclose()
        await pool.close()
