"""Inbox flush: the receiver's statement alone, one batch after another on one connection.

What one group-commit flush (service/ingest/inbox.py) costs Postgres, with no HTTP, no load
generator and no worker beside it: the time from sending the batch to its commit, and the CPU
of the connection's backend process, per delivery. Under light load a flush holds a delivery
or two, under the closed loop of the receiver scenario about half its connections.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace

from bench import inbox, procs, wire
from bench.common import Ctx, database, shards
from bench.load import buddy_ids, make_deliveries
from bench.report import Section, table
from service import store

SIZES = (1, 2, 32, 256)
WARMUP_FLUSHES = 10  # more than the five executions after which Postgres may change plans


def _flushes(size: int, quick: bool) -> int:
    if quick:
        return 5
    return 1_000 if size <= 2 else max(50, 12_800 // size)


async def inbox_flush(ctx: Ctx) -> Section:
    p = ctx.plan
    sec = Section("inbox_flush", "Inbox flush: the receiver's statement alone")
    counts = {size: WARMUP_FLUSHES + _flushes(size, p.quick) for size in SIZES}
    async with database(ctx, "inbox_flush") as (dsn, env):
        load = make_deliveries(
            sum(size * n for size, n in counts.items()),
            buddy_ids(p.buddies),
            secret=procs.SECRET,
            fmt=ctx.fmt,
            seed=3,
        )
        n_shards = shards(env)
        # With a signature, as the receiver stores webhooks (the replay key, sql/0013).
        rows = [
            replace(inbox.as_stored(d, n_shards), signature=hashlib.sha256(d.body).digest())
            for d in load
        ]
        pool = await store.create_pool(dsn, size=1, timeout_s=10)
        results = []
        try:
            async with pool.acquire() as conn:
                backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
                at = 0
                for size, n in counts.items():
                    times = []
                    cpu = procs.CpuMeter(backend)
                    for i in range(n):
                        if i == WARMUP_FLUSHES:
                            cpu.start()
                            started = time.perf_counter()
                        t = time.perf_counter()
                        stored = await store.insert_deliveries(conn, rows[at : at + size])
                        if i >= WARMUP_FLUSHES:
                            times.append(time.perf_counter() - t)
                        at += size
                        if not sec.problems and not all(isinstance(s, int) for s in stored):
                            sec.problems.append(f"a flush of {size} stored {stored!r}")
                    wall = time.perf_counter() - started
                    cpu.stop()
                    timed = (n - WARMUP_FLUSHES) * size
                    ms = wire.percentiles(times)
                    results.append(
                        (
                            size,
                            n - WARMUP_FLUSHES,
                            ms["p50"],
                            ms["p99"],
                            round(cpu.process_s * 1e6 / timed, 1),
                            round(wall * 1e6 / timed, 1),
                        )
                    )
        finally:
            await pool.close()
    sec.blocks.append(
        "Deliveries of the mix (format "
        f"{ctx.fmt}), stored with the receiver's statement (`store.insert_deliveries`) in "
        "batches of each size, one after another on one connection of the service's pool "
        f"settings, after {WARMUP_FLUSHES} untimed flushes of that size; Postgres's CPU is that "
        "connection's backend process, from /proc."
    )
    sec.blocks.append(
        table(
            [
                "deliveries per flush",
                "flushes",
                "flush p50 ms",
                "flush p99 ms",
                "Postgres CPU µs per delivery",
                "wall µs per delivery",
            ],
            results,
        )
    )
    sec.data["flush"] = results
    return sec
