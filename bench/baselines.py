"""Baselines, each the least code that does one job, measured beside the service in each run.

    python -m bench.baselines http a|b|c|json --port P [--dsn DSN] [--payload FILE]
    python -m bench.baselines arq --redis URL --jobs N
    python -m bench.baselines upsert --dsn DSN --rows N --connections C

(a) verify the HMAC, answer 202. (b) (a) plus one INSERT of the raw delivery, committed per
request. (c) the naive design: verify, then lock, project and upsert the buddy inside the
request (the service's own projector, so the comparison is about where the work happens).
(d) arq, one job per delivery, a no-op function. (e) asyncpg upserts of buddy rows, 200 per
transaction: the database ceiling for applying. `json`: a bare JSON endpoint for the read API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from arq.connections import RedisSettings, create_pool
from arq.worker import Worker, func
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.load import SKILLS, buddy_ids
from bench.procs import CpuMeter
from service import store
from service.apply.projector import STATE_FIELDS, Buddy, project
from service.config import Settings
from service.ingest.events import parse_delivery
from service.ingest.signatures import SignatureError, Verified, verify

SECRETS = ["whsec_bench_secret_0123456789"]
ACCEPTED = b'{"status":"accepted"}'


def _verify(body: bytes, request: Request) -> Verified:
    return verify(body, request.headers, SECRETS, time.time(), 300)


def _app(route: Route, dsn: str | None = None, init: str | None = None) -> Starlette:
    """One route plus /healthz; a pool of the service's default size when a DSN is given."""

    async def healthz(request: Request) -> Response:
        return Response(b"ok")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if dsn is None:
            yield
            return
        size = Settings.model_fields["db_pool_size"].default
        app.state.pool = await store.create_pool(dsn, size=size, timeout_s=10)
        if init:
            await app.state.pool.execute(init)
        yield
        await app.state.pool.close()

    return Starlette(routes=[route, Route("/healthz", healthz)], lifespan=lifespan)


async def a_verify(request: Request) -> Response:
    try:
        _verify(await request.body(), request)
    except SignatureError:
        return Response(status_code=401)
    return Response(ACCEPTED, 202, media_type="application/json")


RAW_TABLE = """
CREATE TABLE IF NOT EXISTS bench_raw (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id text NOT NULL UNIQUE,
    received_at timestamptz NOT NULL DEFAULT now(),
    headers jsonb NOT NULL,
    body bytea NOT NULL)
"""
RAW_INSERT = """
INSERT INTO bench_raw (delivery_id, headers, body) VALUES ($1, $2, $3)
ON CONFLICT (delivery_id) DO NOTHING
"""


async def b_insert(request: Request) -> Response:
    body = await request.body()
    try:
        _verify(body, request)
    except SignatureError:
        return Response(status_code=401)
    h = request.headers
    delivery_id = h.get("x-hatched-delivery") or h.get("hatched-delivery-id") or ""
    hatched = {k: v for k, v in h.items() if "hatched" in k}
    await request.app.state.pool.execute(RAW_INSERT, delivery_id, hatched, body)
    return Response(ACCEPTED, 202, media_type="application/json")


_seq = itertools.count(1)


async def c_naive(request: Request) -> Response:
    body = await request.body()
    try:
        v = _verify(body, request)
    except SignatureError:
        return Response(status_code=401)
    signed_at = datetime.fromtimestamp(v.timestamp, UTC)
    parsed = parse_delivery(body, request.headers, v.format, signed_at)
    if parsed.event is not None:
        buddy_id = parsed.event.buddy_id
        async with request.app.state.pool.acquire() as conn, conn.transaction():
            state, version = (await store.lock_buddies(conn, [buddy_id])).get(buddy_id, (None, 0))
            outcome = project(state, buddy_id, [(next(_seq), parsed.event)])
            await store.save_buddies(conn, [(outcome.buddy, version + 1)])
    return Response(ACCEPTED, 202, media_type="application/json")


def json_app(payload: Path) -> Starlette:
    doc = orjson.loads(payload.read_bytes())

    async def bare(request: Request) -> Response:
        return Response(orjson.dumps(doc), media_type="application/json")

    return _app(Route("/v1/buddies/{buddy_id}", bare))


def http_app(kind: str, dsn: str | None, payload: Path | None) -> Starlette:
    if kind == "json":
        if payload is None:
            raise SystemExit("the json baseline needs --payload")
        return json_app(payload)
    if kind != "a" and dsn is None:
        raise SystemExit(f"baseline {kind} needs --dsn")
    handler = {"a": a_verify, "b": b_insert, "c": c_naive}[kind]
    route = Route("/webhooks/hatched", handler, methods=["POST"])
    return _app(route, dsn if kind != "a" else None, RAW_TABLE if kind == "b" else None)


# --- (d) arq, one no-op job per delivery ---------------------------------------------------

_jobs = {"n": 0, "first": 0.0, "last": 0.0}


async def noop(ctx: dict[str, Any], *args: Any) -> None:
    now = time.perf_counter()
    if not _jobs["n"]:
        _jobs["first"] = now
    _jobs["n"] += 1
    _jobs["last"] = now


