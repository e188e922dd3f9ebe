"""Read API: GET /v1/buddies/{id} (200 and 304) against a bare Starlette JSON endpoint, with the
API token and with user tokens (one per buddy's user, as browsers hold them)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson

from bench import procs
from bench.common import Ctx, check_load, database, get_spec, judge, latency, seed_buddies
from bench.load import buddy_ids
from bench.report import Section, Target, ratio, table
from service import store
from service.auth import user_tokens
from service.read.etags import etag

# Signs the user tokens of the user-token row (any 32 bytes or more).
USER_TOKEN_KEY = "bench-user-token-key-" + "b" * 43

# --- read ----------------------------------------------------------------------------------


async def read(ctx: Ctx) -> Section:
    p = ctx.plan
    sec = Section("read", "Read API")
    ids = buddy_ids(p.buddies)
    results: dict[str, dict[str, Any]] = {}
    async with database(ctx, "read") as (dsn, env):
        pool = await store.create_pool(dsn, size=2, timeout_s=10)
        worker = await procs.start_worker(env, ctx.logs, "read_worker")
        try:
            await seed_buddies(pool, env, worker, ids, 4 * p.buddies)
        finally:
            await worker.stop()
        versions = await pool.fetch("SELECT buddy_id, user_id, version FROM buddies")
        await pool.close()
        targets = [
            (f"/v1/buddies/{r['buddy_id']}", etag(r["buddy_id"], r["version"])) for r in versions
        ]
        targets_file = ctx.logs / "read_targets.json"
        targets_file.write_bytes(orjson.dumps(targets))
        # The same reads, each with a user token for that buddy's user: scope checked per request.
        now = int(time.time())
        user_targets = [
            (path, tag, user_tokens.mint(USER_TOKEN_KEY, r["user_id"], None, 3600, now))
            for (path, tag), r in zip(targets, versions, strict=True)
        ]
        user_targets_file = ctx.logs / "read_user_targets.json"
        user_targets_file.write_bytes(orjson.dumps(user_targets))
        env = {**env, "MIRROR_USER_TOKEN_SECRETS": USER_TOKEN_KEY}
        serve, port = await procs.start_service(env, ctx.logs, "read_serve")
        try:
            # Every target once before measuring: the cache then holds them all, as it does
            # in a service that has run for a while, instead of the measured seconds mixing
            # in first reads from Postgres (a slow machine's warm-up reaches only part).
            bodies = await _read_all(port, [t[0] for t in targets])
            payload = sorted(bodies, key=len)[len(bodies) // 2]  # a typical size for `bare`
            for name, conditional, file in (
                ("service_200", False, targets_file),
                ("service_304", True, targets_file),
                ("service_200_user", False, user_targets_file),
            ):
                results[name] = await procs.run_load(
                    get_spec(ctx, port, file, conditional), ctx.logs, f"read_{name}"
                )
        finally:
            await serve.stop()
    payload_file = ctx.logs / "read_payload.json"
    payload_file.write_bytes(payload)
    bare, port = await procs.start_baseline("json", ctx.logs, "--payload", str(payload_file))
    try:
        results["bare"] = await procs.run_load(
            get_spec(ctx, port, targets_file, False), ctx.logs, "read_bare"
        )
    finally:
        await bare.stop()
    for name, r in results.items():
        check_load(sec, name, r)
    base = results["bare"]["rps"]
    labels = {
        "bare": f"bare Starlette JSON endpoint ({len(payload):,} B body, no DB)",
        "service_200": "GET /v1/buddies/{id} → 200",
        "service_304": "GET /v1/buddies/{id} + If-None-Match → 304",
        "service_200_user": "GET /v1/buddies/{id} → 200, a user token per buddy's user",
    }
    rows = []
    for name in ("bare", "service_200", "service_304", "service_200_user"):
        r = results[name]
        lat = latency(r)
        rows.append(
            (
                labels[name],
                r["rps"],
                lat.get("p50", 0.0),
                lat.get("p99", 0.0),
                r["statuses"],
                ratio(r["rps"], base),
            )
        )
    sec.blocks.append(
        f"Closed loop, {p.read_conns} connections, {p.read_s:g} s after {p.warmup_s:g} s warm-up, "
        f"random buddies out of {len(targets):,} (each hatched plus ~4 events of the mix); "
        "every buddy was read once before, so the service's cache holds them all."
    )
    sec.blocks.append(table(["endpoint", "req/s", "p50 ms", "p99 ms", "statuses", "÷ bare"], rows))
    r200, r304 = results["service_200"]["rps"], results["service_304"]["rps"]
    r_user = results["service_200_user"]["rps"]
    sec.targets += [
        Target(
            "GET ≥ 0.8x bare JSON endpoint", f"{ratio(r200, base)}x", judge(p, r200 >= 0.8 * base)
        ),
        Target(
            "GET with a user token ≥ 0.8x bare JSON endpoint",
            f"{ratio(r_user, base)}x",
            judge(p, r_user >= 0.8 * base),
        ),
        Target(
            "304 path faster than 200", f"{ratio(r304, r200)}x the 200 path", judge(p, r304 > r200)
        ),
    ]
    sec.data = results
    return sec


async def _read_all(port: int, paths: list[str], conns: int = 8) -> list[bytes]:
    """GET every path (over a few connections); the bodies, in no particular order."""
    todo = iter(paths)
    bodies: list[bytes] = []
    headers = {"Authorization": f"Bearer {procs.TOKEN}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:

        async def reader() -> None:
            for path in todo:
                r = await client.get(path)
                r.raise_for_status()
                bodies.append(r.content)

        await asyncio.gather(*(reader() for _ in range(conns)))
    return bodies
