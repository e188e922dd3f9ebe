"""Scenarios that send deliveries to the receiver: throughput against baselines (a), (b),
(c); ack latency under an open-loop rate; freshness from 202 to visible."""

from __future__ import annotations

import statistics
from datetime import datetime
from typing import Any

import asyncpg

from bench import procs
from bench.common import (
    PCT,
    Ctx,
    check_load,
    database,
    judge,
    latency,
    post_spec,
    seed_buddies,
)
from bench.load import buddy_ids
from bench.report import Section, Target, ratio, table
from service import store

# --- receiver ------------------------------------------------------------------------------

RECEIVERS = {
    "a": "(a) verify HMAC, answer 202",
    "b": "(b) (a) + one INSERT per request",
    "c": "(c) naive: verify + lock/project/upsert in the request",
    "service": "hatched-mirror serve (the real receiver, JSON logs on)",
}


# The receivers that store each request as one row, and where.
STORED = {"b": "bench_raw", "service": "deliveries"}


async def stored_rows(dsn: str, table_name: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        n: int = await conn.fetchval(f"SELECT count(*) FROM {table_name}")
    finally:
        await conn.close()
    return n


async def receiver(ctx: Ctx) -> Section:
    p = ctx.plan
    sec = Section("receiver", "Receiver throughput")
    # (a) and (c) once; (b) and the service in pairs, alternating which goes first: this host
    # kind's speed drifts within minutes, and one run of each is a ratio of two moments.
    order: list[str] = ["a", "c"]
    for i in range(p.receiver_pairs):
        order += _pair_order(i)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in RECEIVERS}
    for i, name in enumerate(order):
        runs[name].append(await _receiver_run(ctx, sec, name, i))
    # The run whose rate is the median of its receiver's runs stands for it in the tables.
    results = {name: _median_run(rs) for name, rs in runs.items()}
    svc = results["service"]["rps"]
    rows = []
    for name, label in RECEIVERS.items():
        r = results[name]
        lat = latency(r)
        exhausted = " (ran out of pre-signed requests)" if r.get("exhausted") else ""
        rows.append(
            (
                label + exhausted,
                r["rps"],
                lat.get("p50", 0.0),
                lat.get("p99", 0.0),
                r["bad_status"],
                ratio(svc, r["rps"]),
            )
        )
    sec.blocks.append(
        f"Closed loop, {p.receiver_conns} connections, {p.receiver_s:g} s measured after "
        f"{p.warmup_s:g} s warm-up, deliveries over {p.buddies:,} buddies, format {ctx.fmt}; "
        "the worker is not running (the inbox grows; each request still does its wake-up). "
        "Each run has a fresh database. (a) and (c) ran once; (b) and the service "
        f"{p.receiver_pairs} time(s) each, in pairs, alternating which went first; their rows "
        "are the run with the median rate, and the targets judge the median of the pairs' ratios."
    )
    sec.blocks.append(
        table(["receiver", "req/s", "p50 ms", "p99 ms", "non-202", "service ÷ this"], rows)
    )
    pairs = list(zip(runs["b"], runs["service"], strict=True))
    pair_ratios = [ratio(s["rps"], b["rps"]) for b, s in pairs]
    sec.blocks.append(
        table(
            [
                "pair",
                "first",
                "(b) req/s",
                "service req/s",
                "service ÷ (b)",
                "(b) CPU µs per stored request",
                "serve CPU µs per stored request",
            ],
            [
                (
                    i + 1,
                    "(b)" if _pair_order(i)[0] == "b" else "service",
                    b["rps"],
                    s["rps"],
                    pair_ratio,
                    round(b["process_us"], 1),
                    round(s["process_us"], 1),
                )
                for i, ((b, s), pair_ratio) in enumerate(zip(pairs, pair_ratios, strict=True))
            ],
        )
    )
    sec.blocks.append(
        "Where each run's CPU went over its measured window, per answered request: the whole "
        "machine (two cores shared by the load generator, the receiver and Postgres) and the "
        "load generator's own share; at 100% busy the machine, not one process, bounds the rate."
    )
    sec.blocks.append(
        table(
            ["receiver", "machine busy", "machine CPU µs per request", "load generator µs"],
            [window_row(RECEIVERS[name], results[name]) for name in RECEIVERS],
        )
    )
    vs_b = round(statistics.median(pair_ratios), 2)
    vs_c = ratio(svc, results["c"]["rps"])
    cpu_b = statistics.median(b["process_us"] for b, _ in pairs)
    cpu_svc = statistics.median(s["process_us"] for _, s in pairs)
    each = ", ".join(str(r) for r in pair_ratios)
    sec.targets += [
        Target(
            "throughput ≥ 1.5x baseline (b)",
            f"{vs_b}x" + (f" (median of pairs {each})" if len(pairs) > 1 else ""),
            judge(p, vs_b >= 1.5),
        ),
        Target(
            "serve CPU per request ≤ (b)'s",
            f"{cpu_svc:.0f} µs against {cpu_b:.0f} µs",
            judge(p, 0 < cpu_svc <= cpu_b),
        ),
        Target("throughput ≥ 1.2x baseline (c)", f"{vs_c}x", judge(p, vs_c >= 1.2)),
    ]
    sec.data = runs
    return sec


