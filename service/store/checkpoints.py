"""Backfill checkpoints: where a resumable run stopped."""

from __future__ import annotations

from service.store.pool import Executor

GET_CHECKPOINT = "SELECT cursor, done, finished FROM backfill_checkpoints WHERE run_key = $1"
SAVE_CHECKPOINT = """
INSERT INTO backfill_checkpoints (run_key, cursor, done, finished, updated_at)
VALUES ($1, $2, $3, $4, now())
ON CONFLICT (run_key) DO UPDATE
SET cursor = EXCLUDED.cursor, done = EXCLUDED.done, finished = EXCLUDED.finished, updated_at = now()
"""


async def get_checkpoint(conn: Executor, run_key: str) -> tuple[str | None, int, bool] | None:
    row = await conn.fetchrow(GET_CHECKPOINT, run_key)
    return (row["cursor"], row["done"], row["finished"]) if row is not None else None


async def save_checkpoint(
    conn: Executor, run_key: str, cursor: str | None, done: int, finished: bool
) -> None:
    await conn.execute(SAVE_CHECKPOINT, run_key, cursor, done, finished)
