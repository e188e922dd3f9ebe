"""Read and admin API for the customer's frontends and operators."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import orjson
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response

from service import erasure, store
from service.apply.projector import Buddy, iso, public_view
from service.auth.bearer import require_reader, require_token
from service.ids import MAX_ID_CHARS, is_valid_id
from service.ingest.events import DELIVERY_STATUSES
from service.problems import (
    Problem,
    buddy_not_found,
    invalid_parameter,
    json_response,
    no_such_buddy,
    too_many_streams,
    unavailable,
)
from service.read.etags import etag, rendered
from service.read.stream import buddy_events
from service.state import AppState

T = TypeVar("T")

MAX_LIMIT = 200
DEFAULT_LIMIT = 50


def _reader(request: Request) -> AppState:
    state: AppState = request.app.state.mirror
    require_reader(request, state.settings.api_tokens)
    return state


def admin_state(request: Request) -> AppState:
    state: AppState = request.app.state.mirror
    require_token(request, state.settings.admin_tokens)
    return state


# ASCII digits only: `str.isdigit` and `int()` also take "²" or "٣", and no client means them.
_INTEGER = re.compile(r"[0-9]{1,6}")
# The longest cursor this API issues is well under this; decoding more is wasted work.
MAX_CURSOR_CHARS = 1024
_BIGINT_MAX = 2**63 - 1


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not _INTEGER.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIMIT:
        raise invalid_parameter("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _path_id(request: Request, name: str) -> str:
    """A path id, or 400 when it breaks the id rule (service/ids.py): nothing stored can have
    it, and a NUL or an over-long value must not reach Postgres or a header."""
    value: str = request.path_params[name]
    if not is_valid_id(value):
        raise invalid_parameter(
            name, f"must be 1 to {MAX_ID_CHARS} printable characters (no NUL or control)"
        )
    return value


def _text(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is not None and (not value or len(value) > 256 or "\x00" in value):
        raise invalid_parameter(name, "must be 1 to 256 characters, without NUL")
    return value


# Cursors are opaque to clients: base64url JSON of the last row's sort key (keyset pagination,
# so rows written meanwhile never shift a page the way OFFSET would).
def encode_cursor(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(key)).decode().rstrip("=")


def _cursor(request: Request, shape: tuple[type, ...]) -> list[Any] | None:
    """The decoded cursor, each member checked against `shape`: `str` (an id), `int` (a seq)
    or `datetime` (an ISO time with an offset, as this API writes them)."""
    raw = request.query_params.get("cursor")
    if raw is None:
        return None
    key: Any = None
    if len(raw) <= MAX_CURSOR_CHARS:
        try:
            key = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        except (binascii.Error, orjson.JSONDecodeError, ValueError):
            key = None
    if not isinstance(key, list) or len(key) != len(shape):
        raise _invalid_cursor()
    out: list[Any] = []
    for value, kind in zip(key, shape, strict=True):
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value <= _BIGINT_MAX:
                raise _invalid_cursor()
        elif kind is str and isinstance(value, str):
            if not is_valid_id(value):
                raise _invalid_cursor()
        elif kind is datetime and isinstance(value, str):
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                raise _invalid_cursor() from None
            if value.tzinfo is None:
                raise _invalid_cursor()
        else:
            raise _invalid_cursor()
        out.append(value)
    return out


def _invalid_cursor() -> Problem:
    return Problem(400, "invalid_cursor", "Invalid cursor", "`cursor`: not one this API issued")


def _page(
    rows: Sequence[T], limit: int, render: Callable[[T], Any], key: Callable[[T], list[Any]]
) -> Response:
    """One page of a list queried with `limit + 1` rows: the extra row says a next page exists."""
    page = rows[:limit]
    next_cursor = encode_cursor(key(page[-1])) if len(rows) > limit else None
    return json_response({"data": [render(r) for r in page], "next_cursor": next_cursor})


def _delivery_fields(r: asyncpg.Record) -> dict[str, Any]:
    """What the events and deliveries listings say about a stored delivery."""
    return {
        "delivery_id": r["delivery_id"],
        "type": r["event_type"],
        "format": r["format"],
        "occurred_at": _iso_or_none(r["occurred_at"]),
        "received_at": iso(r["received_at"]),
        "applied_at": _iso_or_none(r["applied_at"]),
    }


def _by_seq(r: asyncpg.Record) -> list[Any]:
    return [r["seq"]]


def _buddy_response(request: Request, found: tuple[Buddy, int, datetime]) -> Response:
    buddy, version, updated_at = found
    body = orjson.dumps(public_view(buddy, version, updated_at))
    return rendered(request, etag(buddy.buddy_id, version), body)


async def get_buddy(request: Request) -> Response:
    state = _reader(request)
    buddy_id = _path_id(request, "buddy_id")
    cache = state.broadcaster.cache
    live = cache.enabled and state.broadcaster.connected.is_set()
    if live and (hit := cache.get(buddy_id)) is not None:
        return rendered(request, *hit)
    token = cache.token(buddy_id)
    found = await store.get_buddy(state.pool, buddy_id)
    if found is None:
        raise no_such_buddy(buddy_id)
    buddy, version, updated_at = found
    tag = etag(buddy_id, version)
    body = orjson.dumps(public_view(buddy, version, updated_at))
    if live:
        cache.put(buddy_id, token, tag, body, (buddy.user_id, buddy.audience))
    return rendered(request, tag, body)


async def list_buddies(request: Request) -> Response:
    state = _reader(request)
    limit = _limit(request)
    cursor = _cursor(request, (str,))
    rows = await store.list_buddies(
        state.pool,
        user_id=_text(request, "user_id"),
        audience=_text(request, "audience"),
        after=cursor[0] if cursor else None,
        limit=limit + 1,
    )
    return _page(rows, limit, lambda r: public_view(*r), lambda r: [r[0].buddy_id])


async def user_buddy(request: Request) -> Response:
    state = _reader(request)
    user_id = _path_id(request, "user_id")
    found = await store.user_buddy(state.pool, user_id, _text(request, "audience"))
    if found is None:
        raise buddy_not_found(f"no buddy mirrored for user {user_id!r}")
    return _buddy_response(request, found)


async def _require_buddy(state: AppState, buddy_id: str) -> None:
    if await store.get_version(state.pool, buddy_id) is None:
        raise no_such_buddy(buddy_id)


async def ledger(request: Request) -> Response:
    state = _reader(request)
    buddy_id = _path_id(request, "buddy_id")
    limit = _limit(request)
    cursor = _cursor(request, (datetime, int))
    currency = _text(request, "currency")
    await _require_buddy(state, buddy_id)
    before = (cursor[0], cursor[1]) if cursor else None
    rows = await store.list_ledger(
        state.pool, buddy_id, currency=currency, before=before, limit=limit + 1
    )
    fields = (
        "delivery_id",
        "currency",
        "amount",
        "balance_after",
        "reason",
        "reference_id",
        "ledger_id",
        "is_lucky",
    )
    return _page(
        rows,
        limit,
        lambda r: {**{f: r[f] for f in fields}, "occurred_at": iso(r["occurred_at"])},
        lambda r: [r["occurred_at"].isoformat(), r["seq"]],
    )


def _iso_or_none(value: datetime | None) -> str | None:
    return iso(value) if value is not None else None


async def events(request: Request) -> Response:
    state = _reader(request)
    buddy_id = _path_id(request, "buddy_id")
    limit = _limit(request)
    cursor = _cursor(request, (int,))
    await _require_buddy(state, buddy_id)
    rows = await store.list_events(
        state.pool, buddy_id, before=cursor[0] if cursor else None, limit=limit + 1
    )
    return _page(rows, limit, lambda r: {**_delivery_fields(r), "event_id": r["event_id"]}, _by_seq)


# --- admin ---------------------------------------------------------------------------------


async def list_deliveries(request: Request) -> Response:
    state = admin_state(request)
    limit = _limit(request)
    cursor = _cursor(request, (int,))
    status = request.query_params.get("status")
    if status is not None and status not in DELIVERY_STATUSES:
        raise invalid_parameter("status", f"must be one of {', '.join(DELIVERY_STATUSES)}")
    rows = await store.list_deliveries(
        state.pool,
        status=status,
        buddy_id=_text(request, "buddy_id"),
        before=cursor[0] if cursor else None,
        limit=limit + 1,
    )
    return _page(
        rows,
        limit,
        lambda r: {
            **_delivery_fields(r),
            "status": r["status"],
            "reason": r["reason"],
            "attempts": r["attempts"],
            "buddy_id": r["buddy_id"],
        },
        _by_seq,
    )


async def replay_delivery(request: Request) -> Response:
    state = admin_state(request)
    delivery_id = _path_id(request, "delivery_id")
    requeued = await store.requeue(state.pool, delivery_ids=[delivery_id])
    if not requeued:
        raise Problem(
            404, "delivery_not_found", "Delivery not found", f"no delivery {delivery_id!r} stored"
        )
    await state.waker.wake(requeued[0][1])
    return json_response({"status": "queued", "delivery_id": delivery_id}, 202)


async def refresh_buddy(request: Request) -> Response:
    state = admin_state(request)
    buddy_id = _path_id(request, "buddy_id")
    if not state.settings.hatched_api_enabled:
        raise Problem(
            409,
            "hatched_api_not_configured",
            "Hatched API not configured",
            "set HATCHED_API_URL and HATCHED_API_KEY to refresh buddies from Hatched",
        )
    if not await state.waker.request_refresh(buddy_id, priority=True):
        raise unavailable("could not queue the refresh; retry later")
    return json_response({"status": "queued", "buddy_id": buddy_id}, 202)


async def forget_user(request: Request) -> Response:
    """Erase the user's buddies and everything derived from them (service/erasure.py)."""
    state = admin_state(request)
    user_id = request.path_params["user_id"]
    if len(user_id) > 256 or "\x00" in user_id:
        raise invalid_parameter("user_id", "must be 1 to 256 characters, without NUL")
    try:
        erased = await erasure.forget_user(state.pool, user_id, shards=state.settings.shards)
    except erasure.ErasureBusy:
        raise unavailable("the user kept gaining buddies while being erased; retry") from None
    redis = await state.waker.redis()
    if redis is not None:
        await erasure.forget_refreshes(redis, state.settings.queue_name, erased)
    return json_response(
        {"user_id": user_id, "status": "forgotten", "buddies": erased.buddies}, 200
    )


async def stream_buddy(request: Request) -> Response:
    """SSE: the full buddy now (once it exists), then again each time it changes."""
    state = _reader(request)
    buddy_id = _path_id(request, "buddy_id")
    broadcaster = state.broadcaster
    if broadcaster.clients >= state.settings.stream_max_clients:
        raise too_many_streams()

    return EventSourceResponse(
        buddy_events(broadcaster, state.pool, buddy_id),
        ping=state.settings.stream_ping_s,
        headers={"Cache-Control": "no-cache"},
    )
