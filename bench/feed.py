"""The change feed: what writing it costs the backlog drain (MIRROR_CHANGES_ENABLED on and off),
and how fast GET /v1/changes pages through it."""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import httpx
import orjson

from bench import inbox, procs, report
from bench.common import Ctx, database, drain_timed, judge, seed_buddies, shards
from bench.load import Generator, buddy_ids
from bench.procs import BenchError
from bench.report import Section, Target, ratio, table
from service import store

# --- backlog_feed --------------------------------------------------------------------------


def _order(reps: int) -> list[bool]:
    """on, off, off, on, on, off, ...: each mode as often first as second in its pair, so a
    machine that drifts faster or slower through the run favours neither."""
    return [on if i % 2 == 0 else not on for i in range(reps) for on in (True, False)]


async def _drain(ctx: Ctx, run: int, on: bool, rows: list[store.NewDelivery]) -> dict[str, Any]:
    """One drain of `rows` in a fresh database, the worker started with the feed on or off."""
    p = ctx.plan
    mode = "on" if on else "off"
    async with database(ctx, f"feed{run}_{mode}") as (dsn, env):
        env = {**env, "MIRROR_CHANGES_ENABLED": str(on).lower()}
        pool = await store.create_pool(dsn, size=2, timeout_s=10)
        worker = await procs.start_worker(env, ctx.logs, f"backlog_feed_{run}_{mode}")
        try:
            await seed_buddies(pool, env, worker, buddy_ids(p.buddies), 0)
            entries_before = await pool.fetchval("SELECT count(*) FROM changes")
            # The previous drain's database was just dropped; its files and checkpoint can
            # keep a core busy into this one.
            settled = "not waited" if p.quick else await report.settle(20.0)
            cpu = procs.CpuMeter(worker.pid)
            seconds = await drain_timed(pool, rows, env, worker, cpu)
            entries = await pool.fetchval("SELECT count(*) FROM changes") - entries_before
            outcomes = await inbox.outcome_counts(pool)
        finally:
            await worker.stop()
            await pool.close()
    return {
        "on": on,
        "seconds": seconds,
        "rate": round(len(rows) / seconds, 1),
        "entries": entries,
        "outcomes": outcomes,
        "worker_us": round(1e6 * cpu.process_s / len(rows), 1),
        "machine_us": round(1e6 * cpu.machine_busy_s / len(rows), 1),
        "settled": settled,
    }


async def backlog_feed(ctx: Ctx) -> Section:
    p = ctx.plan
    sec = Section(
        "backlog_feed", f"Backlog drain with the change feed on and off ({p.backlog:,} deliveries)"
    )
    ids = buddy_ids(p.buddies)
    gen = Generator(ids, procs.SECRET, ctx.fmt, seed=1)
    ts = int(time.time())
    # The same deliveries for every drain: only MIRROR_CHANGES_ENABLED differs.
    n = shards({})  # the drains leave MIRROR_SHARDS at its default
    rows = [inbox.as_stored(gen.next(ts), n) for _ in range(p.backlog)]
    runs = [await _drain(ctx, i, on, rows) for i, on in enumerate(_order(p.feed_reps))]
    for r in runs:
        if r["outcomes"].get("dead") or r["outcomes"].get("accepted"):
            sec.problems.append(f"drain {r} did not end cleanly: {r['outcomes']}")
        if (r["entries"] > 0) != r["on"]:
            sec.problems.append(f"feed {'on' if r['on'] else 'off'} wrote {r['entries']} entries")
    on = statistics.median(r["rate"] for r in runs if r["on"])
    off = statistics.median(r["rate"] for r in runs if not r["on"])
    sec.blocks.append(
        f"The same {p.backlog:,} signed deliveries (format {ctx.fmt}) over {p.buddies:,} "
        "already-hatched buddies, drained as in the backlog scenario, "
        f"{2 * p.feed_reps} times in the order below, each in a fresh database with its own "
        "worker, started with `MIRROR_CHANGES_ENABLED=true` (the default: a feed entry per "
        "buddy whose version grew, written in the batch's statement) or `false` (no diff, no "
        "entries). Each drain starts once the machine is quiet again (up to 20 s)."
    )
    sec.blocks.append(
        table(
            [
                "drain",
                "feed",
                "drain s",
                "deliveries/s",
                "feed entries written",
                "worker CPU µs per delivery",
                "machine CPU µs per delivery",
                "before",
            ],
            [
                (
                    i + 1,
                    "on" if r["on"] else "off",
                    round(r["seconds"], 2),
                    r["rate"],
                    r["entries"],
                    r["worker_us"],
                    r["machine_us"],
                    r["settled"],
                )
                for i, r in enumerate(runs)
            ],
        )
    )
    pairs = [
        ratio(*(r["rate"] for r in sorted(pair, key=lambda r: not r["on"])))
        for pair in zip(runs[::2], runs[1::2], strict=True)
    ]
    sec.blocks.append(
        table(
            ["median deliveries/s, feed on", "median, feed off", "on ÷ off", "per pair, on ÷ off"],
            [(on, off, ratio(on, off), ", ".join(f"{x:.2f}" for x in pairs))],
        )
    )
    sec.targets.append(
        Target(
            "drain with the feed ≥ 0.85x the drain without",
            f"{ratio(on, off)}x ({on:,.0f}/s vs {off:,.0f}/s)",
            judge(p, on >= 0.85 * off),
        )
    )
    sec.data = {"runs": runs, "on": on, "off": off}
    return sec


