"""Backlog: a stored backlog drained by one worker, against baselines (d) and (e)."""

from __future__ import annotations

from bench import inbox, procs
from bench.common import Ctx, database, drain_timed, judge, seed_buddies, shards
from bench.load import buddy_ids, make_deliveries
from bench.report import Section, Target, ratio, table
from service import store

# --- backlog -------------------------------------------------------------------------------


async def backlog(ctx: Ctx) -> Section:
    p = ctx.plan
    sec = Section("backlog", f"Worker drain of a {p.backlog:,}-delivery backlog")
    ids = buddy_ids(p.buddies)
    async with database(ctx, "backlog") as (dsn, env):
        n = shards(env)
        load = make_deliveries(p.backlog, ids, secret=procs.SECRET, fmt=ctx.fmt, seed=1)
        rows = [inbox.as_stored(d, n) for d in load]
        pool = await store.create_pool(dsn, size=2, timeout_s=10)
        worker = await procs.start_worker(env, ctx.logs, "backlog_worker")
        try:
            async with procs.RssSampler(worker.pid) as rss:
                await seed_buddies(pool, env, worker, ids, 0)
                idle_rss = procs.rss_mb(worker.pid) or 0.0
                offset = worker.log_path.stat().st_size
                cpu = procs.CpuMeter(worker.pid)
                seconds = await drain_timed(pool, rows, env, worker, cpu)
            jobs = inbox.drained_jobs(worker.log_path, offset)
            outcomes = await inbox.outcome_counts(pool)
        finally:
            await worker.stop()
            await pool.close()
        d = await procs.run_python(
            "bench.baselines",
            [
                "arq",
                "--redis",
                procs.redis_url(procs.ARQ_BASELINE_REDIS_DB),
                "--jobs",
                str(p.noop_jobs),
            ],
            ctx.logs,
            "baseline_d",
            600,
        )
        e = {
            c: await procs.run_python(
                "bench.baselines",
                ["upsert", "--dsn", dsn, "--rows", str(p.upsert_rows), "--connections", str(c)],
                ctx.logs,
                f"baseline_e{c}",
                600,
            )
            for c in (1, 4)
        }
    rate = round(p.backlog / seconds, 1)
    if outcomes.get("dead") or outcomes.get("accepted"):
        sec.problems.append(f"backlog did not end cleanly: {outcomes}")
    sec.blocks.append(
        f"{p.backlog:,} signed deliveries (format {ctx.fmt}) over {p.buddies:,} already-hatched "
        "buddies, stored with COPY exactly as the receiver stores them, committed at once; one "
        "idle worker is then woken for every shard and timed until no row is `accepted` "
        "(polled every 50 ms). Baseline (d) uses the worker's own max_jobs and poll delay."
    )
    sec.blocks.append(
        table(
            ["what", "per second", "service ÷ this"],
            [
                ("service worker: deliveries applied", rate, 1.0),
                (
                    f"(d) arq no-op jobs ({d['jobs']:,} jobs)",
                    d["jobs_per_s"],
                    ratio(rate, d["jobs_per_s"]),
                ),
                (
                    "(e) upserts, 200/txn, 1 connection",
                    e[1]["rows_per_s"],
                    ratio(rate, e[1]["rows_per_s"]),
                ),
                (
                    "(e) upserts, 200/txn, 4 connections",
                    e[4]["rows_per_s"],
                    ratio(rate, e[4]["rows_per_s"]),
                ),
            ],
        )
    )
    sec.blocks.append(
        table(
            [
                "drain s",
                "wake-up jobs",
                "deliveries per job",
                "RSS idle MB",
                "RSS peak MB",
                "all rows by status (seed too)",
            ],
            [
                (
                    round(seconds, 2),
                    jobs["jobs"],
                    jobs["per_job"],
                    round(idle_rss, 1),
                    rss.peak,
                    outcomes,
                )
            ],
        )
    )
    # Where the CPU went. The worker is one Python process, so one core is its ceiling
    # whatever the database does; the machine's busy time per item is what an apply costs in
    # all (worker, Postgres, Redis), against a bare upsert of a buddy row in (e).
    worker_us = 1e6 * cpu.process_s / p.backlog
    sec.blocks.append("CPU, from /proc (the machine has 2 cores: 2 s of CPU per second):")
    sec.blocks.append(
        table(
            [
                "during",
                "items/s",
                "machine CPU µs per item",
                "machine busy",
                "worker CPU µs per delivery",
                "one worker's ceiling (1 core)",
            ],
            [
                (
                    "service worker: the drain",
                    rate,
                    round(1e6 * cpu.machine_busy_s / p.backlog, 1),
                    f"{100 * cpu.machine_busy_s / cpu.machine_s:.0f}%" if cpu.machine_s else "-",
                    round(worker_us, 1),
                    f"{1e6 / worker_us:,.0f}/s" if worker_us else "-",
                ),
                *(
                    (
                        f"(e) upserts, {c} connection{'s' if c > 1 else ''}",
                        e[c]["rows_per_s"],
                        e[c]["machine_cpu_us"],
                        f"{e[c]['machine_busy_pct']}%",
                        "-",
                        "-",
                    )
                    for c in (1, 4)
                ),
            ],
        )
    )
    # Issue 20: an applied delivery against the bare upsert of one buddy row, same run.
    machine_us = 1e6 * cpu.machine_busy_s / p.backlog
    e_us = e[1]["machine_cpu_us"]
    vs_e1, vs_e4 = ratio(rate, e[1]["rows_per_s"]), ratio(rate, e[4]["rows_per_s"])
    sec.targets += [
        Target(
            "machine CPU per applied delivery ≤ 2.0x (e)'s per upserted row",
            f"{ratio(machine_us, e_us)}x ({machine_us:.1f} µs against {e_us} µs)",
            judge(p, machine_us <= 2.0 * e_us),
        ),
        Target("drain ≥ 0.9x (e) on one connection", f"{vs_e1}x", judge(p, vs_e1 >= 0.9)),
        Target("drain ≥ 0.5x (e) on four connections", f"{vs_e4}x", judge(p, vs_e4 >= 0.5)),
        Target("apply ≥ 10,000 deliveries/s", f"{rate:,.0f}/s", judge(p, rate >= 10_000)),
        Target(
            "apply ≥ 15x baseline (d)",
            f"{ratio(rate, d['jobs_per_s'])}x",
            judge(p, rate >= 15 * d["jobs_per_s"]),
        ),
        Target("worker RSS ≤ 250 MB during the drain", f"{rss.peak} MB", judge(p, rss.peak <= 250)),
    ]
    sec.data = {
        "rate": rate,
        "seconds": seconds,
        "jobs": jobs,
        "d": d,
        "e": e,
        "rss": rss.samples,
        "cpu": {"worker_s": cpu.process_s, "machine_busy_s": cpu.machine_busy_s},
    }
    return sec
