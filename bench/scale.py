"""Scale: the same read and apply measurements as the mirror grows, filled with SQL.

A few hundred buddies' worth of real rows go through the service first (so every column holds
what the projector really writes); INSERT … SELECT from generate_series then copies them, with
new ids, up to each size. History rows are `applied` and carry ledger rows; they are one day
old, inside the default retention (30 days), so the worker's prune job leaves them alone.
"""

from __future__ import annotations

import asyncio
import importlib
import random
import time
from pathlib import Path
from typing import Any

import orjson

from bench import inbox, procs
from bench.common import Ctx, check_load, database, get_spec, judge, seed_buddies, shards
from bench.load import buddy_ids, make_deliveries
from bench.report import Section, Target, ratio, table
from service import store
from service.apply.projector import STATE_FIELDS

TEMPLATE_BUDDIES = 1_000
CHUNK = 250_000
READ_TARGETS = 20_000
# A scale backlog touches this many buddies, as the 10,000-buddy backlog does, so the sweep
# changes only how much is stored around them.
BACKLOG_BUDDIES = 10_000

TEMPLATES = """
DROP TABLE IF EXISTS bench_tpl_buddies, bench_tpl_deliveries;
CREATE TABLE bench_tpl_buddies AS
    SELECT (row_number() OVER (ORDER BY buddy_id) - 1)::bigint AS k, * FROM buddies;
CREATE TABLE bench_tpl_deliveries AS
    SELECT (row_number() OVER (ORDER BY seq) - 1)::bigint AS k, * FROM inbox
    WHERE status = 'applied';
CREATE UNIQUE INDEX ON bench_tpl_buddies (k);
CREATE UNIQUE INDEX ON bench_tpl_deliveries (k);
"""
_COPIED = [c for c in STATE_FIELDS if c not in ("buddy_id", "user_id")]
_COPIED += ["created_at", "updated_at", "version"]
FILL_BUDDIES = f"""
INSERT INTO buddies (buddy_id, user_id, {", ".join(_COPIED)})
SELECT 'bench_buddy_' || lpad(g::text, 7, '0'), 'user_' || lpad(g::text, 7, '0'),
       {", ".join("t." + c for c in _COPIED)}
FROM generate_series($1::bigint, $2::bigint - 1) AS g
JOIN bench_tpl_buddies AS t ON t.k = g % $3
"""
# The shard column keeps the template's value: only `accepted` rows are read by shard.
FILL_DELIVERIES = """
WITH stored AS (
    INSERT INTO deliveries (delivery_id, received_at, format, event_type, event_id, buddy_id,
                            shard, occurred_at, signed_at, headers, body)
    SELECT 'hist_' || g, t.received_at - interval '1 day', t.format, t.event_type,
           CASE WHEN t.event_id IS NULL THEN NULL ELSE 'evt_hist_' || g END,
           b.id, t.shard, t.occurred_at - interval '1 day', t.signed_at - interval '1 day',
           t.headers,
           convert_to(replace(replace(convert_from(t.body, 'UTF8'), t.buddy_id, b.id),
                              t.delivery_id, 'hist_' || g), 'UTF8')
    FROM generate_series($1::bigint, $2::bigint - 1) AS g
    CROSS JOIN LATERAL (SELECT 'bench_buddy_' || lpad((g % $3)::text, 7, '0') AS id) AS b
    JOIN bench_tpl_deliveries AS t ON t.k = g % $4
    RETURNING seq, shard, event_id, received_at
)
INSERT INTO delivery_states (seq, shard, event_id, status, attempts, applied_at)
SELECT seq, shard, event_id, 'applied', 1, received_at + interval '1 second' FROM stored
"""
FILL_LEDGER = """
INSERT INTO ledger (delivery_id, seq, buddy_id, currency, amount, balance_after, reason,
                    occurred_at)
SELECT delivery_id, seq, buddy_id,
       CASE WHEN event_type LIKE 'coins.%' THEN 'coins' ELSE 'gem' END,
       CASE WHEN event_type LIKE '%.spent' THEN -10 ELSE 10 END, 100, 'lesson_completed',
       occurred_at
FROM deliveries
WHERE seq > $1 AND event_type IN ('coins.earned', 'coins.spent', 'token.earned', 'token.spent')
ON CONFLICT (delivery_id) DO NOTHING
"""


