"""Upgrade: how long `hatched-mirror migrate` takes to split a large inbox (sql/0008, 0009).

sql/0008 copies each stored delivery's outcome into `delivery_states`, then locks `deliveries`
to drop the old columns; sql/0009 gives a state row to any delivery the previous release
stored meanwhile. An operator with a long retention wants to know how long that takes. A
database migrated up to 0007 gets N stored deliveries in the 0007 layout (real deliveries of
the mix, copied with new ids by INSERT … SELECT: 0.1% pending, 0.1% dead, the rest applied a
day ago), is vacuumed and checkpointed as a long-running install would be, and then the
command operators run applies 0008, then 0009, each timed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bench import inbox, procs
from bench.common import Ctx, judge, shards
from bench.load import Generator, buddy_ids
from bench.report import Section, Target, table
from service import store

TEMPLATE = 2_000
CHUNK = 250_000
BEFORE = "0007"  # the last migration with outcomes in `deliveries`
SPLIT = ("0008", "0009")

TEMPLATE_TABLE = """
CREATE TABLE bench_up_tpl (
    k bigint PRIMARY KEY, delivery_id text, format text, event_type text, event_id text,
    buddy_id text, shard integer, occurred_at timestamptz, signed_at timestamptz, headers text,
    body bytea, status text, reason text
)
"""
# The 0007 layout: outcome columns still in `deliveries`.
FILL = """
INSERT INTO deliveries (delivery_id, received_at, format, event_type, event_id, buddy_id, shard,
                        occurred_at, signed_at, headers, body, status, reason, attempts,
                        applied_at)
SELECT 'up_' || g, now() - interval '1 day', t.format, t.event_type,
       CASE WHEN t.event_id IS NULL THEN NULL ELSE 'evt_up_' || g END,
       t.buddy_id, t.shard, t.occurred_at, t.signed_at, t.headers::jsonb, t.body,
       st.status, CASE st.status WHEN 'dead' THEN 'apply_error: bench' END,
       CASE st.status WHEN 'accepted' THEN 0 ELSE 1 END,
       CASE st.status WHEN 'accepted' THEN NULL ELSE now() - interval '1 day' END
FROM generate_series($1::bigint, $2::bigint - 1) AS g
JOIN bench_up_tpl AS t ON t.k = g % $3
CROSS JOIN LATERAL (
    SELECT CASE g % 1000 WHEN 0 THEN 'accepted' WHEN 1 THEN 'dead' ELSE 'applied' END AS status
) AS st
"""
OUTCOMES = "SELECT status, count(*) AS n FROM {table} GROUP BY status ORDER BY status"


def _sql_upto(root: Path, last: str) -> Path:
    """A copy of sql/ holding the migrations up to `last` (its number), for MIRROR_SQL_DIR."""
    folder = root / f"upto_{last}"
    folder.mkdir()
    for path in sorted(store.SQL_DIR.glob("*.sql")):
        if path.name[:4] <= last:
            shutil.copy(path, folder / path.name)
    return folder


async def _migrate(dsn: str, ctx: Ctx, sql_dir: Path) -> float:
    started = time.perf_counter()
    await procs.migrate(dsn, ctx.logs, MIRROR_SQL_DIR=str(sql_dir))
    return time.perf_counter() - started


async def upgrade(ctx: Ctx) -> Section:
    n = ctx.plan.upgrade_rows
    sec = Section("upgrade", "Upgrade of a large inbox (sql/0008 and 0009)")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {v: _sql_upto(Path(tmp), v) for v in (BEFORE, *SPLIT)}
        async with procs.fresh_database("upgrade") as dsn:
            await _migrate(dsn, ctx, dirs[BEFORE])
            pool = await store.create_pool(dsn, size=1, timeout_s=10, bounded=False)
            try:
                filled = await _fill(pool, n, shards(procs.service_env(dsn)))
                before = await _outcomes(pool, "deliveries")
                size = await pool.fetchval("SELECT pg_total_relation_size('deliveries')")
                times = {v: await _migrate(dsn, ctx, dirs[v]) for v in SPLIT}
                after = await _outcomes(pool, "delivery_states")
                # State rows are only ever copied from `deliveries`: equal counts, none missing.
                orphans = sum(before.values()) - sum(after.values())
            finally:
                await pool.close()
    if after != before or orphans:
        sec.problems.append(f"outcomes before {before}, after {after}; {orphans} without state")
    total = sum(times.values())
    sec.blocks.append(
        f"{n:,} stored deliveries in the 0007 layout ({size / 2**30:.1f} GiB with indexes; "
        f"filled in {filled:.0f} s, then VACUUM ANALYZE and CHECKPOINT), outcomes {before}. "
        "Each step is one `hatched-mirror migrate` run, pointed by `MIRROR_SQL_DIR` at sql/ up "
        "to that file."
    )
    rows = [
        (
            f"sql/{v} ({'copy outcomes, lock, drop' if v == '0008' else 'repair missing states'})",
            round(t, 1),
            round(n / t) if t else 0,
        )
        for v, t in times.items()
    ]
    rows.append(("both", round(total, 1), round(n / total) if total else 0))
    sec.blocks.append(table(["step", "seconds", "deliveries/s"], rows))
    sec.targets.append(
        Target(
            "no outcome changes, no delivery without a state row",
            f"{len(after)} statuses kept; {orphans} without state",
            judge(ctx.plan, after == before and not orphans),
        )
    )
    sec.data = {"rows": n, "bytes": size, "fill_s": filled, "migrate_s": times}
    return sec


async def _fill(pool: store.Pool, n: int, n_shards: int) -> float:
    started = time.perf_counter()
    ids = buddy_ids(min(TEMPLATE // 4, max(1, n // 4)))
    gen = Generator(ids, procs.SECRET, "mixed", seed=7)
    ts = int(time.time())
    stored = [inbox.as_stored(gen.next(ts), n_shards) for _ in range(min(TEMPLATE, n))]
    await pool.execute(TEMPLATE_TABLE)
    await pool.copy_records_to_table(
        "bench_up_tpl",
        records=[(k, *d.row()) for k, d in enumerate(stored)],
    )
    for lo in range(0, n, CHUNK):
        await pool.execute(FILL, lo, min(n, lo + CHUNK), len(stored))
    await pool.execute("DROP TABLE bench_up_tpl")
    await pool.execute("VACUUM ANALYZE deliveries")
    await pool.execute("CHECKPOINT")
    return time.perf_counter() - started


async def _outcomes(pool: store.Pool, table_name: str) -> dict[str, int]:
    return {r["status"]: r["n"] for r in await pool.fetch(OUTCOMES.format(table=table_name))}
