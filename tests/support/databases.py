"""A database of a test's own, beside the suite's: for `migrate` from nothing and the like."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg


@contextlib.asynccontextmanager
async def scratch_database(database_url: str, prefix: str = "hm_scratch") -> AsyncIterator[str]:
    """An empty database on the same server, dropped afterwards; yields its DSN. Created and
    dropped on a connection of its own with no statement limit: both force a checkpoint,
    which on a busy machine outlasts the limits some tests lower on purpose."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
