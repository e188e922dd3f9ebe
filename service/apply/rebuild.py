"""`hatched-mirror rebuild`: recompute buddies from their stored deliveries, with a progress bar."""

from __future__ import annotations

from tqdm import tqdm

from service import store
from service.apply.applier import rebuild_buddy
from service.config import Settings


async def rebuild_all(settings: Settings, buddy_ids: list[str]) -> tuple[int, int]:
    pool = await store.create_pool(settings.postgres_dsn, size=2, timeout_s=settings.db_timeout_s)
    changed = total = 0
    try:
        async with pool.acquire() as conn:
            count = len(buddy_ids) or await store.count_buddies(conn)
            with tqdm(total=count, unit="buddy", desc="rebuild", mininterval=1.0) as bar:
                after = None
                while True:
                    page = buddy_ids if buddy_ids else await store.buddy_ids_page(conn, after, 500)
                    for buddy_id in page:
                        changed += await rebuild_buddy(
                            conn, buddy_id, feed=settings.changes_enabled
                        )
                        total += 1
                        bar.update()
                    if buddy_ids or not page:
                        break
                    after = page[-1]
    finally:
        await pool.close()
    return changed, total
