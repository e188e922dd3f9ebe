"""Shared fixtures: real Postgres and Redis (see tests/services.py for how they are chosen)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvicorn
from starlette.applications import Starlette

from service import store
from service.apply.worker import create_worker, stop
from service.config import Settings
from tests import services

SECRET = "whsec_test_fixture_secret"
SECOND_SECRET = "whsec_second_during_rotation"
API_TOKEN = "test-api-token-0001"
ADMIN_TOKEN = "test-admin-token"
# Fixtures were signed at this time; tests that replay them as recorded pin `now` to it.
FIXTURE_TIME = 1776853800


def pytest_report_header() -> str:
    return f"services: {services.describe()}"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with services.database_url() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with services.redis_url() as url:
        yield url


@pytest.fixture(scope="session")
async def migrated(database_url: str) -> str:
    pool = await store.create_pool(database_url, size=1, timeout_s=10)
    try:
        async with pool.acquire() as conn:
            await store.migrate(conn)
    finally:
        await pool.close()
    return database_url


@pytest.fixture(scope="session")
async def pool(migrated: str) -> AsyncIterator[store.Pool]:
    p = await store.create_pool(migrated, size=4, timeout_s=10)
    yield p
    await p.close()


@pytest.fixture
async def db(pool: store.Pool) -> store.Pool:
    """A clean mirror for each test."""
    await pool.execute(
        "TRUNCATE deliveries, delivery_states, delivery_signatures, buddies, ledger,"
        " backfill_checkpoints, bootstraps"
        " RESTART IDENTITY"
    )
    return pool


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


def make_settings(database_url: str, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "HATCHED_WEBHOOK_SECRETS": f"{SECRET},{SECOND_SECRET}",
        "MIRROR_API_TOKENS": API_TOKEN,
        "MIRROR_ADMIN_TOKENS": ADMIN_TOKEN,
        "MIRROR_SHARDS": "8",
        "MIRROR_SWEEP_AFTER_S": "1",
        "MIRROR_LOG_FORMAT": "console",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(db: store.Pool, migrated: str, redis_url: str, redis: aioredis.Redis) -> Settings:
    return make_settings(migrated, redis_url)


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    """A real uvicorn server on a free port, for as long as the block runs."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on")
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


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[str]:
    from service.app import create_app

    async with serving(create_app(settings)) as url:
        yield url


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[None]:
    worker = create_worker(settings, handle_signals=False)
    task = asyncio.create_task(worker.main())
    try:
        yield
    finally:
        await stop(worker, task, grace_s=30)


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
