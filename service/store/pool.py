"""The Postgres pool and the connection types every query module takes."""

from __future__ import annotations

from typing import TypeAlias

import asyncpg
import orjson

Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
Conn: TypeAlias = (
    "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
)
# Either runs a single statement; a pool borrows a connection for it.
Executor: TypeAlias = "Conn | Pool"


async def _init_connection(conn: Conn) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: b"\x01" + orjson.dumps(v),
        decoder=lambda b: orjson.loads(b[1:]),
        schema="pg_catalog",
        format="binary",
    )


async def _keep_session(conn: Conn) -> None:
    """No reset query on release (see `create_pool`)."""


# A statement still running after this long is given up on (asyncpg cancels it): the service's
# queries take milliseconds, so one this slow is stuck, and its caller answers or retries.
COMMAND_TIMEOUT_S = 30.0


async def create_pool(
    dsn: str,
    *,
    size: int,
    timeout_s: float,
    min_size: int = 0,
    stateless: bool = False,
    bounded: bool = True,
) -> Pool:
    """A pool that starts without connecting, so a process comes up while Postgres is down.

    `stateless`: the callers leave no session state behind (no advisory locks, LISTEN or SET;
    the HTTP process), so the round trip of asyncpg's reset query on every release is skipped.
    `bounded=False`: statements may run as long as they need (migrations).
    """
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min(min_size, size),
        max_size=size,
        timeout=timeout_s,
        command_timeout=COMMAND_TIMEOUT_S if bounded else None,
        init=_init_connection,
        reset=_keep_session if stateless else None,
        # Every statement here is a probe by key, for which an index is always right. A generic
        # plan cached while a table was still empty (a new install filling up) is a sequential
        # scan, and a pooled connection keeps it until an ANALYZE: lookups then grow with the
        # table. Planning each execution costs a few dozen microseconds and cannot go stale.
        # Random reads priced near sequential ones (1.1, the usual figure for SSDs): the hot
        # pages are in memory, and at the default of 4 the planner preferred to read all of
        # `delivery_states` over a few hundred probes of its primary key when marking a batch
        # applied (a table of ~100,000 rows without fresh statistics; bench/BENCHMARKS.md).
        server_settings={"plan_cache_mode": "force_custom_plan", "random_page_cost": "1.1"},
    )
    assert pool is not None
    return pool
