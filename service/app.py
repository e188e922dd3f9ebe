"""create_app(settings): the receiver, the read and admin APIs, the operations endpoints."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service import metrics, store
from service.auth.scope import ScopeGuard
from service.auth.user_tokens import UserTokens
from service.bootstrap import clients
from service.bootstrap import routes as bootstrap_routes
from service.config import Settings
from service.dev import demo as demo_page
from service.ingest import receiver
from service.ingest.events import DELIVERY_STATUSES
from service.ingest.fast import DIRECT_STATE_KEY, DirectWebhooks, FastWebhooks
from service.ingest.inbox import Inbox
from service.ingest.wakeups import Waker
from service.logs import RequestIdMiddleware
from service.problems import DATABASE_ERRORS, Problem, unavailable
from service.read import changes as change_feed
from service.read import mint, openapi, schemas
from service.read import routes as api
from service.read.cache import BuddyCache
from service.read.cached import CachedBuddyReads, FastBuddyReads
from service.read.openapi import CURSOR, Endpoint, Param, limit_param, text_param
from service.read.stream import Broadcaster
from service.state import AppState
from service.subscriptions import routes as subscription_routes

log = structlog.get_logger(__name__)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state: AppState = request.app.state.mirror
    checks = {"postgres": await _postgres_ok(state.pool), "redis": await state.waker.ping()}
    status = 200 if all(checks.values()) else 503
    return JSONResponse({"status": "ok" if status == 200 else "unavailable", **checks}, status)


async def readyz_inbox(request: Request) -> Response:
    """Ready to take deliveries: the inbox (Postgres) answers. Redis is not needed for a 202,
    so an orchestrator that routes by this stays up through a Redis outage."""
    state: AppState = request.app.state.mirror
    ok = await _postgres_ok(state.pool)
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "postgres": ok}, 200 if ok else 503
    )


async def _postgres_ok(pool: store.Pool) -> bool:
    try:
        return bool(await pool.fetchval("SELECT 1"))
    except DATABASE_ERRORS:
        return False


async def metrics_endpoint(request: Request) -> Response:
    state: AppState = request.app.state.mirror
    # Inbox gauges are read at scrape time, so any replica's /metrics shows the shared backlog.
    try:
        await metrics.refresh_inbox_gauges(state.pool)
    except DATABASE_ERRORS as exc:
        log.warning("metrics_inbox_unavailable", error=repr(exc))
    metrics.STREAM_CLIENTS.set(state.broadcaster.clients)
    body, media_type = metrics.render_latest()
    return Response(body, media_type=media_type)


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    code = codes.get(exc.status_code, f"http_{exc.status_code}")
    return Problem(exc.status_code, code, str(exc.detail), headers=exc.headers).response()


async def unexpected_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, asyncpg.DataError):
        # The database refused a value from the request (a NUL in a path segment, say).
        return Problem(
            400,
            "invalid_parameter",
            "Invalid parameter",
            "a parameter holds a value the database cannot store (e.g. a NUL character)",
        ).response()
    if isinstance(exc, DATABASE_ERRORS):
        log.error("database_unavailable", path=request.url.path, error=repr(exc))
        return unavailable("the database is unreachable; retry later").response()
    log.exception("unhandled_error", path=request.url.path)
    return Problem(500, "internal_error", "Internal error").response()


BUDDY_ID = text_param("buddy_id", "path")
NOT_FOUND = {
    400: "invalid_parameter: an id no buddy can have (NUL, control character, too long)",
    404: "buddy_not_found: no such buddy mirrored",
}
BAD_PAGE = {400: "invalid_parameter or invalid_cursor: the parameter is named in `detail`"}


def endpoints(settings: Settings) -> list[Endpoint]:
    """Every route of the service; admin routes exist only when admin tokens are configured."""
    read = [
        Endpoint(
            "POST",
            receiver.PATH,
            receiver.receive,
            "Receive a signed Hatched delivery",
            "signature",
            {202: schemas.ReceiverAnswer, 200: schemas.ReceiverAnswer},
            errors={
                400: "ambiguous_header (a significant header repeated) or delivery_refused",
                401: "missing_signature, invalid_signature or stale_timestamp",
                408: "request_timeout: the body did not arrive within MIRROR_BODY_TIMEOUT_S",
                413: "payload_too_large",
                503: "unavailable: the inbox database is unreachable; Hatched retries",
            },
            request_body="the raw delivery as Hatched signed it (v1 envelope or v2 payload)",
            tag="receiver",
        ),
        Endpoint(
            "GET",
            "/v1/buddies",
            api.list_buddies,
            "List buddies, by id",
            "api",
            {200: schemas.BuddyPage},
            params=[text_param("user_id"), text_param("audience"), limit_param(), CURSOR],
            errors=BAD_PAGE,
            user="buddies",
        ),
        Endpoint(
            "GET",
            "/v1/buddies/{buddy_id}",
            api.get_buddy,
            "One buddy, with ETag",
            "api",
            {200: schemas.BuddyOut, 304: None},
            params=[BUDDY_ID, Param("If-None-Match", "header", {"type": "string"})],
            errors=NOT_FOUND,
            user="buddy",
        ),
        Endpoint(
            "GET",
            "/v1/buddies/{buddy_id}/ledger",
            api.ledger,
            "Coin and token ledger, newest first",
            "api",
            {200: schemas.LedgerPage},
            params=[BUDDY_ID, text_param("currency"), limit_param(), CURSOR],
            errors={**NOT_FOUND, **BAD_PAGE},
            user="buddy",
        ),
        Endpoint(
            "GET",
            "/v1/buddies/{buddy_id}/events",
            api.events,
            "Deliveries applied to this buddy, newest first",
            "api",
            {200: schemas.EventPage},
            params=[BUDDY_ID, limit_param(), CURSOR],
            errors={**NOT_FOUND, **BAD_PAGE},
            user="buddy",
        ),
        Endpoint(
            "GET",
            "/v1/buddies/{buddy_id}/stream",
            api.stream_buddy,
            "Server-Sent Events: the full buddy each time it changes",
            "api",
            {200: "text/event-stream"},
            params=[BUDDY_ID],
            errors={
                400: NOT_FOUND[400],
                503: "too_many_streams: this process serves its maximum of live streams",
            },
            user="buddy",
        ),
        Endpoint(
            "GET",
            "/v1/users/{user_id}/buddy",
            api.user_buddy,
            "The user's most recently hatched buddy",
            "api",
            {200: schemas.BuddyOut, 304: None},
            params=[text_param("user_id", "path"), text_param("audience")],
            errors=NOT_FOUND,
            user="user",
        ),
        Endpoint(
            "POST",
            "/v1/user-tokens",
            mint.create_user_token,
            "Mint a user token: one end user's read-only credential for the browser",
            "api",
            {201: schemas.UserTokenOut},
            errors={
                400: "invalid_parameter: the field is named in `detail` (ttl_seconds above "
                "MIRROR_USER_TOKEN_MAX_TTL_S, say)",
                409: "user_tokens_not_configured: MIRROR_USER_TOKEN_SECRETS unset",
            },
            request_body='{"user_id": string, "audience": string | null, "ttl_seconds": '
            "integer (default 900)}",
        ),
        Endpoint(
            "GET",
            "/healthz",
            healthz,
            "Process alive",
            "none",
            {200: schemas.Health},
            tag="operations",
        ),
        Endpoint(
            "GET",
            "/readyz",
            readyz,
            "Postgres and Redis reachable",
            "none",
            {200: schemas.Health, 503: schemas.Health},
            tag="operations",
        ),
        Endpoint(
            "GET",
            "/readyz/inbox",
            readyz_inbox,
            "Postgres reachable: deliveries are accepted (the serve readiness probe)",
            "none",
            {200: schemas.Health, 503: schemas.Health},
            tag="operations",
        ),
        Endpoint(
            "GET",
            "/metrics",
            metrics_endpoint,
            "Prometheus metrics",
            "none",
            {200: "text/plain"},
            tag="operations",
        ),
    ]
    read += bootstrap_routes.endpoints(settings)
    read += change_feed.endpoints(settings)
    if not settings.admin_tokens:
        return read
    admin = [
        Endpoint(
            "GET",
            "/v1/deliveries",
            api.list_deliveries,
            "Stored deliveries, newest first",
            "admin",
            {200: schemas.DeliveryPage},
            params=[
                Param("status", "query", {"type": "string", "enum": list(DELIVERY_STATUSES)}),
                text_param("buddy_id"),
                limit_param(),
                CURSOR,
            ],
            errors=BAD_PAGE,
            tag="admin",
        ),
        Endpoint(
            "POST",
            "/v1/deliveries/{delivery_id}/replay",
            api.replay_delivery,
            "Re-apply one stored delivery",
            "admin",
            {202: schemas.Queued},
            params=[text_param("delivery_id", "path")],
            errors={
                400: "invalid_parameter: an id no delivery can have",
                404: "delivery_not_found",
            },
            tag="admin",
        ),
        Endpoint(
            "POST",
            "/v1/buddies/{buddy_id}/refresh",
            api.refresh_buddy,
            "Fetch this buddy from Hatched now",
            "admin",
            {202: schemas.Queued},
            params=[BUDDY_ID],
            errors={
                400: NOT_FOUND[400],
                409: "hatched_api_not_configured: HATCHED_API_URL/HATCHED_API_KEY unset",
                503: "unavailable: could not queue the refresh",
            },
            tag="admin",
        ),
        Endpoint(
            "DELETE",
            "/v1/users/{user_id}",
            api.forget_user,
            "Erase an end user: its buddies, their ledger, stored deliveries and bootstrap rows",
            "admin",
            {200: schemas.UserForgotten},
            params=[text_param("user_id", "path")],
            errors={
                400: "invalid_parameter: user_id",
                503: "unavailable: the database is unreachable, or the user kept changing; retry",
            },
            tag="admin",
        ),
    ]
    admin += subscription_routes.endpoints(settings)
    return read + admin


def create_app(settings: Settings, *, demo: bool = False) -> Starlette:
    """`demo`: also serve the bootstrap example page at /demo (`hatched-mirror dev` only)."""
    table = endpoints(settings)
    document = orjson.dumps(openapi.build(table))

    async def openapi_json(request: Request) -> Response:
        return Response(document, media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        pool = await store.create_pool(
            settings.postgres_dsn,
            size=settings.db_pool_size,
            timeout_s=settings.db_timeout_s,
            stateless=True,
        )
        waker = Waker(settings.redis_dsn, settings.queue_name, settings.redis_timeout_s)
        broadcaster = Broadcaster(
            settings.postgres_dsn,
            settings.stream_max_clients,
            settings.db_timeout_s,
            BuddyCache(settings.read_cache_size),
        )
        broadcaster.start()
        inbox = Inbox(pool, waker)
        app.state.mirror = AppState(
            settings=settings, pool=pool, waker=waker, broadcaster=broadcaster, inbox=inbox
        )
        try:
            async with clients.running(app, settings):
                # The lifespan state reaches the HTTP protocol (service/server.py), which
                # answers the plainest deliveries itself.
                yield {DIRECT_STATE_KEY: DirectWebhooks(app.state.mirror, unexpected_error)}
        finally:
            await inbox.close()
            await broadcaster.close()
            await waker.close()
            await pool.close()

    table.append(Endpoint("GET", "/openapi.json", openapi_json, "", "none", {}))
    routes = [ep.route() for ep in table]
    if demo:
        routes.append(demo_page.demo_route())
    metrics.set_build_info()
    user_tokens = UserTokens(settings.user_token_secrets, settings.user_token_max_ttl_s)
    cors: dict[str, Any] | None = None
    if settings.cors_origins:
        cors = {
            "allow_origins": settings.cors_origins,
            "allow_methods": ["GET", "POST"],
            # Authorization carries user tokens (never an API token: see the README).
            "allow_headers": ["Authorization", "If-None-Match", "Content-Type"],
            "expose_headers": ["ETag"],
        }
    # In front of everything: a delivery, and a cached buddy read with a good token, answered
    # with what the layers below would have added (metrics, request id, CORS, the exception
    # handlers); all else goes on through them.
    middleware = [
        Middleware(FastWebhooks, unexpected=unexpected_error, cors=cors is not None),
        Middleware(FastBuddyReads, tokens=user_tokens, cors=cors),
    ]
    # Then the metrics, so the time and status are those the client sees.
    middleware += [Middleware(metrics.HttpMetrics), Middleware(RequestIdMiddleware)]
    if cors is not None:
        middleware.append(Middleware(CORSMiddleware, **cors))
    # Inside CORS and the request id, which apply to what they answer; the scope guard first,
    # so the cached reads serve a user token only what the guard admitted.
    middleware.append(Middleware(ScopeGuard, endpoints=table, tokens=user_tokens))
    middleware.append(Middleware(CachedBuddyReads))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            Problem: _problem,
            HTTPException: _http_error,
            Exception: unexpected_error,
        },
    )
    # No redirects: Starlette's answer to `/v1/buddies/` would be a 307 to an absolute URL built
    # from the request's Host header. A path that is not a route is a 404 problem instead.
    app.router.redirect_slashes = False
    return app
