"""Wake-ups: tell the workers that a shard has pending deliveries.

One arq job per delivery would cap a worker near 670 deliveries/s, so a job means "this shard
has work" and drains whatever is pending. A Redis key per shard (`SET NX`) keeps at most one
wake-up waiting per shard: the job deletes the key only once it holds the shard's lock, so a
delivery stored after that deletion always finds the key free and enqueues the next wake-up,
and one stored before it is drained by the job that is about to run. Nothing is lost when
Redis is not there at all: the rows are in Postgres and the sweeper re-enqueues them.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from typing import Any

import structlog
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from service.hatched.debounce import request_refresh

log = structlog.get_logger(__name__)


APPLY_JOB = "apply_shard"


WAKE_TTL_S = 60


def shard_of(buddy_id: str, shards: int) -> int:
    # crc32 is stable across processes and Python versions (hash() is salted).
    return zlib.crc32(buddy_id.encode()) % shards


def wake_key(queue_name: str, shard: int) -> str:
    return f"{queue_name}:wake:{shard}"


async def wake(redis: ArqRedis, queue_name: str, shard: int, *, force: bool = False) -> None:
    """Queue a wake-up for `shard` unless one is already waiting (`force`: queue it anyway)."""
    key = wake_key(queue_name, shard)
    if force:
        await redis.set(key, b"1", ex=WAKE_TTL_S)
    elif not await redis.set(key, b"1", nx=True, ex=WAKE_TTL_S):
        return
    await redis.enqueue_job(APPLY_JOB, shard, _queue_name=queue_name)


def redis_settings(url: str, timeout_s: float) -> RedisSettings:
    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = max(1, round(timeout_s))
    settings.conn_retries = 0
    return settings


# `SET key 1 NX EX ttl` for each key, one command for all (1: the key was free). Every flush of
# the receiver wakes the shards of its batch, and a pipeline of one SET per shard cost `serve`
# about 5% of its CPU (bench/BENCHMARKS.md); this is one command to pack and one reply.
_CLAIM = """
local claimed = {}
for i, key in ipairs(KEYS) do
    claimed[i] = redis.call('SET', key, '1', 'NX', 'EX', ARGV[1]) and 1 or 0
end
return claimed
"""


class Waker:
    """The receiver's side of wake-ups: lazy, bounded in time, never raising.

    Connecting is bounded by `timeout_s`, and after a failed connect it stays quiet for a second,
    so a dead Redis costs the receiver nothing. Wake-ups run after the answers, off the request
    path, so a busy event loop gets a generous `op_timeout_s` before one counts as lost (a lost
    one waits for the sweeper).
    """

    def __init__(
        self, url: str, queue_name: str, timeout_s: float, op_timeout_s: float = 5.0
    ) -> None:
        self._url = url
        self._queue = queue_name
        self._timeout = timeout_s
        self._op_timeout = max(op_timeout_s, timeout_s)
        self._redis: ArqRedis | None = None
        self._closed = False
        self._retry_at = 0.0
        self._lock = asyncio.Lock()
        self._claim: AsyncScript | None = None
        self._scripts = True

    async def _pool(self) -> ArqRedis | None:
        if self._redis is not None or self._closed:
            return self._redis
        if time.monotonic() < self._retry_at:
            return None
        async with self._lock:
            if self._redis is None and time.monotonic() >= self._retry_at:
                try:
                    self._redis = await asyncio.wait_for(
                        create_pool(
                            redis_settings(self._url, self._timeout),
                            default_queue_name=self._queue,
                        ),
                        self._timeout * 2,
                    )
                # redis-py's ConnectionError is a RedisError, not the builtin one.
                except (OSError, TimeoutError, ConnectionError, RedisError) as exc:
                    self._fail(exc)
            return self._redis

    def _fail(self, exc: BaseException) -> None:
        log.warning("redis_unavailable", error=repr(exc))
        self._retry_at = time.monotonic() + 1.0

    async def wake(self, shard: int) -> bool:
        """True when a wake-up is queued or already pending; False when Redis failed."""
        redis = await self._pool()
        if redis is None:
            return False
        try:
            async with asyncio.timeout(self._op_timeout):
                await wake(redis, self._queue, shard)
            return True
        except Exception as exc:  # any Redis failure: the sweeper covers it
            self._fail(exc)
            return False

    async def wake_many(self, shards: list[int]) -> bool:
        """Wake several shards: their keys claimed in one command, then a job for each shard
        whose key was free (usually none: a wake-up is already waiting)."""
        redis = await self._pool()
        if redis is None:
            return False
        try:
            async with asyncio.timeout(self._op_timeout):
                claimed = await self._claimed(redis, [wake_key(self._queue, s) for s in shards])
                for shard, was_set in zip(shards, claimed, strict=True):
                    if was_set:
                        await redis.enqueue_job(APPLY_JOB, shard, _queue_name=self._queue)
            return True
        except Exception as exc:  # any Redis failure: the sweeper covers it
            self._fail(exc)
            return False

    async def _claimed(self, redis: ArqRedis, keys: list[str]) -> list[Any]:
        """For each key, whether this claimed it (`SET NX EX`)."""
        if self._scripts:
            if self._claim is None:
                self._claim = redis.register_script(_CLAIM)
            try:
                return list(await self._claim(keys=keys, args=[WAKE_TTL_S]))
            except ResponseError as exc:
                # A Redis that refuses scripts (an ACL without @scripting, a managed Redis
                # with EVAL disabled) still wakes the workers: one SET per key from now on.
                log.warning("redis_scripts_refused", error=repr(exc)[:200])
                self._scripts = False
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.set(key, b"1", nx=True, ex=WAKE_TTL_S)
            return list(await pipe.execute())

    async def request_refresh(
        self, buddy_id: str, *, priority: bool = False, delay_s: float = 0.0
    ) -> bool:
        """Queue a REST refresh of one buddy; one job id per buddy coalesces a burst."""
        redis = await self._pool()
        if redis is None:
            return False
        try:
            async with asyncio.timeout(self._op_timeout):
                await request_refresh(
                    redis, self._queue, buddy_id, priority=priority, delay_s=delay_s
                )
            return True
        except Exception as exc:
            self._fail(exc)
            return False

    async def redis(self) -> ArqRedis | None:
        """The connection, for callers with Redis work of their own (None: unreachable)."""
        return await self._pool()

    async def ping(self) -> bool:
        redis = await self._pool()
        if redis is None:
            return False
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await redis.ping())
        except Exception as exc:
            self._fail(exc)
            return False

    async def close(self) -> None:
        self._closed = True  # a late caller gets no new connection that nobody would close
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
