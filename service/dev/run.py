"""`hatched-mirror dev`: migrations, the HTTP app and a worker in one process, with a banner."""

from __future__ import annotations

import asyncio
import signal

import click
import uvicorn

from service import logs
from service.app import create_app
from service.apply.worker import create_worker, stop
from service.config import Settings
from service.store.migrations import migrate_database


def run_dev(settings: Settings, host: str, port: int) -> None:
    logs.configure(settings.log_format)
    asyncio.run(migrate_database(settings.postgres_dsn))
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
    click.echo("hatched-mirror dev stopped")
