"""The service running inside the test process: a real uvicorn server, a real arq worker, and
waiting for what they do."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from service import store
from service.app import create_app
from service.apply.worker import create_worker, stop
from service.config import Settings
from service.server import BoundedHttpToolsProtocol


@contextlib.asynccontextmanager
async def serving(app: Starlette, port: int = 0) -> AsyncIterator[str]:
    """A real uvicorn server on `port` (0: a free one), for as long as the block runs."""
    # The service's own protocol without access lines, as `serve` runs it: it answers the
    # plainest deliveries itself.
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        lifespan="on",
        http=BoundedHttpToolsProtocol,
        access_log=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[None]:
    worker = create_worker(settings, handle_signals=False)
    task = asyncio.create_task(worker.main())
    try:
        yield
    finally:
        await stop(worker, task, grace_s=30)


@contextlib.asynccontextmanager
async def service_running(settings: Settings) -> AsyncIterator[str]:
    """The HTTP app and a worker for `settings`, as `serve` and `worker` run them; the base URL."""
    async with serving(create_app(settings)) as url, running_worker(settings):
        yield url


@contextlib.asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the HTTP app for `settings` (no worker), on a real uvicorn server."""
    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
        yield http


async def wait_until(
    check: Callable[[], Any], within: float = 15.0, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


async def wait_settled(pool: store.Pool, within: float = 30.0) -> None:
    """Until no stored delivery waits to be applied."""

    async def settled() -> bool:
        return not await pool.fetchval(
            "SELECT count(*) FROM delivery_states WHERE status = 'accepted'"
        )

    await wait_until(settled, within)
