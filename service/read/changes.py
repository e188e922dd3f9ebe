"""The change feed over HTTP: GET /v1/changes (pages) and GET /v1/changes/stream (SSE).

Both read the same keyset (service/store/changes.py): entries after a position, only of
transactions that ended before every transaction still running, so a reader that has passed an
entry never later finds a new one sorted before it. The position is the `change_id` itself
(fixed-width hex of (txid, id)), so `after` takes a `next_cursor` or any `change_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response

from service import store
from service.apply.changes import FIELD_NAMES
from service.auth.bearer import require_token
from service.config import Settings
from service.problems import Problem, invalid_parameter, json_response, too_many_streams
from service.read import schemas
from service.read.openapi import Endpoint, Param, limit_param, text_param
from service.read.stream import EVERY_CHANGE
from service.state import AppState

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
# Entries a stream reads per query while catching up.
STREAM_PAGE = 500
# How soon a stream looks again when ended transactions' entries wait behind a running one
# (its end sends no notification when it wrote no change): soon, then less often while that
# transaction lasts, so a long one elsewhere does not have every stream polling hard.
HELD_POLL_S = 0.05
HELD_POLL_MAX_S = 1.0


@dataclass(frozen=True, slots=True)
class Query:
    after: store.Cursor | None
    buddy_id: str | None
    user_id: str | None
    fields: list[str]


def _reader(request: Request) -> AppState:
    state: AppState = request.app.state.mirror
    require_token(request, state.settings.api_tokens)
    return state


def _text(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is not None and (not value or len(value) > 256 or "\x00" in value):
        raise invalid_parameter(name, "must be 1 to 256 characters, without NUL")
    return value


def _cursor(raw: str, name: str) -> store.Cursor:
    cursor = store.Cursor.parse(raw)
    if cursor is None:
        raise Problem(
            400,
            "invalid_cursor",
            "Invalid cursor",
            f"`{name}`: not a change_id or next_cursor of this feed",
        )
    return cursor


def _query(request: Request, *, stream: bool = False) -> Query:
    fields = request.query_params.getlist("field")
    unknown = sorted(set(fields) - FIELD_NAMES)
    if unknown:
        raise invalid_parameter("field", f"{unknown[0]!r} is not a field of the buddy object")
    after = None
    if (raw := request.query_params.get("after")) is not None:
        after = _cursor(raw, "after")
    if stream and (raw := request.headers.get("last-event-id")) is not None:
        # A reconnecting EventSource sends the last id it saw, and the URL it first opened:
        # the id is the newer place.
        after = _cursor(raw.strip(), "Last-Event-ID")
    return Query(after, _text(request, "buddy_id"), _text(request, "user_id"), sorted(set(fields)))


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise invalid_parameter("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _check_retained(after: store.Cursor | None, bounds: store.Bounds, settings: Settings) -> None:
    """A cursor from before the retention (or one that pruned entries follow) is gone: the
    reader may have missed entries, and must start again from the buddies."""
    if after is None:
        return
    oldest = datetime.now(UTC) - timedelta(days=settings.changes_retention_days)
    if after.at < oldest or after.position < bounds.pruned:
        raise Problem(
            410,
            "cursor_expired",
            "Cursor expired",
            "this cursor is older than the change feed keeps entries "
            "(MIRROR_CHANGES_RETENTION_DAYS); start again without `after` and resync from the "
            "buddies",
        )


def _key(row: asyncpg.Record) -> store.Position:
    return store.Position(row["txid"], row["id"])


def render(row: asyncpg.Record) -> orjson.Fragment:
    """The change as JSON, as the query built it (service/store/changes.py, CHANGES_PAGE)."""
    return orjson.Fragment(row["doc"])


async def _read(
    pool: store.Pool, q: Query, after: store.Position, bounds: store.Bounds, limit: int
) -> list[asyncpg.Record]:
    return await store.changes_page(
        pool,
        after,
        bounds.xmin,
        buddy_id=q.buddy_id,
        user_id=q.user_id,
        fields=q.fields,
        limit=limit,
    )


def _next(after: store.Cursor | None, rows: list[asyncpg.Record], limit: int, xmin: int) -> str:
    """Past the last entry; on a short page, past everything below xmin (all of it was read,
    filters included), so a filtered poller does not scan the same entries again, and as of
    now, so a poller that keeps polling a quiet feed never holds an expired cursor."""
    if len(rows) >= limit:
        token: str = rows[-1]["change_id"]
        return token
    below = store.Position(xmin, 0)
    # Past `after` when the horizon has not moved beyond it (no transaction began since: on a
    # quiet server xmin stands still), but as of now all the same, or a quiet poller's cursor
    # would age into `cursor_expired` while it kept polling.
    position = after.position if after is not None and after.position >= below else below
    return store.Cursor(position, datetime.now(UTC)).token()


async def list_changes(request: Request) -> Response:
    state = _reader(request)
    q = _query(request)
    limit = _limit(request)
    bounds = await store.feed_bounds(state.pool)
    _check_retained(q.after, bounds, state.settings)
    after = q.after.position if q.after is not None else store.START
    rows = await _read(state.pool, q, after, bounds, limit)
    next_cursor = _next(q.after, rows, limit, bounds.xmin)
    return json_response({"data": [render(r) for r in rows], "next_cursor": next_cursor})


async def stream_changes(request: Request) -> Response:
    """SSE: every change after the position, as it commits; `id:` is the change_id."""
    state = _reader(request)
    q = _query(request, stream=True)
    broadcaster = state.broadcaster
    if broadcaster.clients >= state.settings.stream_max_clients:
        raise too_many_streams()
    start = await store.feed_bounds(state.pool)
    _check_retained(q.after, start, state.settings)

    async def events() -> AsyncIterator[ServerSentEvent]:
        # Subscribed before the first read: a commit in between leaves its wake-up queued.
        async with broadcaster.subscribe(EVERY_CHANGE) as woken:
            # Without `after`: the oldest retained entry, i.e. the first past the pruned ones.
            position = q.after.position if q.after is not None else start.pruned
            held_wait = HELD_POLL_S
            while not broadcaster.closing:
                bounds = await store.feed_bounds(state.pool)
                if position < bounds.pruned:
                    return  # fell behind the retention: the reconnect is answered 410
                rows = await _read(state.pool, q, position, bounds, STREAM_PAGE)
                for row in rows:
                    position = _key(row)
                    yield ServerSentEvent(data=row["doc"], event="change", id=row["change_id"])
                if len(rows) >= STREAM_PAGE:
                    continue
                position = max(position, store.Position(bounds.xmin, 0))
                if bounds.held:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(woken.get(), held_wait)
                    held_wait = min(2 * held_wait, HELD_POLL_MAX_S)
                else:
                    held_wait = HELD_POLL_S
                    await woken.get()

    return EventSourceResponse(
        events(), ping=state.settings.stream_ping_s, headers={"Cache-Control": "no-cache"}
    )


_FILTERS = [
    Param(
        "after",
        "query",
        {"type": "string", "pattern": "^[0-9a-f]{48}$"},
        description="a next_cursor or change_id; absent: the oldest retained entry",
    ),
    text_param("buddy_id"),
    text_param("user_id"),
    Param(
        "field",
        "query",
        {"type": "array", "items": {"type": "string", "enum": sorted(FIELD_NAMES)}},
        description="only changes of this top-level field (repeatable: any of them)",
    ),
]
_ERRORS = {
    400: "invalid_parameter or invalid_cursor: the parameter is named in `detail`",
    410: "cursor_expired: entries after the cursor were pruned",
}


def endpoints(settings: Settings) -> list[Endpoint]:
    return [
        Endpoint(
            "GET",
            "/v1/changes",
            list_changes,
            "The change feed, oldest first",
            "api",
            {200: schemas.ChangePage},
            params=[*_FILTERS, limit_param(MAX_LIMIT, DEFAULT_LIMIT)],
            errors=_ERRORS,
            tag="changes",
        ),
        Endpoint(
            "GET",
            "/v1/changes/stream",
            stream_changes,
            "Server-Sent Events: each change as it commits (event `change`, id = change_id)",
            "api",
            {200: "text/event-stream"},
            params=[
                *_FILTERS,
                Param(
                    "Last-Event-ID",
                    "header",
                    {"type": "string"},
                    description="resume right after this change_id (sent by EventSource)",
                ),
            ],
            errors={
                **_ERRORS,
                503: "too_many_streams: this process serves its maximum of live streams",
            },
            tag="changes",
        ),
    ]
