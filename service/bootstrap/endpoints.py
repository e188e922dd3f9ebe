"""First-user bootstrap over HTTP: the one flow customers cannot skip steps in, owned by the mirror.

published config -> reuse-or-create egg -> mark ready -> hatch -> wait (5-45 s) -> buddy -> widget
token. `POST /v1/users/{user_id}/buddy` answers the mirrored buddy when there is one (200), else
one Hatched already has (mirrored, 200), else starts the hatch (202 with a status URL);
`GET /v1/users/{user_id}/buddy/stream` shows the progress and then the buddy the moment it is
mirrored; `widget-session` and `embed-token` mint Hatched tokens for that buddy. The flow itself,
its guard in Postgres and the worker's polling fallback are in flow.py, repository.py and
jobs.py beside this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import asyncpg
import orjson
import structlog
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response

from service import store
from service.apply.projector import public_view
from service.auth.bearer import require_reader
from service.auth.scope import narrow_body
from service.bootstrap import flow, repository
from service.bootstrap import jobs as bootstrap_jobs
from service.bootstrap import problems as bootstrap_problems
from service.bootstrap.clients import BootstrapState
from service.bootstrap.problems import hatched_problem
from service.hatched.client import HatchedAPI
from service.hatched.errors import HatchedAPIError
from service.hatched.remote import RemoteBuddy
from service.ingest.receiver import read_json_object
from service.problems import (
    Problem,
    hatched_api_not_configured,
    invalid_parameter,
    json_response,
    retry_after,
    too_many_streams,
    unavailable,
)
from service.read.etags import etag
from service.read.stream import Broadcaster, TooManyClients, buddy_events
from service.state import AppState

log = structlog.get_logger(__name__)


LEAD_TIMEOUT_S = 60.0
# How long a concurrent call waits for the request running the flow before answering 202.
FOLLOW_WAIT_S = 20.0
# How long a call waits for a buddy Hatched already has to appear in the mirror.
MIRROR_WAIT_S = 5.0
# A follower re-reads its row at least this often, notification or not.
TICK_S = 0.25
MAX_BODY = 16_384


def states(request: Request) -> tuple[AppState, BootstrapState, HatchedAPI]:
    """Read token first, then the Hatched API; the order every bootstrap route answers in."""
    state: AppState = request.app.state.mirror
    require_reader(request, state.settings.api_tokens)
    boot: BootstrapState | None = getattr(request.app.state, "bootstrap", None)
    if boot is None or boot.hatched is None:
        raise hatched_api_not_configured("bootstrap buddies through Hatched")
    return state, boot, boot.hatched


def user_id_param(request: Request) -> str:
    user_id: str = request.path_params["user_id"]
    # Postgres text cannot hold NUL: refuse it here rather than fail in the database.
    if not 1 <= len(user_id) <= 256 or "\x00" in user_id:
        raise invalid_parameter("user_id", "must be 1 to 256 characters, without NUL")
    return user_id


def audience_param(value: Any, name: str = "audience") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 256 or "\x00" in value:
        raise invalid_parameter(
            name, "must be a string of 1 to 256 characters without NUL, or null"
        )
    return value


async def json_body(request: Request) -> dict[str, Any]:
    timeout_s = request.app.state.mirror.settings.body_timeout_s
    body = await read_json_object(request, MAX_BODY, timeout_s, empty=True)
    return narrow_body(request, body)


def _buddy_answer(found: repository.Found) -> Response:
    buddy, version, updated_at = found
    headers = {"ETag": etag(buddy.buddy_id, version), "Cache-Control": "no-cache"}
    return json_response(public_view(buddy, version, updated_at), headers=headers)


def status_url(user_id: str, audience: str | None) -> str:
    url = f"/v1/users/{quote(user_id, safe='')}/buddy/stream"
    return url + (f"?audience={quote(audience, safe='')}" if audience is not None else "")


def _hatching(user_id: str, audience: str | None, operation_id: str | None) -> Response:
    url = status_url(user_id, audience)
    body = {"status": "hatching", "operation_id": operation_id, "status_url": url}
    return json_response(body, 202, {"Location": url, "Cache-Control": "no-store"})


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


async def _await_mirrored(state: AppState, buddy_id: str, within: float) -> repository.Found | None:
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
    state, boot, hatched = states(request)
    user_id = user_id_param(request)
    body = await json_body(request)
    call = _Call(state, boot, hatched, user_id, audience_param(body.get("audience")))
    row = await repository.get_row(state.pool, user_id, call.key)
    found = await flow.find_mirrored(state.pool, user_id, call.audience, row)
    if found is not None:
        return _buddy_answer(found)

    claim = uuid.uuid4()
    hatch_stale_s = boot.settings.bootstrap_poll_max_s + repository.LEASE_S
    deadline = time.monotonic() + FOLLOW_WAIT_S
    followed = False  # saw another request run the flow: adopt its outcome, do not redo it
    async with _wake_ups(boot.users, user_id) as wait:
        while True:
            # A follower claims only a row still `starting` (its runner may have died) and
            # never retries a failure it watched happen; a first call retries failed rows.
            row = await repository.get_row(state.pool, user_id, call.key) if followed else None
            mine = False
            if not followed or (row is not None and row["status"] == "starting"):
                row, mine = await repository.claim_row(
                    state.pool,
                    user_id,
                    call.key,
                    call.audience,
                    claim,
                    retry_failed=not followed,
                    hatch_stale_s=hatch_stale_s,
                )
            if mine:
                return await _lead(call, claim, row)
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
        raise bootstrap_problems.from_stored(row["error"] or {})
    if status in ("mirroring", "completed"):
        found = await flow.find_mirrored(call.state.pool, call.user_id, call.audience, row)
        if found is not None:
            return _buddy_answer(found)
    return None


async def _lead(call: _Call, claim: uuid.UUID, row: asyncpg.Record | None) -> Response:
    """This request won the row: talk to Hatched, record the outcome, answer."""
    pool, settings = call.state.pool, call.state.settings
    previous_operation = row.get("previous_operation_id") if row is not None else None
    previous = (row["previous_egg_id"], previous_operation) if row and previous_operation else None
    try:
        try:
            async with asyncio.timeout(LEAD_TIMEOUT_S):
                outcome = await flow.start_flow(call.hatched, call.user_id, call.audience, previous)
            if isinstance(outcome, RemoteBuddy):
                if not await flow.mirror_remote(
                    pool, outcome, settings.shards, call.state.waker.wake
                ):
                    raise bootstrap_problems.buddy_forgotten()
                # Unless the trigger completed the row already; if it could not match it (an
                # audience that differs), the cron completes it, and readers go by buddy_id.
                await repository.finish_start(
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
            raise Problem(
                502,
                "hatched_unavailable",
                "Hatched unavailable",
                f"Hatched did not complete the bootstrap within {LEAD_TIMEOUT_S:g}s",
                retry_after(),
            ) from None
        except RedisError:
            raise unavailable("the shared Hatched rate budget (Redis) is unreachable") from None
    except Problem as problem:
        error = bootstrap_problems.stored(problem)
        await repository.finish_start(pool, call.user_id, call.key, claim, "failed", error=error)
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
                repository.finish_start(pool, call.user_id, call.key, claim, "failed", error=error)
            )
        raise

    if isinstance(outcome, RemoteBuddy):
        found = await _await_mirrored(call.state, outcome.buddy_id, MIRROR_WAIT_S)
        if found is not None:
            return _buddy_answer(found)
        return _hatching(call.user_id, call.audience, None)

    egg_id, operation_id = outcome
    row = await repository.finish_start(
        pool, call.user_id, call.key, claim, "hatching", egg_id=egg_id, operation_id=operation_id
    )
    if row is None:  # the buddy arrived while this request was still talking to Hatched
        found = await flow.find_mirrored(pool, call.user_id, call.audience)
        if found is not None:
            return _buddy_answer(found)
    else:
        await bootstrap_jobs.schedule_poll(
            call.boot.redis, settings, call.user_id, call.key, settings.bootstrap_poll_after_s
        )
    log.info("bootstrap_hatching", user_id=call.user_id, egg_id=egg_id, operation_id=operation_id)
    return _hatching(call.user_id, call.audience, operation_id)


# --- GET /v1/users/{user_id}/buddy/stream --------------------------------------------------


async def stream_user_buddy(request: Request) -> Response:
    """SSE: `progress` events while the buddy is on its way, then `buddy` on every change."""
    state, boot, _ = states(request)
    user_id = user_id_param(request)
    raw_audience = request.query_params.get("audience")
    audience = audience_param(raw_audience) if raw_audience is not None else None
    key = audience or ""
    limit = state.settings.stream_max_clients
    if boot.users.clients >= limit or state.broadcaster.clients >= limit:
        raise too_many_streams()

    async def events() -> AsyncIterator[ServerSentEvent]:
        buddy_id = None
        async with boot.users.subscribe(user_id) as woken:
            shown = None
            while not boot.users.closing:
                row = await repository.get_row(state.pool, user_id, key)
                found = await flow.find_mirrored(state.pool, user_id, audience, row)
                if found is not None:
                    buddy_id = found[0].buddy_id
                    break
                now = flow.progress(row)
                if now != shown:
                    shown = now
                    yield ServerSentEvent(data=orjson.dumps(now).decode(), event="progress")
                await woken.get()
        if buddy_id is None:
            return
        async for event in buddy_events(state.broadcaster, state.pool, buddy_id):
            yield event

    return EventSourceResponse(
        events(), ping=state.settings.stream_ping_s, headers={"Cache-Control": "no-cache"}
    )
