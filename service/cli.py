"""The commands of the contract: dev, migrate, serve, worker, send-test-event."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx
import orjson
import uvicorn
import uvloop
from prometheus_client import start_http_server

from service import logs, store
from service.config import ConfigError, Settings, load_settings, require
from service.server import BoundedHttpToolsProtocol

DEV_SECRET = "whsec_dev_local_secret"
DEV_API_TOKEN = "dev-api-token-local"
DEV_ADMIN_TOKEN = "dev-admin-token-local"


def _settings(command: str, **overrides: Any) -> Settings:
    try:
        settings = load_settings(**overrides)
        require(settings, command)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    logs.configure(settings.log_format)
    return settings


async def _migrate(dsn: str, sql_dir: Path = store.SQL_DIR) -> list[str]:
    # Unbounded: a migration takes as long as the data makes it (sql/0008 copies a row per
    # stored delivery: 38 s at 20,000,000, bench/BENCHMARKS.md, Upgrade). Cut off by the
    # pool's command timeout, it would roll back, and every later attempt would too.
    pool = await store.create_pool(dsn, size=1, timeout_s=10, bounded=False)
    try:
        async with pool.acquire() as conn:
            return await store.migrate(conn, sql_dir)
    finally:
        await pool.close()


@click.group()
@click.version_option(package_name="hatched-mirror")
def main() -> None:
    """hatched-mirror: a mirror of Hatched buddies fed by signed webhooks."""


@main.command()
def migrate() -> None:
    """Apply sql/ migrations (idempotent; safe with several replicas at once)."""
    settings = _settings("migrate")
    assert settings.database_url is not None
    try:
        applied = asyncio.run(_migrate(settings.database_url))
    except store.MigrationError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")


def app_from_env() -> Any:
    """uvicorn factory for `serve --workers N`: each process reads the environment itself."""
    from service.app import create_app

    return create_app(_settings("serve"))


@main.command()
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
def serve(host: str, port: int, workers: int) -> None:
    """HTTP: receiver, read API, operations endpoints."""
    settings = _settings("serve")  # refuse to start half-configured, before forking anything
    uvicorn.run(
        "service.cli:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=20,
        # The service's own limits (service/server.py); uvicorn names the head size after h11.
        http=BoundedHttpToolsProtocol,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keepalive_timeout_s,
        limit_concurrency=settings.max_connections,
    )


@main.command()
def worker() -> None:
    """The arq worker: apply wake-ups, sweep."""
    from service.apply.worker import create_worker

    settings = _settings("worker")
    if settings.worker_metrics_port:
        # The worker has no HTTP server of its own; Prometheus scrapes this port.
        start_http_server(settings.worker_metrics_port)
    # uvloop, as uvicorn uses for `serve`: a worker's time goes mostly to small socket round
    # trips to Postgres and Redis, which uvloop's transports make cheaper. arq takes the
    # current loop.
    asyncio.set_event_loop(uvloop.new_event_loop())
    try:
        create_worker(settings).run()
    except asyncio.CancelledError:
        # SIGTERM: once the completion wait is over, arq cancels the jobs still running and its
        # close() re-raises that cancellation, even for a job it had only just fetched. The
        # stop was asked for and a cancelled job's batch rolls back (the sweeper re-wakes its
        # shard): a clean exit, not a crash.
        click.echo("worker stopped; jobs still running were cancelled", err=True)


@main.command()
@click.option("--data-dir", default=".hatched-mirror", show_default=True, type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def dev(data_dir: str, host: str, port: int) -> None:
    """Everything in one process: migrations, receiver, read API, worker.

    Uses DATABASE_URL / REDIS_URL when set, else embedded Postgres and Redis under --data-dir.
    """
    from service.dev.embedded import embedded_services

    os.environ.setdefault("HATCHED_WEBHOOK_SECRETS", DEV_SECRET)
    os.environ.setdefault("MIRROR_API_TOKENS", DEV_API_TOKEN)
    os.environ.setdefault("MIRROR_ADMIN_TOKENS", DEV_ADMIN_TOKEN)
    os.environ.setdefault("MIRROR_LOG_FORMAT", "console")
    base = load_settings()
    if base.database_url and base.redis_url:
        _run_dev(base, host, port)
        return
    click.echo(f"starting embedded Postgres and Redis under {data_dir}/ ...")
    with embedded_services(Path(data_dir).resolve()) as (pg_url, redis_url):
        settings = load_settings(
            DATABASE_URL=base.database_url or pg_url, REDIS_URL=base.redis_url or redis_url
        )
        _run_dev(settings, host, port)


def _run_dev(settings: Settings, host: str, port: int) -> None:
    from service.app import create_app
    from service.apply.worker import create_worker, stop

    logs.configure(settings.log_format)
    assert settings.database_url is not None
    asyncio.run(_migrate(settings.database_url))
    url = f"http://{host}:{port}"
    click.echo(
        "\n".join(
            [
                "",
                "hatched-mirror dev is running",
                f"  webhook endpoint : {url}/webhooks/hatched",
                f"  read API         : {url}/v1/buddies/{{buddy_id}}",
                f"  webhook secret   : {settings.webhook_secrets[0]}",
                f"  API token        : {settings.api_tokens[0]}",
                f"  admin token      : {(settings.admin_tokens or ['(none)'])[0]}",
                f"  DATABASE_URL     : {settings.database_url}",
                f"  REDIS_URL        : {settings.redis_url}",
                "  try              : hatched-mirror send-test-event buddy.hatched",
                f"  bootstrap demo   : {url}/demo#token={settings.api_tokens[0]}"
                + ("" if settings.hatched_api_enabled else " (set HATCHED_API_URL/_KEY)"),
                "",
            ]
        )
    )

    async def run() -> None:
        # uvicorn re-raises the SIGTERM/SIGINT it handled once it has shut down; with the
        # default handlers that would end the process before the embedded Postgres and Redis
        # are stopped. What it re-raises lands here instead, and `dev` exits normally.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        server = uvicorn.Server(
            uvicorn.Config(create_app(settings, demo=True), host=host, port=port, log_config=None)
        )
        worker = create_worker(settings, handle_signals=False)
        worker_task = asyncio.create_task(worker.main())
        try:
            await server.serve()
        finally:
            await stop(worker, worker_task)

    asyncio.run(run())


@main.command()
@click.option(
    "--status",
    type=click.Choice(["dead", "unmapped", "all"]),
    default=None,
    help="which stored deliveries (default: dead, unless --delivery-id is given)",
)
@click.option("--since", type=click.DateTime(), default=None, help="received at or after (UTC)")
@click.option("--delivery-id", "delivery_ids", multiple=True, help="repeatable")
def replay(status: str | None, since: datetime | None, delivery_ids: tuple[str, ...]) -> None:
    """Re-apply stored deliveries (the worker picks them up)."""
    settings = _settings("worker")
    if status is None and not delivery_ids:
        status = "dead"
    statuses = None if status in (None, "all") else [status]
    since_utc = since.replace(tzinfo=UTC) if since is not None and since.tzinfo is None else since
    count = asyncio.run(_replay(settings, statuses, since_utc, list(delivery_ids) or None))
    click.echo(f"requeued {count} deliveries")


async def _replay(
    settings: Settings,
    statuses: list[str] | None,
    since: datetime | None,
    delivery_ids: list[str] | None,
) -> int:
    from service.ingest.wakeups import Waker

    assert settings.database_url is not None and settings.redis_url is not None
    # Unbounded: `--status all` or `--since` on a large inbox updates millions of rows in one
    # statement, far longer than the service's statement limit.
    pool = await store.create_pool(
        settings.database_url, size=2, timeout_s=settings.db_timeout_s, bounded=False
    )
    waker = Waker(settings.redis_url, settings.queue_name, settings.redis_timeout_s)
    try:
        per_shard = await store.requeue_by_shard(
            pool, delivery_ids=delivery_ids, statuses=statuses, since=since
        )
        woken = [await waker.wake(shard) for shard in sorted(per_shard)]
        if not all(woken):
            click.echo("Redis unreachable: the worker's sweeper will apply them shortly", err=True)
        return sum(per_shard.values())
    finally:
        await waker.close()
        await pool.close()


@main.command()
@click.option("--buddy-id", "buddy_ids", multiple=True, help="repeatable; default: every buddy")
def rebuild(buddy_ids: tuple[str, ...]) -> None:
    """Recompute mirrored state from the stored deliveries alone (online)."""
    settings = _settings("migrate")
    changed, total = asyncio.run(_rebuild(settings, list(buddy_ids)))
    click.echo(f"rebuilt {total} buddies, {changed} changed")


async def _rebuild(settings: Settings, buddy_ids: list[str]) -> tuple[int, int]:
    from tqdm import tqdm

    from service.apply.applier import rebuild_buddy

    assert settings.database_url is not None
    pool = await store.create_pool(settings.database_url, size=2, timeout_s=settings.db_timeout_s)
    changed = total = 0
    try:
        async with pool.acquire() as conn:
            count = len(buddy_ids) or await store.count_buddies(conn)
            with tqdm(total=count, unit="buddy", desc="rebuild", mininterval=1.0) as bar:
                after = None
                while True:
                    page = buddy_ids if buddy_ids else await store.buddy_ids_page(conn, after, 500)
                    for buddy_id in page:
                        changed += await rebuild_buddy(conn, buddy_id)
                        total += 1
                        bar.update()
                    if buddy_ids or not page:
                        break
                    after = page[-1]
    finally:
        await pool.close()
    return changed, total


@main.command()
@click.option("--buddy-id", "buddy_ids", multiple=True, help="repeatable")
@click.option("--user-id", "user_ids", multiple=True, help="repeatable: every active buddy")
@click.option("--all", "everything", is_flag=True, help="every active buddy of the account")
def backfill(buddy_ids: tuple[str, ...], user_ids: tuple[str, ...], everything: bool) -> None:
    """Load buddies from Hatched's REST API (resumable; within the shared rate budget)."""
    from service.hatched.backfill import Target

    if sum(map(bool, (buddy_ids, user_ids, everything))) != 1:
        raise click.UsageError("give exactly one of --buddy-id, --user-id or --all")
    settings = _settings("worker")
    if not settings.hatched_api_enabled:
        raise click.ClickException("backfill needs HATCHED_API_URL and HATCHED_API_KEY")
    if everything:
        target = Target("all")
    elif buddy_ids:
        target = Target("buddy", buddy_ids)
    else:
        target = Target("user", user_ids)
    loaded = asyncio.run(_backfill(settings, target))
    click.echo(f"backfill loaded {loaded} buddies; the worker applies them")


