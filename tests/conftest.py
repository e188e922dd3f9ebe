"""Fixtures every test may use: real Postgres and Redis (tests/support/services.py says how they
are chosen), a migrated database reset before each test, and settings for it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from service import store
from service.config import Settings
from tests.support import services
from tests.support.config import make_settings

# Every table of the schema, read from the catalog so a table added by a migration is reset too,
# without anyone remembering to list it; but for those whose rows the migrations themselves
# wrote (the record of applied migrations, the erasure key, how far the feed was pruned), which
# are configuration, not data.
KEPT_TABLES = ("schema_migrations", "erasure_key", "changes_horizon")
RESET_TABLES = """
SELECT string_agg(format('%I.%I', schemaname, tablename), ', ')
FROM pg_tables
WHERE schemaname = current_schema() AND tablename <> ALL($1::text[])
"""


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
    await store.migrate_database(database_url)
    return database_url


@pytest.fixture(scope="session")
async def pool(migrated: str) -> AsyncIterator[store.Pool]:
    p = await store.create_pool(migrated, size=4, timeout_s=10)
    yield p
    await p.close()


@pytest.fixture(scope="session")
async def reset_sql(pool: store.Pool) -> str:
    tables = await pool.fetchval(RESET_TABLES, list(KEPT_TABLES))
    return f"TRUNCATE {tables} RESTART IDENTITY"


@pytest.fixture
async def db(pool: store.Pool, reset_sql: str) -> store.Pool:
    """A clean mirror for each test."""
    await pool.execute(reset_sql)
    return pool


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def settings(db: store.Pool, migrated: str, redis_url: str, redis: aioredis.Redis) -> Settings:
    return make_settings(migrated, redis_url)
