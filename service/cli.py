"""The commands of the contract: dev, migrate, serve, worker, replay, rebuild, backfill, forget,
send-test-event."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx
import orjson
import uvicorn
import uvloop
from prometheus_client import start_http_server

from service import gctuning, logs, store
from service.config import ConfigError, Settings, load_settings, require
from service.server import BoundedHttpToolsProtocol

DEV_SECRET = "whsec_dev_local_secret"
DEV_API_TOKEN = "dev-api-token-local"
DEV_ADMIN_TOKEN = "dev-admin-token-local"
# `dev` signs user tokens with this unless MIRROR_USER_TOKEN_SECRETS is set (at least 32 bytes).
DEV_USER_TOKEN_SECRET = "dev-user-token-secret-not-for-production"


def _settings(command: str, **overrides: Any) -> Settings:
    try:
        settings = load_settings(**overrides)
        require(settings, command)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    logs.configure(settings.log_format)
    return settings


@click.group()
@click.version_option(package_name="hatched-mirror")
def main() -> None:
    """hatched-mirror: a mirror of Hatched buddies fed by signed webhooks."""


@main.command()
def migrate() -> None:
    """Apply sql/ migrations (idempotent; safe with several replicas at once)."""
    settings = _settings("migrate")
    try:
        applied = asyncio.run(store.migrate_database(settings.postgres_dsn))
    except store.MigrationError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")


def app_from_env() -> Any:
    """uvicorn factory for `serve --workers N`: each process reads the environment itself."""
    from service.app import create_app

    app = create_app(_settings("serve"))
    # Here rather than in `serve`: with --workers N each process builds its own app.
    gctuning.tune("serve")
    return app


def _exit_requested(signum: int, frame: object) -> None:
    raise SystemExit(0)


@main.command()
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
def serve(host: str, port: int, workers: int) -> None:
    """HTTP: receiver, read API, operations endpoints."""
    settings = _settings("serve")  # refuse to start half-configured, before forking anything
    # uvicorn re-raises the SIGTERM/SIGINT it shut down on, once it has (as `dev` notes); with
    # the default handlers the process would then die of the signal (exit 143), which
    # supervisors read as a crash. A stop that was asked for ends with status 0 instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_requested)
    if workers > 1:
        # Each process would count on its own and a scrape would see one of them at random:
        # prometheus_client's multiprocess mode shares the values through files in this
        # folder, and /metrics sums them (service/metrics.py, render_latest).
        folder = tempfile.mkdtemp(prefix="hatched-mirror-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
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
    arq_worker = create_worker(settings)
    gctuning.tune("worker")
    try:
        arq_worker.run()
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
    from service.dev.run import run_dev

    os.environ.setdefault("HATCHED_WEBHOOK_SECRETS", DEV_SECRET)
    os.environ.setdefault("MIRROR_API_TOKENS", DEV_API_TOKEN)
    os.environ.setdefault("MIRROR_ADMIN_TOKENS", DEV_ADMIN_TOKEN)
    os.environ.setdefault("MIRROR_USER_TOKEN_SECRETS", DEV_USER_TOKEN_SECRET)
    os.environ.setdefault("MIRROR_LOG_FORMAT", "console")
    base = load_settings()
    if base.database_url and base.redis_url:
        run_dev(base, host, port)
        return
    click.echo(f"starting embedded Postgres and Redis under {data_dir}/ ...")
    with embedded_services(Path(data_dir).resolve()) as (pg_url, redis_url):
        settings = load_settings(
            DATABASE_URL=base.database_url or pg_url, REDIS_URL=base.redis_url or redis_url
        )
        run_dev(settings, host, port)


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
    from service.apply.replay import requeue

    settings = _settings("worker")
    if status is None and not delivery_ids:
        status = "dead"
    statuses = None if status in (None, "all") else [status]
    since_utc = since.replace(tzinfo=UTC) if since is not None and since.tzinfo is None else since
    count = asyncio.run(requeue(settings, statuses, since_utc, list(delivery_ids) or None))
    click.echo(f"requeued {count} deliveries")


@main.command("tail-changes")
@click.option("--after", default=None, help="a change_id: start right after it")
@click.option("--buddy-id", default=None, help="only this buddy")
@click.option("--user-id", default=None, help="only this user's buddies")
@click.option("--field", "fields", multiple=True, help="only changes of this field (repeatable)")
@click.option("--follow/--no-follow", default=True, help="keep printing new changes (default)")
def tail_changes(**options: Any) -> None:
    """Print the change feed, one line per change, as changes commit."""
    from service.read.tail import run

    settings = _settings("migrate")
    run(settings.postgres_dsn, **options)


@main.command()
@click.option("--buddy-id", "buddy_ids", multiple=True, help="repeatable; default: every buddy")
def rebuild(buddy_ids: tuple[str, ...]) -> None:
    """Recompute mirrored state from the stored deliveries alone (online)."""
    from service.apply.rebuild import rebuild_all

    settings = _settings("migrate")
    changed, total = asyncio.run(rebuild_all(settings, list(buddy_ids)))
    click.echo(f"rebuilt {total} buddies, {changed} changed")


@main.command()
@click.option("--buddy-id", "buddy_ids", multiple=True, help="repeatable")
@click.option("--user-id", "user_ids", multiple=True, help="repeatable: every active buddy")
@click.option("--all", "everything", is_flag=True, help="every active buddy of the account")
def backfill(buddy_ids: tuple[str, ...], user_ids: tuple[str, ...], everything: bool) -> None:
    """Load buddies from Hatched's REST API (resumable; within the shared rate budget)."""
    from service.hatched.backfill import Target, run_from_settings

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
    loaded = asyncio.run(run_from_settings(settings, target))
    click.echo(f"backfill loaded {loaded} buddies; the worker applies them")


