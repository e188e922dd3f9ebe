"""`hatched-mirror dev`: migrations, the HTTP app and a worker in one process, with a banner."""

from __future__ import annotations

import asyncio
import signal
import time

import click
import uvicorn

from service import logs
from service.app import create_app
from service.apply.worker import create_worker, stop
from service.auth import user_tokens
from service.config import Settings
from service.store.migrations import migrate_database

# The user the demo page's printed user token speaks for.
DEMO_USER = "demo_user_1"


def run_dev(settings: Settings, host: str, port: int) -> None:
    logs.configure(settings.log_format)
    asyncio.run(migrate_database(settings.postgres_dsn))
    url = f"http://{host}:{port}"
    # The demo page holds what a browser may hold: a user token, not the API token.
    user_token = (
        user_tokens.mint(
            settings.user_token_secrets[0],
            DEMO_USER,
            None,
            settings.user_token_max_ttl_s,
            int(time.time()),
        )
        if settings.user_token_secrets
        else "(none: MIRROR_USER_TOKEN_SECRETS is empty)"
    )
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
                f"  user token       : {user_token} ({DEMO_USER}, "
                f"{settings.user_token_max_ttl_s} s)",
                f"  bootstrap demo   : {url}/demo#token={user_token}"
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