# --- feed_read -----------------------------------------------------------------------------

PAGE = 1000


async def _fill(ctx: Ctx, pool: store.Pool, env: dict[str, str], worker: procs.Proc) -> int:
    """At least `feed_entries` entries, written by the worker applying deliveries of the mix
    (hatches first), a backlog at a time: the feed as the apply path writes it."""
    p = ctx.plan
    ids = buddy_ids(p.buddies)
    await seed_buddies(pool, env, worker, ids, 0)
    gen = Generator(ids, procs.SECRET, ctx.fmt, seed=7)
    ts = int(time.time())
    n = shards(env)
    while (count := await pool.fetchval("SELECT count(*) FROM changes")) < p.feed_entries:
        rows = [inbox.as_stored(gen.next(ts), n) for _ in range(p.backlog)]
        await inbox.load_and_drain(pool, rows, redis_url=env["REDIS_URL"], shards=n, worker=worker)
    entries: int = count
    return entries


async def _walk(client: httpx.AsyncClient, params: dict[str, str]) -> dict[str, Any]:
    """Page from the start of the feed, following next_cursor, until a short page (the end),
    as a consumer catching up does; checks the order on the way."""
    pages: list[float] = []
    entries = 0
    last = ""
    after: str | None = None
    started = time.perf_counter()
    while True:
        query = {**params, "limit": str(PAGE), **({"after": after} if after else {})}
        t0 = time.perf_counter()
        r = await client.get("/v1/changes", params=query)
        if r.status_code != 200:
            raise BenchError(f"GET /v1/changes {query}: {r.status_code} {r.text[:200]}")
        doc = orjson.loads(r.content)
        pages.append(1000 * (time.perf_counter() - t0))
        data = doc["data"]
        if data and not last < data[0]["change_id"] <= data[-1]["change_id"]:
            raise BenchError(f"page after {after} is out of feed order")
        if data:
            last = data[-1]["change_id"]
        entries += len(data)
        after = doc["next_cursor"]
        if len(data) < PAGE:
            break
    seconds = time.perf_counter() - started
    return {"entries": entries, "pages": len(pages), "seconds": seconds, "page_ms": pages}


