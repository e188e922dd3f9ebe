"""Subscription: the change feed pushed to a local endpoint while deliveries arrive at a fixed
rate; change-to-delivery latency and whether the sender keeps up."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import httpx
import orjson

from bench import procs, wire
from bench.common import PCT, Ctx, check_load, database, judge, post_spec, seed_buddies
from bench.load import buddy_ids
from bench.report import Section, Target, table
from service import store

ADMIN_TOKEN = "bench-admin-token-0001"


async def _lag(http: httpx.AsyncClient, sid: str) -> dict[str, Any]:
    r = await http.get(f"/v1/subscriptions/{sid}")
    r.raise_for_status()
    view: dict[str, Any] = r.json()
    return view


async def subscription(ctx: Ctx) -> Section:
    p = ctx.plan
    rate, seconds = p.sub_rate, p.sub_s
    sec = Section("subscription", f"Subscription at {rate:,.0f} deliveries/s")
    ids = buddy_ids(p.buddies)
    out = ctx.logs / "endpoint.jsonl"
    async with database(ctx, "subs") as (dsn, base_env):
        env = {**base_env, "MIRROR_ADMIN_TOKENS": ADMIN_TOKEN}
        pool = await store.create_pool(dsn, size=2, timeout_s=10)
        worker = await procs.start_worker(env, ctx.logs, "subs_worker")
        endpoint_port = procs.free_port()
        endpoint = procs.Proc(
            "subs_endpoint",
            [
                sys.executable,
                "-m",
                "bench.endpoint",
                "--port",
                str(endpoint_port),
                "--out",
                str(out),
            ],
            {**os.environ, "PYTHONPATH": str(procs.REPO)},
            ctx.logs,
        )
        try:
            await procs.wait_http(endpoint, endpoint_port)
            await seed_buddies(pool, env, worker, ids, 0)
            serve, port = await procs.start_service(env, ctx.logs, "subs_serve")
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            try:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30
                ) as http:
                    r = await http.post(
                        "/v1/subscriptions",
                        json={"url": f"http://127.0.0.1:{endpoint_port}/hook"},
                    )
                    r.raise_for_status()
                    sid = r.json()["subscription_id"]
                    # Where the subscription starts: the feed entries after it are the load's.
                    start = await pool.fetchrow("SELECT cursor_txid, cursor_id FROM subscriptions")
                    assert start is not None
                    start_txid, start_id = start["cursor_txid"], start["cursor_id"]
                    spec = post_spec(
                        ctx,
                        port,
                        mode="open",
                        rate=rate,
                        duration=seconds,
                        warmup=p.warmup_s,
                        count=int(rate * (seconds + p.warmup_s)) + 10,
                    )
                    loaded_at = time.time()
                    result = await procs.run_load(spec, ctx.logs, "subs_load")
                    # Caught up: every entry of the feed acknowledged.
                    deadline = time.monotonic() + 120
                    caught_up_s: float | None = None
                    while time.monotonic() < deadline:
                        view = await _lag(http, sid)
                        pending = await pool.fetchval(
                            "SELECT count(*) FROM delivery_states WHERE status = 'accepted'"
                        )
                        if view["lag"] == 0 and not pending:
                            caught_up_s = time.time() - loaded_at - p.warmup_s - seconds
                            break
                        await asyncio.sleep(0.1)
                    view = await _lag(http, sid)
            finally:
                await serve.stop()
            feed = await pool.fetchval(
                "SELECT count(*) FROM changes WHERE (txid, id) > ($1, $2)",
                start_txid,
                start_id,
            )
        finally:
            await endpoint.stop()
            await worker.stop()
            await pool.close()
    check_load(sec, "service", result)
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    first: dict[str, tuple[float, float]] = {}
    for webhook_id, committed, received in rows:
        first.setdefault(webhook_id, (committed, received))
    timed_from = loaded_at + p.warmup_s
    timed_to = timed_from + seconds
    timed = [(c, r) for c, r in first.values() if timed_from <= c < timed_to]
    lat = wire.percentiles([max(0.0, r - c) for c, r in timed])
    changes_per_s = len(timed) / seconds if seconds else 0.0
    if len(first) < feed:
        sec.problems.append(f"only {len(first):,} of {feed:,} feed entries reached the endpoint")
    if caught_up_s is None:
        sec.warnings.append(f"the subscription had not caught up 120 s after the load: {view}")
    sec.blocks.append(
        f"Open loop at {rate:,.0f} deliveries/s for {seconds:g} s (after {p.warmup_s:g} s of "
        f"warm-up) over {p.buddies:,} hatched buddies; `serve` and one `worker` (its sender "
        "owns the subscription), and the endpoint, a separate process answering 204, on the "
        "same machine. Latency is from the change's `committed_at` (the statement that "
        "wrote it, the last of its transaction before the commit; before sql/0016 the start "
        "of that transaction) to its arrival at the endpoint, for the first arrival of "
        "each change committed in the timed window."
    )
    sec.blocks.append(
        table(
            ["what", "value"],
            [
                ("feed entries made by the load (all reached the endpoint)", f"{feed:,}"),
                ("arrivals (retries and resends included)", f"{len(rows):,}"),
                ("changes committed in the timed window, per s", round(changes_per_s, 1)),
                ("caught up after the load ended, s", round(caught_up_s or -1.0, 2)),
                ("subscription status at the end", view["status"]),
            ],
        )
    )
    sec.blocks.append(
        table(
            ["change → endpoint", "n", *(f"{k} ms" for k in PCT)],
            [("latency", lat.get("n", 0), *(lat.get(k, 0.0) for k in PCT))],
        )
    )
    p99 = lat.get("p99", 1e9)
    kept_up = caught_up_s is not None and caught_up_s <= 5 and changes_per_s >= 0.95 * rate
    sec.targets += [
        Target(
            f"subscription keeps up with {rate:,.0f} changes/s",
            f"{changes_per_s:,.0f} changes/s, caught up "
            + (f"{caught_up_s:.2f} s after" if caught_up_s is not None else "never"),
            judge(p, kept_up),
        ),
        Target("subscription p99 change → delivery ≤ 250 ms", f"{p99} ms", judge(p, p99 <= 250)),
    ]
    sec.data = {"load": result, "latency_ms": lat, "feed": feed, "arrivals": len(rows)}
    return sec