async def _receiver_run(ctx: Ctx, sec: Section, name: str, i: int) -> dict[str, Any]:
    """One closed-loop run of one receiver in a fresh database; for those that store each
    request as a row, also its process's CPU per stored request (`process_us`)."""
    p = ctx.plan
    async with database(ctx, f"receiver{i}") as (dsn, env):
        if name == "service":
            proc, port = await procs.start_service(env, ctx.logs, f"receiver_serve_{i}")
        else:
            proc, port = await procs.start_baseline(name, ctx.logs, "--dsn", dsn)
        try:
            spec = post_spec(
                ctx,
                port,
                mode="closed",
                concurrency=p.receiver_conns,
                duration=p.receiver_s,
                warmup=p.warmup_s,
                # (a) stores nothing, so repeating a delivery costs it nothing extra.
                cycle=name == "a",
            )
            cpu = procs.CpuMeter(proc.pid)
            cpu.start()
            result = await procs.run_load(spec, ctx.logs, f"receiver_load_{name}_{i}")
            cpu.stop()
            if name in STORED:
                # Every request of the run (warm-up too) stored one row: the process's CPU
                # per stored request, the same measure for both.
                stored = await stored_rows(dsn, STORED[name])
                result["process_us"] = 1e6 * cpu.process_s / stored if stored else 0.0
        finally:
            await proc.stop()
    check_load(sec, name, result)
    return result


