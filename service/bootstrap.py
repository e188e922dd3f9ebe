"""First-user bootstrap over HTTP: the one flow customers cannot skip steps in, owned by the mirror.

published config -> reuse-or-create egg -> mark ready -> hatch -> wait (5-45 s) -> buddy -> widget
token. `POST /v1/users/{user_id}/buddy` answers the mirrored buddy when there is one (200), else
one Hatched already has (mirrored, 200), else starts the hatch (202 with a status URL);
`GET /v1/users/{user_id}/buddy/stream` shows the progress and then the buddy the moment it is
mirrored; `widget-session` and `embed-token` mint Hatched tokens for that buddy. The flow itself,
its guard in Postgres and the worker's polling fallback are in service/hatching.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal
from urllib.parse import quote

import asyncpg
import httpx
import orjson
import structlog
from arq.connections import ArqRedis
from pydantic import BaseModel, ConfigDict
from redis.asyncio import ConnectionPool
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from service import hatching, metrics, store
from service.api import etag, too_many_streams
from service.auth import require_token
from service.config import Settings
from service.hatched_api import HatchedAPI, HatchedAPIError, RemoteBuddy
from service.hatching import HatchedProblem, Knobs, hatched_problem
from service.openapi import Endpoint, text_param
from service.problems import Problem, unavailable
from service.projector import public_view
from service.ratelimit import RedisTokenBucket
from service.receiver import read_body
from service.schemas import BuddyOut
from service.state import AppState
from service.stream import Broadcaster, TooManyClients

log = structlog.get_logger(__name__)

# How long the flow may talk to Hatched within one request (kept inside the lease).
LEAD_TIMEOUT_S = 60.0
# How long a concurrent call waits for the request running the flow before answering 202.
FOLLOW_WAIT_S = 20.0
# How long a call waits for a buddy Hatched already has to appear in the mirror.
MIRROR_WAIT_S = 5.0
# A follower re-reads its row at least this often, notification or not.
TICK_S = 0.25
MAX_BODY = 16_384
WIDGET_TTL_DEFAULT = 3600


# --- answers -------------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HatchingOut(_Out):
    """The hatch is under way; follow `status_url` (Server-Sent Events) for the buddy."""

    status: Literal["hatching"]
    operation_id: str | None
    status_url: str


class WidgetSessionOut(_Out):
    """A Hatched widget session for the user's buddy: put `token` on widget.js."""

    token: str
    session_id: str | None
    expires_at: str | None
    scopes: list[str]


class EmbedTokenOut(_Out):
    """A read-only embed token for the user's buddy."""

    token: str
    expires_at: str | None
    mode: Literal["read-only"]


def not_configured() -> Problem:
    return Problem(
        409,
        "hatched_api_not_configured",
        "Hatched API not configured",
        "set HATCHED_API_URL and HATCHED_API_KEY to bootstrap buddies through Hatched",
    )


# --- live progress and the app's bootstrap clients -----------------------------------------


class UserBroadcaster(Broadcaster):
    """service.stream.Broadcaster on the bootstraps channel, whose payload is the user id."""

    def key(self, payload: str) -> str:
        return payload


@dataclass
class BootstrapState:
    settings: Settings
    knobs: Knobs
    users: UserBroadcaster
    redis: ArqRedis
    hatched: HatchedAPI | None


def _redis(settings: Settings) -> ArqRedis:
    """Connects on first use, so the app starts while Redis is down."""
    assert settings.redis_url is not None
    pool = ConnectionPool.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout_s,
        socket_timeout=max(settings.redis_timeout_s, 1.0),
    )
    return ArqRedis(pool, default_queue_name=settings.queue_name)


@contextlib.asynccontextmanager
async def running(app: Starlette, settings: Settings) -> AsyncIterator[BootstrapState]:
    """The app's bootstrap clients (enter it in the lifespan): user streams, Redis, Hatched."""
    assert settings.database_url is not None
    users = UserBroadcaster(
        settings.database_url,
        settings.stream_max_clients,
        settings.db_timeout_s,
        channel=hatching.CHANNEL,
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
    state = BootstrapState(settings, Knobs.of(settings), users, redis, hatched)
    app.state.bootstrap = state
    try:
        yield state
    finally:
        await users.close()
        if hatched is not None:
            await hatched.aclose()
        await redis.aclose(close_connection_pool=True)


# --- request helpers -----------------------------------------------------------------------


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status, headers, media_type="application/json")


