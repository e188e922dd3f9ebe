"""The receiver's wake-ups against a real Redis: a shard's wake-up is queued once while one is
waiting, and again as soon as the worker took the last one."""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from arq.jobs import Job

from service.ingest.wakeups import APPLY_JOB, Waker, wake_key

QUEUE = "hm-test-wakeups"


async def queued_shards(redis: aioredis.Redis) -> list[int]:
    """The shard argument of every apply job waiting in the queue, in no particular order."""
    shards = []
    for job_id in await redis.zrange(QUEUE, 0, -1):
        info = await Job(job_id.decode(), redis, _queue_name=QUEUE).info()
        assert info is not None and info.function == APPLY_JOB
        shards.append(info.args[0])
    return shards


async def test_wake_many_queues_one_wake_up_per_free_shard(
    redis_url: str, redis: aioredis.Redis
) -> None:
    waker = Waker(redis_url, QUEUE, timeout_s=5)
    try:
        assert await waker.wake_many([3, 7, 11])
        assert sorted(await queued_shards(redis)) == [3, 7, 11]
        ttl = await redis.ttl(wake_key(QUEUE, 7))
        assert 0 < ttl <= 60

        # Wake-ups already waiting for these shards: nothing more is queued, but a new shard is.
        assert await waker.wake_many([3, 7, 11, 20])
        assert sorted(await queued_shards(redis)) == [3, 7, 11, 20]

        # The worker took shard 7's wake-up (it deletes the key once it holds the shard): the
        # next delivery of that shard queues the next one.
        await redis.delete(wake_key(QUEUE, 7))
        assert await waker.wake_many([7, 20])
        assert sorted(await queued_shards(redis)) == [3, 7, 7, 11, 20]

        # Redis lost its scripts (a restart): the claim loads its script again.
        await redis.script_flush()
        await redis.delete(wake_key(QUEUE, 3))
        assert await waker.wake_many([3])
        assert sorted(await queued_shards(redis)) == [3, 3, 7, 7, 11, 20]
    finally:
        await waker.close()


async def test_wake_many_where_scripts_are_refused_falls_back_to_one_set_per_shard(
    redis_url: str, redis: aioredis.Redis
) -> None:
    # A user of this Redis that may run every command but scripts (as where EVAL is disabled).
    user, password = "hm-test-no-scripts", secrets.token_hex(8)
    await redis.execute_command(
        "ACL", "SETUSER", user, "reset", "on", f">{password}", "~*", "&*", "+@all", "-@scripting"
    )
    url = urlsplit(redis_url)
    limited = url._replace(netloc=f"{user}:{password}@{url.hostname}:{url.port or 6379}").geturl()
    waker = Waker(limited, QUEUE, timeout_s=5)
    try:
        assert await waker.wake_many([1, 2])
        assert sorted(await queued_shards(redis)) == [1, 2]
        assert await waker.wake_many([1, 2, 5])
        assert sorted(await queued_shards(redis)) == [1, 2, 5]
        assert 0 < await redis.ttl(wake_key(QUEUE, 5)) <= 60
    finally:
        await waker.close()
        await redis.execute_command("ACL", "DELUSER", user)


async def test_wake_many_without_redis_reports_failure() -> None:
    waker = Waker("redis://127.0.0.1:9/0", QUEUE, timeout_s=0.5)
    try:
        assert not await waker.wake_many([1, 2])
    finally:
        await waker.close()