def _pair_order(i: int) -> list[str]:
    """Which of (b) and the service runs first in pair `i`: they take turns."""
    return ["b", "service"] if i % 2 == 0 else ["service", "b"]


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda r: r["rps"])[(len(runs) - 1) // 2]


def window_row(label: str, result: dict[str, Any]) -> tuple[str, str, float, float]:
    cpu, done = result.get("cpu") or {}, result["completed"]
    if not cpu or not done or not cpu["machine_s"]:
        return (label, "", 0.0, 0.0)
    return (
        label,
        f"{cpu['machine_busy_s'] / cpu['machine_s']:.0%}",
        round(1e6 * cpu["machine_busy_s"] / done, 1),
        round(1e6 * cpu["load_s"] / done, 1),
    )


# --- ack latency ---------------------------------------------------------------------------


async def ack_latency(ctx: Ctx) -> Section:
    p = ctx.plan
    sec = Section("ack_latency", f"Receiver ack latency at {p.ack_rate:,.0f} deliveries/s")
    async with database(ctx, "ack") as (dsn, env):
        worker = await procs.start_worker(env, ctx.logs, "ack_worker")
        try:
            serve, port = await procs.start_service(env, ctx.logs, "ack_serve")
            try:
                count = int(p.ack_rate * (p.ack_s + p.warmup_s)) + 10
                spec = post_spec(
                    ctx,
                    port,
                    mode="open",
                    rate=p.ack_rate,
                    duration=p.ack_s,
                    warmup=p.warmup_s,
                    count=count,
                )
                r = await procs.run_load(spec, ctx.logs, "ack_load")
            finally:
                await serve.stop()
            pool = await store.create_pool(dsn, size=1, timeout_s=10)
            try:
                backlog_at_end = await pool.fetchval(
                    "SELECT count(*) FROM delivery_states WHERE status = 'accepted'"
                )
            finally:
                await pool.close()
        finally:
            await worker.stop()
    check_load(sec, "service", r)
    lat, svc, lag = latency(r), latency(r, "service_ms"), latency(r, "scheduler_lag_ms")
    sec.blocks.append(
        f"Open loop at {p.ack_rate:,.0f}/s for {p.ack_s:g} s (after {p.warmup_s:g} s warm-up), "
        f"worker running, deliveries over {p.buddies:,} buddies. Latency counts from each "
        "request's due time; 'service' counts from the moment it was written to the socket."
    )
    cols = ["from", "n", "p50 ms", "p95 ms", "p99 ms", "p99.9 ms", "max ms"]
    sec.blocks.append(
        table(
            cols,
            [
                ("due time", lat.get("n", 0), *(lat.get(k, 0.0) for k in PCT)),
                ("send", svc.get("n", 0), *(svc.get(k, 0.0) for k in PCT)),
            ],
        )
    )
    sec.blocks.append(
        table(
            ["sent/s", "202s", "non-202", "errors", "peak conns", "sched lag p99 ms", "pending"],
            [
                (
                    r["sent_rate"],
                    r["ok"],
                    r["bad_status"],
                    sum(r["errors"].values()),
                    r["peak_connections"],
                    lag.get("p99", 0.0),
                    backlog_at_end,
                )
            ],
        )
    )
    p99 = lat.get("p99", 1e9)
    sec.targets.append(
        Target(
            f"ack p99 ≤ 50 ms at {p.ack_rate:,.0f}/s for {p.ack_s:g} s",
            f"{p99} ms",
            judge(p, p99 <= 50 and not r["bad_status"]),
        )
    )
    sec.data = r
    return sec


# --- freshness -----------------------------------------------------------------------------


# Where a delivery's wait goes: from the receiver's insert (received_at: the start of its
# group-commit transaction, just before the 202) to the start of the transaction that applied
# it (applied_at), i.e. commit, wake-up, the worker's poll and the shard lock.
INBOX_WAIT = """
SELECT count(*) AS n,
       percentile_cont(ARRAY[0.5, 0.95, 0.99, 0.999]) WITHIN GROUP (ORDER BY ms) AS pct,
       max(ms) AS max
FROM (SELECT extract(epoch FROM s.applied_at - d.received_at)::float8 * 1000 AS ms
      FROM deliveries AS d JOIN delivery_states AS s ON s.seq = d.seq
      WHERE d.received_at >= $1 AND s.status = 'applied') AS w
"""


async def inbox_wait(pool: store.Pool, since: datetime) -> dict[str, float]:
    row = await pool.fetchrow(INBOX_WAIT, since)
    if row is None or not row["n"]:
        return {}
    pct = [round(x, 2) for x in row["pct"]]
    return {"n": row["n"], **dict(zip(PCT[:4], pct, strict=True)), "max": round(row["max"], 2)}


async def freshness(ctx: Ctx) -> Section:
    p = ctx.plan
    sec = Section("freshness", f"Freshness at {p.fresh_rate:,.0f} deliveries/s")
    ids = buddy_ids(p.buddies)
    async with database(ctx, "fresh") as (dsn, env):
        pool = await store.create_pool(dsn, size=2, timeout_s=10)
        worker = await procs.start_worker(env, ctx.logs, "fresh_worker")
        try:
            await seed_buddies(pool, env, worker, ids, 0)
            timed_from = await pool.fetchval("SELECT now() + make_interval(secs => $1)", p.warmup_s)
            serve, port = await procs.start_service(env, ctx.logs, "fresh_serve")
            try:
                spec = post_spec(
                    ctx,
                    port,
                    mode="open",
                    rate=p.fresh_rate,
                    duration=p.fresh_s,
                    warmup=p.warmup_s,
                    count=int(p.fresh_rate * (p.fresh_s + p.warmup_s)) + 10,
                    probe_every=p.probe_every,
                    probe_via=ctx.probe_via,
                )
                r = await procs.run_load(spec, ctx.logs, "fresh_load")
            finally:
                await serve.stop()
            wait = await inbox_wait(pool, timed_from)
        finally:
            await worker.stop()
            await pool.close()
    probe = r["probe"]
    f = probe["freshness_ms"] or {}
    check_load(sec, "service", r)
    if probe["seen"] < probe["probes"]:
        sec.warnings.append(
            f"{probe['probes'] - probe['seen']} probes never saw their change "
            f"(timeouts {probe['timeouts']}, errors {probe['errors']})"
        )
    watch = (
        "the buddy's SSE stream (opened before the POST)"
        if ctx.probe_via == "sse"
        else "GET with If-None-Match every 5 ms"
    )
    sec.blocks.append(
        f"Open loop at {p.fresh_rate:,.0f}/s for {p.fresh_s:g} s, worker running, {p.buddies:,} "
        f"hatched buddies. Every {p.probe_every}th delivery is a probe: a coins.earned with a "
        f"unique balance, watched through {watch}; freshness is from the probe's 202 to the "
        "balance being visible. The last row splits that time: from the start of the "
        "receiver's insert to the start of the worker's transaction that applied the "
        "delivery (commit, wake-up, the worker's poll, the shard lock), read from the inbox."
    )
    ack = latency(r)
    sec.blocks.append(
        table(
            ["what", "n", "p50 ms", "p95 ms", "p99 ms", "p99.9 ms", "max ms"],
            [
                ("freshness (202 → visible)", f.get("n", 0), *(f.get(k, 0.0) for k in PCT)),
                ("ack latency (all deliveries)", ack.get("n", 0), *(ack.get(k, 0.0) for k in PCT)),
                (
                    "stored → apply began (all deliveries)",
                    wait.get("n", 0),
                    *(wait.get(k, 0.0) for k in PCT),
                ),
            ],
        )
    )
    p95, p99 = f.get("p95", 1e9), f.get("p99", 1e9)
    sec.targets += [
        Target("freshness p95 ≤ 100 ms", f"{p95} ms", judge(p, p95 <= 100)),
        Target("freshness p99 ≤ 250 ms", f"{p99} ms", judge(p, p99 <= 250)),
    ]
    sec.data = {**r, "inbox_wait_ms": wait}
    return sec
