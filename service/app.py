"""create_app(settings): the receiver, the read API and the operations endpoints."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import api, receiver, store
from service.config import Settings
from service.problems import Problem
from service.queue import Waker
from service.state import AppState

log = structlog.get_logger(__name__)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state: AppState = request.app.state.mirror
    checks = {"postgres": await _postgres_ok(state.pool), "redis": await state.waker.ping()}
    status = 200 if all(checks.values()) else 503
    return JSONResponse({"status": "ok" if status == 200 else "unavailable", **checks}, status)


async def _postgres_ok(pool: store.Pool) -> bool:
    try:
        return bool(await pool.fetchval("SELECT 1"))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    code = codes.get(exc.status_code, f"http_{exc.status_code}")
    return Problem(exc.status_code, code, str(exc.detail), headers=exc.headers).response()


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled_error", path=request.url.path)
    return Problem(500, "internal_error", "Internal error").response()


def create_app(settings: Settings) -> Starlette:
    assert settings.database_url is not None and settings.redis_url is not None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        assert settings.database_url is not None and settings.redis_url is not None
        pool = await store.create_pool(
            settings.database_url, size=settings.db_pool_size, timeout_s=settings.db_timeout_s
        )
        waker = Waker(settings.redis_url, settings.queue_name, settings.redis_timeout_s)
        app.state.mirror = AppState(settings=settings, pool=pool, waker=waker)
        try:
            yield
        finally:
            await waker.close()
            await pool.close()

    routes = [
        Route("/webhooks/hatched", receiver.receive, methods=["POST"]),
        Route("/v1/buddies/{buddy_id}", api.get_buddy, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "If-None-Match", "Content-Type"],
                expose_headers=["ETag"],
            )
        )
    return Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            Problem: _problem,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