@main.command()
@click.option("--user-id", "user_ids", multiple=True, required=True, help="repeatable")
def forget(user_ids: tuple[str, ...]) -> None:
    """Erase end users: their buddies and everything derived from them (one transaction each).

    Afterwards a delivery, refresh or backfill of an erased buddy is answered `forgotten` and
    stored nowhere; a tombstone (a keyed hash of the buddy id) is all that is kept.
    """
    for user_id in user_ids:
        if not user_id or len(user_id) > 256 or "\x00" in user_id:
            raise click.UsageError("--user-id: must be 1 to 256 characters, without NUL")
    settings = _settings("migrate")
    busy = asyncio.run(_forget(settings, list(dict.fromkeys(user_ids))))
    if busy is not None:
        raise click.ClickException(
            f"user {busy!r} kept gaining buddies while being erased; run it again"
        )


async def _forget(settings: Settings, user_ids: list[str]) -> str | None:
    """Prints a line per user erased; returns the user that could not be, if any."""
    from service import erasure

    async for user_id, erased, keys in erasure.forget_users(settings, user_ids):
        if erased is None:
            return user_id
        removed = ", ".join(f"{table} {n}" for table, n in erased.removed.items())
        redis_part = "redis unreachable" if keys is None else f"redis keys {keys}"
        click.echo(
            f"forgot user {user_id!r}: {erased.buddies} buddies; removed {removed}; {redis_part}"
        )
    return None


@main.command()
@click.option("--url", default=None, help="a running serve: POST it a signed test delivery")
def doctor(url: str | None) -> None:
    """Check the installation and say what to fix; exit status 1 when anything fails."""
    from service.doctor import Check, render, run_checks

    try:
        settings = load_settings()
    except ConfigError as exc:
        click.echo(render([Check("configuration", False, str(exc), "fix the setting named")]))
        sys.exit(1)
    checks = asyncio.run(run_checks(settings, url))
    click.echo(render(checks))
    if not all(check.ok for check in checks):
        sys.exit(1)


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