def _bad(name: str, detail: str) -> Problem:
    return Problem(400, "invalid_parameter", f"Invalid parameter `{name}`", f"`{name}`: {detail}")


def _states(request: Request) -> tuple[AppState, BootstrapState, HatchedAPI]:
    """Read token first, then the Hatched API; the order every bootstrap route answers in."""
    state: AppState = request.app.state.mirror
    require_token(request, state.settings.api_tokens)
    boot: BootstrapState | None = getattr(request.app.state, "bootstrap", None)
    if boot is None or boot.hatched is None:
        raise not_configured()
    return state, boot, boot.hatched


def _user_id(request: Request) -> str:
    user_id: str = request.path_params["user_id"]
    # Postgres text cannot hold NUL: refuse it here rather than fail in the database.
    if not 1 <= len(user_id) <= 256 or "\x00" in user_id:
        raise _bad("user_id", "must be 1 to 256 characters, without NUL")
    return user_id


def _audience(value: Any, name: str = "audience") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 256 or "\x00" in value:
        raise _bad(name, "must be a string of 1 to 256 characters without NUL, or null")
    return value


async def _body(request: Request) -> dict[str, Any]:
    raw = await read_body(request, MAX_BODY)
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _bad("body", "must be a JSON object") from None
    if not isinstance(body, dict):
        raise _bad("body", "must be a JSON object")
    return body


def _buddy_answer(found: hatching.Found) -> Response:
    buddy, version, updated_at = found
    headers = {"ETag": etag(buddy.buddy_id, version), "Cache-Control": "no-cache"}
    return _json(public_view(buddy, version, updated_at), headers=headers)


def status_url(user_id: str, audience: str | None) -> str:
    url = f"/v1/users/{quote(user_id, safe='')}/buddy/stream"
    return url + (f"?audience={quote(audience, safe='')}" if audience is not None else "")


def _hatching(user_id: str, audience: str | None, operation_id: str | None) -> Response:
    url = status_url(user_id, audience)
    body = {"status": "hatching", "operation_id": operation_id, "status_url": url}
    return _json(body, 202, {"Location": url, "Cache-Control": "no-store"})


@contextlib.asynccontextmanager
async def _wake_ups(
    broadcaster: Broadcaster, key: str
) -> AsyncIterator[Callable[[float], Awaitable[None]]]:
    """`await wait(t)` returns on a notification for `key`, or after min(t, TICK_S) anyway."""
    async with contextlib.AsyncExitStack() as stack:
        queue: asyncio.Queue[None] | None = None
        with contextlib.suppress(TooManyClients):  # a full process still answers, a tick later
            queue = await stack.enter_async_context(broadcaster.subscribe(key))

        async def wait(within: float) -> None:
            within = max(0.0, min(within, TICK_S))
            if queue is None:
                await asyncio.sleep(within)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queue.get(), within)

        yield wait


async def _await_mirrored(state: AppState, buddy_id: str, within: float) -> hatching.Found | None:
    deadline = time.monotonic() + within
    async with _wake_ups(state.broadcaster, buddy_id) as wait:
        while True:
            found = await store.get_buddy(state.pool, buddy_id)
            remaining = deadline - time.monotonic()
            if found is not None or remaining <= 0:
                return found
            await wait(remaining)


# --- POST /v1/users/{user_id}/buddy --------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    state: AppState
    boot: BootstrapState
    hatched: HatchedAPI
    user_id: str
    audience: str | None

    @property
    def key(self) -> str:
        return self.audience or ""