async def arq_noop(url: str, jobs: int) -> dict[str, Any]:
    """Enqueue `jobs` first, then time a burst worker from its first job to its last."""
    queue = "bench-noop"
    redis = await create_pool(RedisSettings.from_dsn(url), default_queue_name=queue)
    await redis.delete(queue)
    for start in range(0, jobs, 500):
        chunk = range(start, min(jobs, start + 500))
        await asyncio.gather(*(redis.enqueue_job("noop", i, _queue_name=queue) for i in chunk))
    await redis.aclose()
    # The service worker's own knobs (max_jobs = pool size - 1, poll delay), so only the
    # job-per-delivery shape differs.
    fields = Settings.model_fields
    worker = Worker(
        functions=[func(noop, name="noop")],
        redis_settings=RedisSettings.from_dsn(url),
        queue_name=queue,
        burst=True,
        handle_signals=False,
        max_jobs=max(2, fields["db_pool_size"].default - 1),
        poll_delay=fields["worker_poll_s"].default,
        keep_result=0,
    )
    await worker.main()
    await worker.close()
    span = _jobs["last"] - _jobs["first"]
    return {
        "jobs": _jobs["n"],
        "seconds": round(span, 3),
        "jobs_per_s": round((_jobs["n"] - 1) / span, 1) if span > 0 else 0.0,
    }


# --- (e) the database ceiling: batched upserts of buddy rows -------------------------------

_COLS = ", ".join(STATE_FIELDS)
_PARAMS = ", ".join(f"${i}" for i in range(1, len(STATE_FIELDS) + 2))
_SET = ", ".join(f"{n} = EXCLUDED.{n}" for n in STATE_FIELDS if n != "buddy_id")
UPSERT = f"""
INSERT INTO bench_buddies ({_COLS}, version) VALUES ({_PARAMS})
ON CONFLICT (buddy_id) DO UPDATE SET {_SET}, version = EXCLUDED.version, updated_at = now()
"""


def _buddy(buddy_id: str, n: int) -> Buddy:
    at = datetime(2026, 4, 22, 10, 30, tzinfo=UTC)
    key = [1776853800000000 + n, n]
    return Buddy(
        buddy_id=buddy_id,
        user_id=f"user_{buddy_id[-7:]}",
        name="Pip",
        status="active",
        evolution_stage=2,
        image_url="https://cdn.hatched.live/buddies/x/stage2.png",
        coins=100 + n,
        tokens={"gem": 3},
        skills={k: {"value": 40 + n % 50, "level": 2} for k in SKILLS[:3]},
        badges={"badge_week_warrior": {"status": "awarded", "awarded_at": at.isoformat()}},
        streaks={"daily_lesson": {"count": n % 30, "last_milestone": 7}},
        items_owned=["item_cowboy_hat"],
        hatched_at=at,
        last_event_at=at,
        clock={f: key for f in ("coins", "name", "evolution_stage", "skills.vocabulary")},
    )


def _row(b: Buddy, version: int) -> tuple[Any, ...]:
    return (*(getattr(b, name) for name in STATE_FIELDS), version)


async def upsert_ceiling(dsn: str, rows: int, connections: int, batch: int) -> dict[str, Any]:
    ids = buddy_ids(10_000)
    pool = await store.create_pool(dsn, size=connections, timeout_s=10)
    try:
        await pool.execute(
            "DROP TABLE IF EXISTS bench_buddies;"
            " CREATE TABLE bench_buddies (LIKE buddies INCLUDING ALL)"
        )
        await pool.executemany(UPSERT, [_row(_buddy(b, 0), 1) for b in ids])
        await pool.execute("VACUUM ANALYZE bench_buddies")
        # Rows prepared before the clock, like the load generator's signed bodies.
        work = [_row(_buddy(ids[i % len(ids)], i), 2 + i) for i in range(rows)]
        batches = [work[i : i + batch] for i in range(0, len(work), batch)]
        it = iter(batches)

        async def writer() -> None:
            async with pool.acquire() as conn:
                for chunk in it:
                    # Sorted ids: concurrent writers lock rows in one order and never deadlock.
                    chunk.sort(key=lambda r: str(r[0]))
                    async with conn.transaction():
                        await conn.executemany(UPSERT, chunk)

        cpu = CpuMeter(os.getpid())
        cpu.start()
        started = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(connections)))
        seconds = time.perf_counter() - started
        cpu.stop()
    finally:
        await pool.close()
    return {
        "rows": rows,
        "batch": batch,
        "connections": connections,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1),
        # This client and Postgres share the machine: its busy time is the cost of a row.
        "machine_cpu_us": round(1e6 * cpu.machine_busy_s / rows, 1),
        "machine_busy_pct": round(100 * cpu.machine_busy_s / cpu.machine_s) if cpu.machine_s else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines")
    sub = parser.add_subparsers(dest="what", required=True)
    http = sub.add_parser("http")
    http.add_argument("kind", choices=["a", "b", "c", "json"])
    http.add_argument("--port", type=int, required=True)
    http.add_argument("--dsn")
    http.add_argument("--payload", type=Path)
    arq = sub.add_parser("arq")
    arq.add_argument("--redis", required=True)
    arq.add_argument("--jobs", type=int, default=20_000)
    up = sub.add_parser("upsert")
    up.add_argument("--dsn", required=True)
    up.add_argument("--rows", type=int, default=100_000)
    up.add_argument("--connections", type=int, default=1)
    up.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    if args.what == "http":
        app = http_app(args.kind, args.dsn, args.payload)
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_config=None, access_log=False)
        return
    if args.what == "arq":
        result = asyncio.run(arq_noop(args.redis, args.jobs))
    else:
        result = asyncio.run(upsert_ceiling(args.dsn, args.rows, args.connections, args.batch))
    print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    main()