# What the database wrote and read for a drain (cluster-wide counters: nothing else runs).
WRITE_COUNTERS = """
SELECT (SELECT wal_bytes FROM pg_stat_wal)::float8 AS wal_bytes,
       (SELECT wal_fpi FROM pg_stat_wal)::float8 AS wal_fpi,
       (SELECT sum(idx_blks_read) FROM pg_statio_user_indexes
        WHERE relname IN ('deliveries', 'delivery_states'))::float8 AS idx_read,
       (SELECT sum(idx_blks_hit) FROM pg_statio_user_indexes
        WHERE relname IN ('deliveries', 'delivery_states'))::float8 AS idx_hit,
       (SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'buddies')::float8 AS upd,
       (SELECT n_tup_hot_upd FROM pg_stat_user_tables
        WHERE relname = 'buddies')::float8 AS hot_upd
"""
# Backends publish their statistics within a second of going idle.
STATS_SETTLE_S = 1.5


class WriteCost:
    """Counters around a drain: WAL bytes and full-page images, and the inbox's index blocks
    found outside shared_buffers, per delivery applied."""

    def __init__(self, pool: store.Pool) -> None:
        self._pool = pool
        self._before: dict[str, float] = {}

    async def _read(self) -> dict[str, float]:
        await asyncio.sleep(STATS_SETTLE_S)
        row = await self._pool.fetchrow(WRITE_COUNTERS)
        assert row is not None
        return {k: float(v or 0) for k, v in dict(row).items()}

    async def start(self) -> None:
        self._before = await self._read()

    async def per_delivery(self, n: int) -> dict[str, float]:
        after = await self._read()
        d = {k: (after[k] - self._before[k]) / n for k in after}
        total_idx = d["idx_read"] + d["idx_hit"]
        return {
            "wal_kb": round(d["wal_bytes"] / 1024, 2),
            "fpi": round(d["wal_fpi"], 2),
            "idx_read": round(d["idx_read"], 2),
            "idx_miss_pct": round(100 * d["idx_read"] / total_idx, 1) if total_idx else 0.0,
            "hot_pct": round(100 * d["hot_upd"] / d["upd"], 1) if d["upd"] else 0.0,
        }


class Filler:
    def __init__(self, pool: store.Pool) -> None:
        self._pool = pool
        self._next_hist = 0

    async def templates(self) -> None:
        await self._pool.execute(TEMPLATES)

    async def fill(self, buddies: int, deliveries: int) -> float:
        """Grow to `buddies` buddies and at least `deliveries` stored deliveries."""
        started = time.perf_counter()
        pool = self._pool
        tpl_b = await pool.fetchval("SELECT count(*) FROM bench_tpl_buddies")
        tpl_d = await pool.fetchval("SELECT count(*) FROM bench_tpl_deliveries")
        have_b = await pool.fetchval("SELECT count(*) FROM buddies")
        for lo in range(have_b, buddies, CHUNK):
            await pool.execute(FILL_BUDDIES, lo, min(buddies, lo + CHUNK), tpl_b)
        need = deliveries - await pool.fetchval("SELECT count(*) FROM deliveries")
        while need > 0:
            n = min(need, CHUNK)
            last_seq = await pool.fetchval("SELECT coalesce(max(seq), 0) FROM deliveries")
            lo = self._next_hist
            await pool.execute(FILL_DELIVERIES, lo, lo + n, buddies, tpl_d)
            await pool.execute(FILL_LEDGER, last_seq)
            self._next_hist += n
            need -= n
        await pool.execute("VACUUM ANALYZE buddies, deliveries, delivery_states, ledger")
        return time.perf_counter() - started