async def bootstrap_buddy(request: Request) -> Response:
    """The user's buddy: mirrored (200), found at Hatched (200), or hatching (202)."""
    state, boot, hatched = _states(request)
    user_id = _user_id(request)
    body = await _body(request)
    call = _Call(state, boot, hatched, user_id, _audience(body.get("audience")))
    row = await hatching.get_row(state.pool, user_id, call.key)
    found = await hatching.find_mirrored(state.pool, user_id, call.audience, row)
    if found is not None:
        return _buddy_answer(found)

    claim = uuid.uuid4()
    hatch_stale_s = boot.knobs.poll_max_s + hatching.LEASE_S
    deadline = time.monotonic() + FOLLOW_WAIT_S
    followed = False  # saw another request run the flow: adopt its outcome, do not redo it
    async with _wake_ups(boot.users, user_id) as wait:
        while True:
            if followed:
                row, mine = await hatching.get_row(state.pool, user_id, call.key), False
                if row is not None and row["status"] == "starting":
                    row, mine = await hatching.claim_row(
                        state.pool,
                        user_id,
                        call.key,
                        call.audience,
                        claim,
                        retry_failed=False,
                        hatch_stale_s=hatch_stale_s,
                    )
            else:
                row, mine = await hatching.claim_row(
                    state.pool,
                    user_id,
                    call.key,
                    call.audience,
                    claim,
                    retry_failed=True,
                    hatch_stale_s=hatch_stale_s,
                )
            if mine:
                return await _lead(call, claim)
            if row is None:
                followed = False
                continue
            answer = await _answer_from_row(call, row)
            if answer is not None:
                return answer
            followed = True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Still starting elsewhere: the stream tells the rest.
                return _hatching(user_id, call.audience, row["operation_id"])
            await wait(remaining)


async def _answer_from_row(call: _Call, row: asyncpg.Record) -> Response | None:
    status = row["status"]
    if status == "hatching":
        return _hatching(call.user_id, call.audience, row["operation_id"])
    if status == "failed":
        # Only reached after following this attempt (a stale failure is retried instead).
        raise HatchedProblem.from_stored(row["error"] or {})
    if status in ("mirroring", "completed"):
        found = await hatching.find_mirrored(call.state.pool, call.user_id, call.audience, row)
        if found is not None:
            return _buddy_answer(found)
    return None


async def _lead(call: _Call, claim: uuid.UUID) -> Response:
    """This request won the row: talk to Hatched, record the outcome, answer."""
    pool, settings = call.state.pool, call.state.settings
    try:
        try:
            async with asyncio.timeout(LEAD_TIMEOUT_S):
                outcome = await hatching.start_flow(call.hatched, call.user_id, call.audience)
            if isinstance(outcome, RemoteBuddy):
                await hatching.mirror_remote(pool, outcome, settings.shards, call.state.waker.wake)
                # Unless the trigger completed the row already; if it could not match it (an
                # audience that differs), the cron completes it, and readers go by buddy_id.
                await hatching.finish_start(
                    pool,
                    call.user_id,
                    call.key,
                    claim,
                    "mirroring",
                    egg_id=outcome.egg_id,
                    buddy_id=outcome.buddy_id,
                )
        except HatchedAPIError as exc:
            raise hatched_problem(exc) from None
        except TimeoutError:
            raise HatchedProblem(
                502,
                "hatched_unavailable",
                "Hatched unavailable",
                f"Hatched did not complete the bootstrap within {LEAD_TIMEOUT_S:g}s",
                {"Retry-After": "5"},
            ) from None
        except RedisError:
            raise unavailable("the shared Hatched rate budget (Redis) is unreachable") from None
    except Problem as problem:
        stored = (
            problem.stored()
            if isinstance(problem, HatchedProblem)
            else HatchedProblem(
                problem.status, problem.code, problem.title, problem.detail, problem.headers
            ).stored()
        )
        await hatching.finish_start(pool, call.user_id, call.key, claim, "failed", error=stored)
        raise
    except BaseException:
        # A bug or a cancelled request: free the row now rather than after the lease.
        error = {
            "status": 500,
            "code": "internal_error",
            "title": "Internal error",
            "detail": "the bootstrap request ended unexpectedly; retry",
        }
        with contextlib.suppress(Exception):
            await asyncio.shield(
                hatching.finish_start(pool, call.user_id, call.key, claim, "failed", error=error)
            )
        raise

    if isinstance(outcome, RemoteBuddy):
        found = await _await_mirrored(call.state, outcome.buddy_id, MIRROR_WAIT_S)
        if found is not None:
            return _buddy_answer(found)
        return _hatching(call.user_id, call.audience, None)

    egg_id, operation_id = outcome
    row = await hatching.finish_start(
        pool, call.user_id, call.key, claim, "hatching", egg_id=egg_id, operation_id=operation_id
    )
    if row is None:  # the buddy arrived while this request was still talking to Hatched
        found = await hatching.find_mirrored(pool, call.user_id, call.audience)
        if found is not None:
            return _buddy_answer(found)
    else:
        await hatching.schedule_poll(
            call.boot.redis, settings, call.user_id, call.key, call.boot.knobs.poll_after_s
        )
    log.info("bootstrap_hatching", user_id=call.user_id, egg_id=egg_id, operation_id=operation_id)
    return _hatching(call.user_id, call.audience, operation_id)