async def _backfill(settings: Settings, target: Any) -> int:
    from arq.connections import create_pool as create_redis
    from tqdm import tqdm

    from service import metrics
    from service.hatched import backfill
    from service.hatched.client import HatchedAPI
    from service.hatched.ratelimit import RedisTokenBucket
    from service.ingest.wakeups import redis_settings

    assert settings.database_url is not None and settings.redis_url is not None
    pool = await store.create_pool(settings.database_url, size=2, timeout_s=settings.db_timeout_s)
    redis = await create_redis(
        redis_settings(settings.redis_url, settings.redis_timeout_s),
        default_queue_name=settings.queue_name,
    )
    bucket = RedisTokenBucket(redis, settings.hatched_api_rate_per_min)
    api = HatchedAPI.from_settings(settings, bucket=bucket, on_request=metrics.observe_hatched_call)
    total = len(target.ids) if target.kind == "buddy" else None
    try:
        # Always shown (also in CI logs and pods), not only on a terminal.
        with tqdm(total=total, unit="buddy", desc="backfill", mininterval=1.0) as bar:
            return await backfill.run(
                target,
                api=api,
                pool=pool,
                redis=redis,
                queue_name=settings.queue_name,
                shards=settings.shards,
                progress=bar.update,
            )
    finally:
        await api.aclose()
        await redis.aclose()
        await pool.close()


