"""Numbered `sql/` migrations, applied once each under an advisory lock, checksums recorded.

The migrations live in the repo's top-level `sql/`, which the wheel ships as the package data
`service.sql` (pyproject maps the one onto the other), so an installed `hatched-mirror migrate`
finds them with no setting. `MIRROR_SQL_DIR` still overrides, for trying a folder of one's own.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from service.store.pool import Conn, create_pool


def _sql_dir() -> Path:
    if override := os.environ.get("MIRROR_SQL_DIR"):
        return Path(override)
    try:
        spec = importlib.util.find_spec("service.sql")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    # A checkout run without installing: sql/ beside service/.
    return Path(__file__).resolve().parents[2] / "sql"


SQL_DIR = _sql_dir()

# Any fixed 64-bit number; every replica running `migrate` serialises on it.
MIGRATION_LOCK = 7_311_200_415


CREATE_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE schema_migrations IS 'Applied sql/ migrations with the sha256 of each file.';
"""


class MigrationError(Exception):
    pass


def migration_files(sql_dir: Path = SQL_DIR) -> list[tuple[str, str, str]]:
    """(version, checksum, sql) in order; a released file must never change."""
    out = []
    for path in sorted(sql_dir.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        text = path.read_text()
        out.append((path.stem, hashlib.sha256(text.encode()).hexdigest(), text))
    return out


async def migrate(conn: Conn, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply pending migrations under an advisory lock; returns the versions applied now."""
    files = migration_files(sql_dir)
    if not files:
        # An install that lost its sql/ folder must not report "up to date".
        raise MigrationError(f"no migrations found in {sql_dir} (set MIRROR_SQL_DIR)")
    applied_now = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(CREATE_MIGRATIONS)
        done = {
            r["version"]: r["checksum"]
            for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        for version, checksum, text in files:
            if version in done:
                if done[version] != checksum:
                    raise MigrationError(f"migration {version} changed after it was applied")
                continue
            async with conn.transaction():
                await conn.execute(text)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                    version,
                    checksum,
                )
            applied_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied_now


async def migrate_database(dsn: str, sql_dir: Path = SQL_DIR) -> list[str]:
    # Unbounded: a migration takes as long as the data makes it (sql/0008 copies a row per
    # stored delivery: 38 s at 20,000,000, bench/BENCHMARKS.md, Upgrade). Cut off by the
    # pool's command timeout, it would roll back, and every later attempt would too.
    pool = await create_pool(dsn, size=1, timeout_s=10, bounded=False)
    try:
        async with pool.acquire() as conn:
            return await migrate(conn, sql_dir)
    finally:
        await pool.close()