def _summary(walks: list[dict[str, Any]], feed: int) -> dict[str, Any]:
    entries = sum(w["entries"] for w in walks)
    seconds = sum(w["seconds"] for w in walks)
    page_ms = sorted(ms for w in walks for ms in w["page_ms"])
    rates = [w["entries"] / w["seconds"] for w in walks]
    return {
        "walks": len(walks),
        "entries": entries // len(walks),
        "pages": sum(w["pages"] for w in walks),
        "rate": round(statistics.median(rates), 1),
        "rates": [round(x) for x in rates],
        "feed_rate": round(feed * len(walks) / seconds, 1),
        "p50": round(page_ms[len(page_ms) // 2], 2),
        "p99": round(page_ms[min(len(page_ms) - 1, int(0.99 * len(page_ms)))], 2),
    }


async def feed_read(ctx: Ctx) -> Section:
    p = ctx.plan
    sec = Section("feed_read", "Change feed: paging through GET /v1/changes")
    rng = random.Random(3)
    walks: dict[str, list[dict[str, Any]]] = {"all": [], "field": [], "buddy": []}
    async with database(ctx, "feedread") as (dsn, env):
        pool = await store.create_pool(dsn, size=2, timeout_s=10)
        worker = await procs.start_worker(env, ctx.logs, "feed_read_worker")
        try:
            fill_started = time.perf_counter()
            feed = await _fill(ctx, pool, env, worker)
            fill_s = time.perf_counter() - fill_started
        finally:
            await worker.stop()
        with_coins = await pool.fetchval("SELECT count(*) FROM changes WHERE changed ? 'coins'")
        await pool.close()
        serve, port = await procs.start_service(env, ctx.logs, "feed_read_serve")
        cpu = procs.CpuMeter(serve.pid)
        try:
            headers = {"Authorization": f"Bearer {procs.TOKEN}"}
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60
            ) as client:
                warm = await _walk(client, {})  # untimed: the whole feed once, and its count
                if warm["entries"] != feed:
                    sec.problems.append(f"the walk found {warm['entries']} of {feed} entries")
                for _ in range(p.feed_walks):
                    cpu.start()
                    walks["all"].append(await _walk(client, {}))
                    cpu.stop()
                    walks["field"].append(await _walk(client, {"field": "coins"}))
                    buddies = rng.sample(buddy_ids(p.buddies), p.feed_buddy_reads)
                    per_buddy = [await _walk(client, {"buddy_id": b}) for b in buddies]
                    walks["buddy"].append(
                        {
                            "entries": sum(w["entries"] for w in per_buddy),
                            "pages": sum(w["pages"] for w in per_buddy),
                            "seconds": sum(w["seconds"] for w in per_buddy),
                            "page_ms": [ms for w in per_buddy for ms in w["page_ms"]],
                        }
                    )
        finally:
            await serve.stop()
    all_, field, buddy = (_summary(walks[k], feed) for k in ("all", "field", "buddy"))
    if field["entries"] != with_coins:
        sec.problems.append(f"field=coins found {field['entries']} of {with_coins} entries")
    serve_us = round(1e6 * cpu.process_s / all_["entries"], 2) if all_["entries"] else 0.0
    sec.blocks.append(
        f"A feed of {feed:,} entries, written by the worker applying the mix to "
        f"{p.buddies:,} buddies (their hatches, then backlogs of {p.backlog:,} deliveries until "
        f"there were at least {p.feed_entries:,} entries; {fill_s:.0f} s, not timed). Then "
        "`hatched-mirror serve` and one client in the orchestrator (httpx, one keep-alive "
        f"connection, the API token) pages from the start with `limit={PAGE}`, following "
        "`next_cursor` until a short page, each page parsed (orjson) and its order checked: "
        "a consumer catching up. Once untimed, then "
        f"{p.feed_walks} round(s) of: the whole feed; the whole feed with `field=coins`; "
        f"{p.feed_buddy_reads} random buddies with `buddy_id=` (one page each). The client's "
        "own CPU is in the figures (the same 2 cores)."
    )
    sec.blocks.append(
        table(
            [
                "walk",
                "entries per walk",
                "pages",
                "entries/s (median)",
                "each walk",
                "feed entries passed/s",
                "page p50 ms",
                "page p99 ms",
            ],
            [
                (
                    f"all, limit={PAGE}",
                    all_["entries"],
                    all_["pages"],
                    all_["rate"],
                    ", ".join(f"{x:,}" for x in all_["rates"]),
                    all_["feed_rate"],
                    all_["p50"],
                    all_["p99"],
                ),
                (
                    "field=coins",
                    field["entries"],
                    field["pages"],
                    field["rate"],
                    ", ".join(f"{x:,}" for x in field["rates"]),
                    field["feed_rate"],
                    field["p50"],
                    field["p99"],
                ),
                (
                    f"buddy_id= ({p.feed_buddy_reads} buddies per round)",
                    buddy["entries"],
                    buddy["pages"],
                    buddy["rate"],
                    ", ".join(f"{x:,}" for x in buddy["rates"]),
                    "-",
                    buddy["p50"],
                    buddy["p99"],
                ),
            ],
        )
    )
    sec.blocks.append(f"`serve` CPU per entry in the unfiltered walks: {serve_us} µs.")
    sec.targets.append(
        Target(
            "GET /v1/changes pages at ≥ 20,000 entries/s",
            f"{all_['rate']:,.0f} entries/s",
            judge(p, all_["rate"] >= 20_000),
        )
    )
    sec.data = {"feed": feed, "fill_s": fill_s, "all": all_, "field": field, "buddy": buddy}
    return sec
