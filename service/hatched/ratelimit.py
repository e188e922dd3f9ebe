"""One rate budget for Hatched's REST API, shared by every process through Redis.

A token bucket kept in one Redis hash and changed only by one Lua script, so taking a token is
atomic across any number of workers and web processes. The script reads the clock with
`redis.call('TIME')`: every process measures refill against the same (server) clock, so skewed
hosts neither over- nor under-spend.

Sizing: the bucket holds at most `max(1, rate_per_min // 6)` tokens (about ten seconds of
budget, so a short burst of refreshes goes out without queueing) and refills at
`(rate_per_min - capacity) / 60` tokens a second. Any 60-second window then sees at most a full
bucket plus one minute of refill, which is exactly `rate_per_min`: the fleet never exceeds the
plan, even right after sitting idle, at the price of a steady rate a sixth below it.

A fifth of the bucket is held back for priority callers (buddies with a detected inconsistency):
normal callers only take a token when the reserve stays behind, so a backfill that saturates the
budget cannot starve the refreshes that repair visible state.
"""

from __future__ import annotations

import asyncio
import math
import random

import redis.asyncio as aioredis

# KEYS[1]: bucket hash {tokens, ts}; KEYS[2]: "blocked until" (server epoch seconds).
# ARGV: mode ("acquire" | "penalize" | "peek"), capacity, refill per second, cost, reserve,
# retry_after_s. acquire returns {1, 0} when granted, else {0, microseconds to wait before trying
# again}; peek returns {microseconds still blocked, milli-tokens in the bucket} and writes nothing.
# Lua numbers come back to the client truncated to integers, hence the small units.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local capacity = tonumber(ARGV[2])
local rate = tonumber(ARGV[3])

if ARGV[1] == 'penalize' then
  local retry_after = tonumber(ARGV[6])
  local blocked_until = now + retry_after
  local current = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
  if blocked_until > current then
    redis.call('SET', KEYS[2], string.format('%.6f', blocked_until),
               'PX', math.ceil(retry_after * 1000) + 1000)
  end
  return {0, math.ceil(retry_after * 1000000)}
end

local blocked_until = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local blocked_us = math.max(0, math.ceil((blocked_until - now) * 1000000))
if blocked_us > 0 and ARGV[1] == 'acquire' then
  return {0, blocked_us}
end

local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
if now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate)
end
if ARGV[1] == 'peek' then
  return {blocked_us, math.floor(tokens * 1000)}
end

local cost = tonumber(ARGV[4])
local reserve = tonumber(ARGV[5])

-- A normal caller must leave the reserve behind, but never needs more than a full bucket
-- (otherwise a tiny bucket would refuse it forever).
local need = math.min(cost + reserve, capacity)
if tokens >= need then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - cost), 'ts', tostring(now))
  -- Once this long has passed the bucket is full again, which is what a missing key means.
  redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
  return {1, 0}
end
return {0, math.max(1, math.ceil((need - tokens) / rate * 1000000))}
"""

RESERVE_RATIO = 0.2
# Spreads waiters that were told the same wait, so they do not all retry in the same instant.
_JITTER_S = 0.05


class RedisTokenBucket:
    """A token bucket shared by all processes that use the same Redis and `name`."""

    def __init__(
        self,
        redis: aioredis.Redis,
        rate_per_min: int = 100,
        *,
        name: str = "hatched-api",
        capacity: int | None = None,
        reserve_ratio: float = RESERVE_RATIO,
    ) -> None:
        if rate_per_min < 1:
            raise ValueError("rate_per_min must be at least 1")
        if not 0 <= reserve_ratio < 1:
            raise ValueError("reserve_ratio must be in [0, 1)")
        self.rate_per_min = rate_per_min
        self.capacity = capacity if capacity is not None else max(1, rate_per_min // 6)
        if self.capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.refill_per_s = max(rate_per_min - self.capacity, 1) / 60
        self.reserve = self.capacity * reserve_ratio
        # The hash tag keeps both keys in one slot, which a script on Redis Cluster requires.
        prefix = f"hatched-mirror:ratelimit:{{{name}}}"
        self.keys = (f"{prefix}:tokens", f"{prefix}:blocked")
        self._redis = redis
        self._script = redis.register_script(_SCRIPT)

    async def acquire(
        self, cost: int = 1, *, priority: bool = False, max_wait_s: float = 30
    ) -> bool:
        """Take `cost` tokens, waiting as long as needed but no longer than `max_wait_s`.

        Returns False, without taking anything, when the wait would exceed `max_wait_s`.
        Priority callers may use the reserve; normal callers leave it for them.
        """
        if not 1 <= cost <= self.capacity:
            raise ValueError(f"cost must be between 1 and the capacity ({self.capacity})")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait_s
        reserve = 0.0 if priority else self.reserve
        while True:
            granted, wait_us = await self._run("acquire", cost, reserve, 0.0)
            if granted:
                return True
            wait_s = wait_us / 1_000_000
            remaining = deadline - loop.time()
            if wait_s > remaining:
                return False
            await asyncio.sleep(min(remaining, wait_s + random.uniform(0, _JITTER_S)))

    async def penalize(self, retry_after_s: float) -> None:
        """After a 429: no process takes a token until `retry_after_s` (server time) has passed."""
        if math.isfinite(retry_after_s) and retry_after_s > 0:
            await self._run("penalize", 1, 0.0, retry_after_s)

    async def peek(self) -> tuple[float, float]:
        """(seconds still blocked by a penalty, tokens available now), changing nothing."""
        blocked_us, milli_tokens = await self._run("peek", 1, 0.0, 0.0)
        return blocked_us / 1_000_000, milli_tokens / 1000

    async def reset(self) -> None:
        """Forget tokens spent and any penalty: a full bucket again."""
        await self._redis.delete(*self.keys)

    async def _run(
        self, mode: str, cost: int, reserve: float, retry_after_s: float
    ) -> tuple[int, int]:
        result = await self._script(
            keys=list(self.keys),
            args=[mode, self.capacity, repr(self.refill_per_s), cost, repr(reserve), retry_after_s],
        )
        return int(result[0]), int(result[1])