async def scale(ctx: Ctx) -> Section:
    p = ctx.plan
    sec = Section("scale", "Scale")
    points: list[dict[str, Any]] = []
    async with database(ctx, "scale") as (dsn, env):
        n_shards = shards(env)
        # Long fill statements: the pool's command timeout follows its connect timeout.
        pool = await store.create_pool(dsn, size=2, timeout_s=10, bounded=False)
        worker = await procs.start_worker(env, ctx.logs, "scale_worker")
        serve, port = await procs.start_service(env, ctx.logs, "scale_serve")
        # The same service with its read cache off: what a read costs when it goes to Postgres,
        # which is what grows with the data (the cache's hit rate depends on the traffic's
        # skew, not on how much is stored).
        no_cache = {**env, "MIRROR_READ_CACHE_SIZE": "0"}
        serve_db, port_db = await procs.start_service(no_cache, ctx.logs, "scale_serve_db")
        try:
            tpl = min(TEMPLATE_BUDDIES, p.scale_sizes[0])
            await seed_buddies(pool, env, worker, buddy_ids(tpl), tpl * (p.per_buddy - 1))
            filler = Filler(pool)
            await filler.templates()
            for i, size in enumerate(p.scale_sizes):
                fill_s = await filler.fill(size, size * p.per_buddy)
                stored = await pool.fetchval("SELECT count(*) FROM deliveries")
                rng = random.Random(i)
                ids = [
                    f"bench_buddy_{k:07d}"
                    for k in rng.sample(range(size), min(size, BACKLOG_BUDDIES))
                ]
                load = make_deliveries(
                    p.scale_backlog, ids, secret=procs.SECRET, fmt=ctx.fmt, seed=i
                )
                stored_rows = [inbox.as_stored(d, n_shards) for d in load]
                cost = WriteCost(pool)
                async with procs.RssSampler(worker.pid) as rss:
                    seconds = await inbox.load_and_drain(
                        pool,
                        stored_rows,
                        redis_url=env["REDIS_URL"],
                        shards=n_shards,
                        worker=worker,
                        before_drain=cost.start,
                    )
                written = await cost.per_delivery(p.scale_backlog)
                index_mb = await pool.fetchval(
                    "SELECT (pg_indexes_size('deliveries') + pg_indexes_size('delivery_states'))"
                    " / 1048576.0"
                )
                targets = ctx.logs / f"scale_targets_{size}.json"
                paths = [
                    f"/v1/buddies/bench_buddy_{rng.randrange(size):07d}"
                    for _ in range(READ_TARGETS)
                ]
                targets.write_bytes(orjson.dumps([(path, None) for path in paths]))
                r = await procs.run_load(
                    get_spec(ctx, port, targets, False), ctx.logs, f"scale_read_{size}"
                )
                check_load(sec, f"read at {size:,} buddies", r)
                lat = r.get("latency_ms") or {}
                r_db = await procs.run_load(
                    get_spec(ctx, port_db, targets, False), ctx.logs, f"scale_read_db_{size}"
                )
                check_load(sec, f"database read at {size:,} buddies", r_db)
                lat_db = r_db.get("latency_ms") or {}
                points.append(
                    {
                        "buddies": size,
                        "stored": stored,
                        "fill_s": round(fill_s, 1),
                        "apply_per_s": round(p.scale_backlog / seconds, 1),
                        "rss_mb": rss.peak,
                        "index_mb": round(float(index_mb)),
                        **written,
                        "read_rps": r["rps"],
                        "read_p50": lat.get("p50", 0.0),
                        "read_p99": lat.get("p99", 0.0),
                        "db_read_rps": r_db["rps"],
                        "db_read_p50": lat_db.get("p50", 0.0),
                        "db_read_p99": lat_db.get("p99", 0.0),
                    }
                )
        finally:
            await serve_db.stop()
            await serve.stop()
            await worker.stop()
            await pool.close()
    first, last = points[0], points[-1]
    rows = [
        (
            x["buddies"],
            x["stored"],
            x["fill_s"],
            x["apply_per_s"],
            ratio(x["apply_per_s"], first["apply_per_s"]),
            x["db_read_rps"],
            x["db_read_p50"],
            x["db_read_p99"],
            ratio(x["db_read_p99"], first["db_read_p99"]),
            x["read_rps"],
            x["read_p99"],
            ratio(x["read_p99"], first["read_p99"]),
            x["rss_mb"],
        )
        for x in points
    ]
    write_rows = [
        (
            x["buddies"],
            x["stored"],
            x["index_mb"],
            x["wal_kb"],
            x["fpi"],
            x["idx_read"],
            x["idx_miss_pct"],
            x["hot_pct"],
        )
        for x in points
    ]
    sec.blocks.append(
        f"Rows filled with SQL from {min(TEMPLATE_BUDDIES, p.scale_sizes[0]):,} buddies' real "
        f"rows ({p.per_buddy} stored deliveries per buddy, ledger rows for coins and tokens). At "
        f"each size: a {p.scale_backlog:,}-delivery backlog over "
        f"{min(BACKLOG_BUDDIES, p.scale_sizes[0]):,} random buddies drained by one worker, "
        f"then {p.read_s:g} s of closed-loop GETs ({p.read_conns} connections) over random "
        "buddies of the whole set, once with the read cache off (every GET goes to Postgres: "
        "the database path, which the target is judged on) and once with the service as "
        "configured by default (a 10,000-entry cache, which a uniform spread over more buddies "
        "mostly misses)."
    )
    sec.blocks.append(
        table(
            [
                "buddies",
                "stored deliveries",
                "fill s",
                "apply/s",
                "÷ first",
                "db read req/s",
                "db read p50 ms",
                "db read p99 ms",
                "÷ first",
                "cached read req/s",
                "cached read p99 ms",
                "÷ first",
                "worker RSS MB",
            ],
            rows,
        )
    )
    sec.blocks.append(
        "What Postgres did for each delivery of the drain (cluster-wide counters, read "
        f"{STATS_SETTLE_S:g} s after the COPY and after the drain, divided by the backlog): WAL "
        "written, full-page images among it, blocks of the inbox's indexes that were not in "
        "shared_buffers, and the share of buddy row updates that were HOT (no index entries)."
    )
    sec.blocks.append(
        table(
            [
                "buddies",
                "stored deliveries",
                "inbox indexes MB",
                "WAL KB / delivery",
                "full-page images / delivery",
                "index blocks read / delivery",
                "index miss %",
                "buddy updates HOT %",
            ],
            write_rows,
        )
    )
    plotted = plot(points, ctx.plot)
    sec.blocks.append(
        f"Plot: `{ctx.plot}`" if plotted else "Plot skipped: matplotlib is not installed."
    )
    apply_ok = last["apply_per_s"] >= 0.8 * first["apply_per_s"]
    read_ok = last["db_read_p99"] <= 1.2 * first["db_read_p99"]
    at = f"at {last['buddies']:,} buddies vs {first['buddies']:,}"
    sec.targets += [
        Target(
            f"read p99 (database path) within 20% {at}",
            f"{ratio(last['db_read_p99'], first['db_read_p99'])}x",
            judge(p, read_ok),
        ),
        Target(
            f"apply throughput within 20% {at}",
            f"{ratio(last['apply_per_s'], first['apply_per_s'])}x",
            judge(p, apply_ok),
        ),
    ]
    sec.data = {"points": points}
    return sec


