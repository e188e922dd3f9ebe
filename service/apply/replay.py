"""`hatched-mirror replay`: put stored deliveries back to `accepted` and wake their shards."""

from __future__ import annotations

from datetime import datetime

import structlog

from service import store
from service.config import Settings
from service.ingest.wakeups import Waker

log = structlog.get_logger(__name__)


async def requeue(
    settings: Settings,
    statuses: list[str] | None,
    since: datetime | None,
    delivery_ids: list[str] | None,
) -> int:
    # Unbounded: `--status all` or `--since` on a large inbox updates millions of rows in one
    # statement, far longer than the service's statement limit.
    pool = await store.create_pool(
        settings.postgres_dsn, size=2, timeout_s=settings.db_timeout_s, bounded=False
    )
    waker = Waker(settings.redis_dsn, settings.queue_name, settings.redis_timeout_s)
    try:
        per_shard = await store.requeue_by_shard(
            pool, delivery_ids=delivery_ids, statuses=statuses, since=since
        )
        woken = [await waker.wake(shard) for shard in sorted(per_shard)]
        if not all(woken):
            log.warning("replay_not_woken", detail="Redis unreachable: the sweeper applies them")
        return sum(per_shard.values())
    finally:
        await waker.close()
        await pool.close()
