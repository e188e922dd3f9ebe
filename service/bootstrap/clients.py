"""The app's bootstrap clients: user streams, Redis, Hatched (entered in the lifespan)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import structlog
from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool
from starlette.applications import Starlette

from service import metrics
from service.bootstrap import repository
from service.config import Settings
from service.hatched.client import HatchedAPI
from service.hatched.ratelimit import RedisTokenBucket
from service.read.stream import Broadcaster

log = structlog.get_logger(__name__)


# --- live progress and the app's bootstrap clients -----------------------------------------


class UserBroadcaster(Broadcaster):
    """service.read.stream.Broadcaster on the bootstraps channel, whose payload is the user id."""

    def key(self, payload: str) -> str:
        return payload


@dataclass
class BootstrapState:
    settings: Settings
    users: UserBroadcaster
    redis: ArqRedis
    hatched: HatchedAPI | None


def _redis(settings: Settings) -> ArqRedis:
    """Connects on first use, so the app starts while Redis is down."""
    pool = ConnectionPool.from_url(
        settings.redis_dsn,
        socket_connect_timeout=settings.redis_timeout_s,
        socket_timeout=max(settings.redis_timeout_s, 1.0),
    )
    return ArqRedis(pool, default_queue_name=settings.queue_name)


@contextlib.asynccontextmanager
async def running(app: Starlette, settings: Settings) -> AsyncIterator[BootstrapState]:
    """The app's bootstrap clients (enter it in the lifespan): user streams, Redis, Hatched."""
    users = UserBroadcaster(
        settings.postgres_dsn,
        settings.stream_max_clients,
        settings.db_timeout_s,
        channel=repository.CHANNEL,
    )
    redis = _redis(settings)
    hatched = None
    if settings.hatched_api_enabled:
        # Someone waits on these calls: fail fast rather than retry for minutes.
        hatched = HatchedAPI.from_settings(
            settings,
            bucket=RedisTokenBucket(redis, settings.hatched_api_rate_per_min),
            on_request=metrics.observe_hatched_call,
            timeout=httpx.Timeout(settings.hatched_api_timeout_s, connect=3),
            max_attempts=2,
            max_retry_after_s=2.0,
            budget_wait_s=5.0,
        )
        users.start()
    state = BootstrapState(settings, users, redis, hatched)
    app.state.bootstrap = state
    try:
        yield state
    finally:
        await users.close()
        if hatched is not None:
            await hatched.aclose()
        await redis.aclose(close_connection_pool=True)


# --- request helpers -----------------------------------------------------------------------