def plot(points: list[dict[str, Any]], path: Path) -> bool:
    """Cost against size. matplotlib is optional (a bench-only install), hence the late import;
    typed as Any so mypy needs no stubs for it."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        return False
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    sizes = [x["buddies"] for x in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(sizes, [x["db_read_p99"] for x in points], "o-", label="p99, database path")
    left.plot(sizes, [x["db_read_p50"] for x in points], "o--", label="p50, database path")
    left.plot(sizes, [x["read_p99"] for x in points], "s:", label="p99, 10k-entry cache on")
    left.set(xscale="log", xlabel="buddies", ylabel="ms", title="GET /v1/buddies/{id} latency")
    left.set_ylim(bottom=0)
    left.legend()
    costs = [1e6 / x["apply_per_s"] for x in points]
    right.plot(sizes, costs, "o-", color="C2")
    right.set(xscale="log", xlabel="buddies", ylabel="µs per delivery", title="Worker apply cost")
    right.set_ylim(0, max(costs) * 1.25)  # room for the labels above the points
    right.margins(x=0.15)
    for axis in (left, right):
        axis.set_xticks(sizes, [_human(s) for s in sizes])
        axis.minorticks_off()
    for x in points:
        right.annotate(
            f"{_human(x['stored'])} stored",
            (x["buddies"], 1e6 / x["apply_per_s"]),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=8,
        )
    fig.suptitle("hatched-mirror: cost against size (1 uvicorn worker, 1 arq worker, 2 cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _human(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)