@main.command("send-test-event")
@click.argument("event_type")
@click.option("--buddy-id", default="buddy_01HXA7Q2M9K3", show_default=True)
@click.option("--url", default="http://127.0.0.1:8000/webhooks/hatched", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["v1", "v2"]), default="v2", show_default=True)
@click.option("--secret", default=None, help="default: first of HATCHED_WEBHOOK_SECRETS")
@click.option("--data", "data_json", default=None, help="JSON object of payload fields")
def send_test_event(
    event_type: str, buddy_id: str, url: str, fmt: str, secret: str | None, data_json: str | None
) -> None:
    """Sign and POST a sample delivery, the way `stripe trigger` does."""
    from service.dev.samples import SAMPLE_TYPES, build_delivery

    try:
        secrets = load_settings().webhook_secrets
    except ConfigError:
        secrets = []
    secret = secret or (secrets[0] if secrets else DEV_SECRET)
    data = orjson.loads(data_json) if data_json else None
    try:
        headers, body = build_delivery(
            event_type, "v1" if fmt == "v1" else "v2", secret=secret, buddy_id=buddy_id, data=data
        )
    except ValueError as exc:
        raise click.ClickException(f"{exc}; known types: {', '.join(SAMPLE_TYPES)}") from None
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"could not POST to {url}: {exc}") from None
    click.echo(f"{response.status_code} {response.text}")
    if response.status_code >= 300:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
