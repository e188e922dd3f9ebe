"""Backfill: load buddies from Hatched's REST API into the mirror, resumably.

Each fetched buddy enters the inbox as a REST snapshot (service/refresh.py) and the worker
applies it like any delivery. Progress is checkpointed in Postgres after every page, so a run
that is interrupted continues where it stopped; a finished run starts over when asked again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from arq.connections import ArqRedis

from service import metrics, store
from service.hatched import refresh
from service.hatched.client import HatchedAPI
from service.hatched.remote import RemoteBuddy
from service.ingest.wakeups import shard_of, wake


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