# --- GET /v1/users/{user_id}/buddy/stream --------------------------------------------------


async def stream_user_buddy(request: Request) -> Response:
    """SSE: `progress` events while the buddy is on its way, then `buddy` on every change."""
    state, boot, _ = _states(request)
    user_id = _user_id(request)
    raw_audience = request.query_params.get("audience")
    audience = _audience(raw_audience) if raw_audience is not None else None
    key = audience or ""
    limit = state.settings.stream_max_clients
    if boot.users.clients >= limit or state.broadcaster.clients >= limit:
        raise too_many_streams()

    async def events() -> AsyncIterator[ServerSentEvent]:
        buddy_id = None
        async with boot.users.subscribe(user_id) as woken:
            shown = None
            while not boot.users.closing:
                row = await hatching.get_row(state.pool, user_id, key)
                found = await hatching.find_mirrored(state.pool, user_id, audience, row)
                if found is not None:
                    buddy_id = found[0].buddy_id
                    break
                now = hatching.progress(row)
                if now != shown:
                    shown = now
                    yield ServerSentEvent(data=orjson.dumps(now).decode(), event="progress")
                await woken.get()
        if buddy_id is None:
            return
        async with state.broadcaster.subscribe(buddy_id) as changed:
            sent = None
            while not state.broadcaster.closing:
                found = await store.get_buddy(state.pool, buddy_id)
                if found is not None and found[1] != sent:
                    sent = found[1]
                    yield ServerSentEvent(
                        data=orjson.dumps(public_view(*found)).decode(), event="buddy", id=str(sent)
                    )
                await changed.get()

    return EventSourceResponse(
        events(), ping=state.settings.stream_ping_s, headers={"Cache-Control": "no-cache"}
    )


# --- widget session and embed token --------------------------------------------------------


async def _user_buddy_id(state: AppState, user_id: str, audience: str | None) -> str:
    found = await store.user_buddy(state.pool, user_id, audience)
    if found is None:
        raise Problem(
            404,
            "buddy_not_found",
            "Buddy not found",
            f"no buddy mirrored for user {user_id!r}; bootstrap it with POST "
            f"/v1/users/{{user_id}}/buddy first",
        )
    return found[0].buddy_id


def _scopes(value: Any) -> list[str]:
    if value is None:
        return []
    if (
        not isinstance(value, list)
        or len(value) > 32
        or not all(isinstance(s, str) and 1 <= len(s) <= 64 for s in value)
    ):
        raise _bad("scopes", "must be a list of at most 32 strings of 1 to 64 characters")
    return list(value)


def _ttl(value: Any) -> int:
    if value is None:
        return WIDGET_TTL_DEFAULT
    if isinstance(value, bool) or not isinstance(value, int) or not 60 <= value <= 86_400:
        raise _bad("ttl_seconds", "must be an integer from 60 to 86400")
    return value


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


