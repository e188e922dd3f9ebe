"""service.embedded (PostgreSQL and Redis) and the service choice of tests/support/services.py."""

from __future__ import annotations

import importlib.util
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from service.dev.embedded import (
    embedded_services,
    postgres_data_dir,
    redis_data_dir,
    start_postgres,
    start_redis,
    stop_postgres,
    stop_redis,
)

SERVICES_PY = Path(__file__).resolve().parents[1] / "support" / "services.py"


def _load_services() -> ModuleType:
    """tests/support/services.py, whether or not tests/ is on sys.path."""
    name = "_hatched_tests_services"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, SERVICES_PY)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


services = _load_services()


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


async def _select_one(dsn: str) -> object:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


def _redis(url: str) -> aioredis.Redis:
    # (redis.asyncio.from_url has no annotations; mypy --strict rejects calling it.)
    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0)
    return aioredis.Redis(host=parts.hostname or "127.0.0.1", port=parts.port or 6379, db=db)


async def _ping(url: str) -> bool:
    client = _redis(url)
    try:
        return bool(await client.ping())
    finally:
        await client.aclose()


async def test_embedded_services_start_answer_and_stop(tmp_path: Path) -> None:
    with embedded_services(tmp_path) as (dsn, redis_url):
        assert dsn.startswith("postgresql://postgres@127.0.0.1:")
        assert redis_url.startswith("redis://127.0.0.1:")
        assert await _select_one(dsn) == 1
        assert await _ping(redis_url)

    assert not _accepts(_port(dsn))
    assert not _accepts(_port(redis_url))
    # Stopping keeps the data.
    assert (postgres_data_dir(tmp_path) / "PG_VERSION").exists()
    assert (redis_data_dir(tmp_path) / "dump.rdb").exists()


async def test_embedded_data_survives_a_restart(tmp_path: Path) -> None:
    dsn = start_postgres(tmp_path)
    redis_url = start_redis(tmp_path)
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('hello')")
        finally:
            await conn.close()
        client = _redis(redis_url)
        try:
            await client.set("kept", "hello")
        finally:
            await client.aclose()
        # Starting again while running adopts the running servers.
        assert start_postgres(tmp_path) == dsn
        assert start_redis(tmp_path) == redis_url
    finally:
        stop_redis(tmp_path)
        stop_postgres(tmp_path)

    with embedded_services(tmp_path) as (dsn, redis_url):
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            assert await conn.fetchval("SELECT v FROM kept") == "hello"
        finally:
            await conn.close()
        client = _redis(redis_url)
        try:
            assert await client.get("kept") == b"hello"
        finally:
            await client.aclose()


def test_stopping_what_is_not_running_is_a_no_op(tmp_path: Path) -> None:
    stop_postgres(tmp_path)
    stop_redis(tmp_path)


@contextmanager
def _must_not_run(*_args: object, **_kwargs: object) -> Iterator[str]:
    raise AssertionError("nothing should be started")
    yield ""  # pragma: no cover


def _must_not_ping() -> bool:
    raise AssertionError("Docker should not be consulted")


def test_services_use_the_environment_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_DATABASE_URL", "postgresql://sentinel:pw@db.invalid:1/sentinel")
    monkeypatch.setenv("TEST_REDIS_URL", "redis://redis.invalid:1/5")
    monkeypatch.setattr(services, "docker_available", _must_not_ping)
    monkeypatch.setattr(services, "embedded_postgres", _must_not_run)
    monkeypatch.setattr(services, "embedded_redis", _must_not_run)

    with services.database_url() as url:
        assert url == "postgresql://sentinel:pw@db.invalid:1/sentinel"
    with services.redis_url() as url:
        assert url == "redis://redis.invalid:1/5"
    assert services.describe() == "services: postgres=$TEST_DATABASE_URL, redis=$TEST_REDIS_URL"


async def test_services_fall_back_to_embedded_without_docker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TEST_DATABASE_URL", raising=False)
    monkeypatch.delenv("TEST_REDIS_URL", raising=False)
    monkeypatch.setattr(services, "docker_available", lambda: False)

    assert "embedded" in services.describe()
    with services.database_url() as dsn, services.redis_url() as redis_url:
        assert await _select_one(dsn) == 1
        assert await _ping(redis_url)
    assert not _accepts(_port(dsn))
    assert not _accepts(_port(redis_url))


def test_docker_probe_answers_a_bool_without_warnings() -> None:
    # No Docker engine here, but on a developer machine there may be: either way a bool, fast,
    # and no ResourceWarning leaking out of docker-py (warnings are errors in this suite).
    assert isinstance(services.docker_available(), bool)
