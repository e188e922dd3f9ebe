"""What every scenario shares: the plan (sizes and durations), the context, and helpers."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import inbox, procs
from bench.load import Generator
from bench.report import Section
from service import store
from service.config import Settings

PCT = ("p50", "p95", "p99", "p999", "max")


@dataclass(frozen=True)
class Plan:
    """Sizes and durations. The defaults are the issue's targets (10,000 buddies, 1,000/s and
    500/s for 60 s, a 100,000-delivery backlog, 1M buddies / 20M deliveries; the upgrade at
    20M deliveries too; a change feed of 100,000 entries); QUICK keeps every code path of the
    suite and none of the load."""

    quick: bool = False
    buddies: int = 10_000
    warmup_s: float = 3.0
    receiver_s: float = 20.0
    receiver_conns: int = 64
    receiver_pairs: int = 3  # runs of (b) and of the service, alternated
    ack_rate: float = 1000.0
    ack_s: float = 60.0
    backlog: int = 100_000
    noop_jobs: int = 20_000
    upsert_rows: int = 100_000
    fresh_rate: float = 500.0
    fresh_s: float = 60.0
    sub_rate: float = 1000.0
    sub_s: float = 30.0
    probe_every: int = 25
    read_s: float = 15.0
    read_conns: int = 32
    scale_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    per_buddy: int = 20
    scale_backlog: int = 100_000
    upgrade_rows: int = 20_000_000
    feed_reps: int = 5  # pairs of drains, feed on and off
    feed_entries: int = 100_000
    feed_walks: int = 3
    feed_buddy_reads: int = 300

    def with_duration(self, seconds: float) -> Plan:
        return replace(
            self, receiver_s=seconds, ack_s=seconds, fresh_s=seconds, read_s=seconds, sub_s=seconds
        )


QUICK = Plan(
    quick=True,
    buddies=500,
    warmup_s=0.5,
    receiver_s=1.5,
    receiver_conns=16,
    receiver_pairs=2,
    ack_rate=200.0,
    ack_s=2.0,
    backlog=3_000,
    noop_jobs=300,
    upsert_rows=2_000,
    fresh_rate=100.0,
    fresh_s=2.0,
    sub_rate=100.0,
    sub_s=2.0,
    probe_every=10,
    read_s=1.5,
    read_conns=8,
    scale_sizes=(1_000, 3_000),
    per_buddy=5,
    scale_backlog=2_000,
    upgrade_rows=3_000,
    feed_reps=1,
    feed_entries=3_000,
    feed_walks=1,
    feed_buddy_reads=5,
)


@dataclass
class Ctx:
    plan: Plan
    logs: Path
    fmt: str
    probe_via: str
    plot: Path


def shards(env: dict[str, str]) -> int:
    return int(env.get("MIRROR_SHARDS") or Settings.model_fields["shards"].default)


def judge(plan: Plan, ok: bool) -> bool | None:
    return None if plan.quick else ok


def post_spec(ctx: Ctx, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "kind": "post",
        "secret": procs.SECRET,
        "token": procs.TOKEN,
        "buddies": ctx.plan.buddies,
        "format": ctx.fmt,
        "seed": 1,
        **extra,
    }


def latency(result: dict[str, Any], key: str = "latency_ms") -> dict[str, float]:
    lat: dict[str, float] = result.get(key) or {}
    return lat


def check_load(sec: Section, name: str, result: dict[str, Any]) -> None:
    """Wrong answers are problems (a quick run fails on them); connection errors under load
    are measurements of a busy machine, so they are only warnings."""
    if result.get("bad_status"):
        sec.problems.append(f"{name}: unexpected statuses {result['statuses']}")
    if not result.get("ok"):
        sec.problems.append(f"{name}: no successful request")
    if result.get("errors"):
        sec.warnings.append(f"{name}: connection errors {result['errors']}")


@contextlib.asynccontextmanager
async def database(ctx: Ctx, tag: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
    async with procs.fresh_database(tag) as dsn:
        await procs.migrate(dsn, ctx.logs)
        await procs.flush_redis(procs.SERVICE_REDIS_DB)
        yield dsn, procs.service_env(dsn)


async def seed_buddies(
    pool: store.Pool, env: dict[str, str], worker: procs.Proc, ids: list[str], extra: int
) -> None:
    """Hatch every buddy, then `extra` deliveries of the mix, applied by the worker (untimed)."""
    gen = Generator(ids, procs.SECRET, "mixed", seed=99)
    ts = int(time.time())
    n = shards(env)
    rows = [inbox.as_stored(gen.hatched(b, ts), n) for b in ids]
    rows += [inbox.as_stored(gen.next(ts), n) for _ in range(extra)]
    await inbox.load_and_drain(pool, rows, redis_url=env["REDIS_URL"], shards=n, worker=worker)


async def drain_timed(
    pool: store.Pool,
    rows: list[store.NewDelivery],
    env: dict[str, str],
    worker: procs.Proc,
    cpu: procs.CpuMeter,
) -> float:
    """inbox.load_and_drain, with `cpu` measuring the drain alone (not the COPY before it)."""

    async def start_cpu() -> None:
        cpu.start()

    seconds = await inbox.load_and_drain(
        pool,
        rows,
        redis_url=env["REDIS_URL"],
        shards=shards(env),
        worker=worker,
        before_drain=start_cpu,
    )
    cpu.stop()
    return seconds


def get_spec(ctx: Ctx, port: int, targets: Path, conditional: bool) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "kind": "get",
        "mode": "closed",
        "token": procs.TOKEN,
        "targets_file": str(targets),
        "conditional": conditional,
        "concurrency": ctx.plan.read_conns,
        "duration": ctx.plan.read_s,
        "warmup": ctx.plan.warmup_s,
    }