async def _mint(call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await call
    except HatchedAPIError as exc:
        if exc.status == 404:
            raise Problem(
                404,
                "buddy_not_found",
                "Buddy not found",
                "Hatched does not know the user's mirrored buddy",
            ) from None
        raise hatched_problem(exc) from None
    except RedisError:
        raise unavailable("the shared Hatched rate budget (Redis) is unreachable") from None


def _token(minted: Mapping[str, Any]) -> str:
    token = _text(minted.get("token"))
    if token is None:
        raise hatched_problem(
            HatchedAPIError("Hatched answered without a token", status=200, code="invalid_response")
        )
    return token


async def create_widget_session(request: Request) -> Response:
    """A Hatched widget session for the user's buddy (POST /widget-sessions)."""
    state, _, hatched = _states(request)
    user_id = _user_id(request)
    body = await _body(request)
    scopes, ttl = _scopes(body.get("scopes")), _ttl(body.get("ttl_seconds"))
    buddy_id = await _user_buddy_id(state, user_id, _audience(body.get("audience")))
    minted = await _mint(hatched.create_widget_session(buddy_id, user_id, scopes, ttl))
    granted = minted.get("scopes")
    answer = {
        "token": _token(minted),
        "session_id": _text(minted.get("session_id")),
        "expires_at": _text(minted.get("expires_at")),
        "scopes": granted if isinstance(granted, list) else scopes,
    }
    return _json(answer, headers={"Cache-Control": "no-store"})


async def create_embed_token(request: Request) -> Response:
    """A read-only embed token for the user's buddy (POST /embed-tokens)."""
    state, _, hatched = _states(request)
    user_id = _user_id(request)
    body = await _body(request)
    buddy_id = await _user_buddy_id(state, user_id, _audience(body.get("audience")))
    minted = await _mint(hatched.create_embed_token(buddy_id, user_id))
    answer = {
        "token": _token(minted),
        "expires_at": _text(minted.get("expires_at")),
        "mode": "read-only",
    }
    return _json(answer, headers={"Cache-Control": "no-store"})


# --- routes --------------------------------------------------------------------------------

USER_ID = text_param("user_id", "path")
NEEDS_HATCHED = {409: "hatched_api_not_configured: HATCHED_API_URL/HATCHED_API_KEY unset"}
HATCHED_ERRORS = {
    402: "hatched_payment_required: Hatched refused for billing reasons (hatched_code says why)",
    409: "hatched_api_not_configured; no_published_config (publish_url); active_egg_limit "
    "(active: the user's unhatched eggs, none reusable)",
    429: "hatched_rate_limited: Hatched's (or the shared) request budget is spent; Retry-After",
    502: "hatched_unavailable (timeouts, 5xx; Retry-After) or hatched_error (any other refusal, "
    "with hatched_status and hatched_code)",
    503: "unavailable: Postgres or Redis unreachable",
}
BAD_BODY = {400: "invalid_parameter: the field is named in `detail`"}


def endpoints(settings: Settings) -> list[Endpoint]:
    return [
        Endpoint(
            "POST",
            "/v1/users/{user_id}/buddy",
            bootstrap_buddy,
            "First-user bootstrap: the user's buddy, hatched if there is none (one egg at most)",
            "api",
            {200: BuddyOut, 202: HatchingOut},
            params=[USER_ID],
            errors={**BAD_BODY, **HATCHED_ERRORS},
            request_body='{"audience": string | null}, optional; the body may be empty',
            tag="bootstrap",
        ),
        Endpoint(
            "GET",
            "/v1/users/{user_id}/buddy/stream",
            stream_user_buddy,
            "Server-Sent Events: `progress` while hatching, then the buddy on every change",
            "api",
            {200: "text/event-stream"},
            params=[USER_ID, text_param("audience")],
            errors={
                **BAD_BODY,
                **NEEDS_HATCHED,
                503: "too_many_streams: this process serves its maximum of live streams",
            },
            tag="bootstrap",
        ),
        Endpoint(
            "POST",
            "/v1/users/{user_id}/widget-session",
            create_widget_session,
            "Mint a Hatched widget session for the user's buddy",
            "api",
            {200: WidgetSessionOut},
            params=[USER_ID],
            errors={
                **BAD_BODY,
                404: "buddy_not_found: no buddy mirrored for the user (bootstrap first)",
                **HATCHED_ERRORS,
            },
            request_body='{"scopes": [string], "ttl_seconds": 60-86400 (default 3600), '
            '"audience": string | null}, all optional',
            tag="bootstrap",
        ),
        Endpoint(
            "POST",
            "/v1/users/{user_id}/embed-token",
            create_embed_token,
            "Mint a read-only Hatched embed token for the user's buddy",
            "api",
            {200: EmbedTokenOut},
            params=[USER_ID],
            errors={
                **BAD_BODY,
                404: "buddy_not_found: no buddy mirrored for the user (bootstrap first)",
                **HATCHED_ERRORS,
            },
            request_body='{"audience": string | null}, optional; the body may be empty',
            tag="bootstrap",
        ),
    ]


# --- the demo page (`hatched-mirror dev` only) ---------------------------------------------


@cache
def _demo_html() -> str:
    return resources.files("service").joinpath("static/demo.html").read_text(encoding="utf-8")


async def demo_page(request: Request) -> Response:
    return HTMLResponse(_demo_html(), headers={"Cache-Control": "no-store"})


def demo_route() -> Route:
    return Route("/demo", demo_page, methods=["GET"])
