"""Client for Hatched's REST API: buddy refresh and backfill, and the first-user bootstrap calls.

Every request first takes a token from the shared `RedisTokenBucket` (when one is given), so all
processes together stay inside the plan. A 429 blocks every process for its Retry-After
(`penalize`) and is retried after it; transport errors, timeouts and 5xx are retried with
exponential backoff and jitter, at most `max_attempts` requests in all; any other 4xx is final.
Nothing waits without bound: each request has httpx timeouts, each retry wait is capped, and a
Retry-After longer than `max_retry_after_s` is raised instead of slept through.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from service.ratelimit import RedisTokenBucket

if TYPE_CHECKING:
    from service.config import Settings

log = structlog.get_logger(__name__)

DEFAULT_TIMEOUT = httpx.Timeout(10, connect=5)
USER_AGENT = "hatched-mirror/0.1"
# Used when a 429 names no Retry-After: long enough to let a per-second limiter recover.
DEFAULT_RETRY_AFTER_S = 1.0

# Called after every HTTP exchange: (route template, status or None on a transport error,
# seconds). Route templates ("GET /buddies/{buddy_id}") keep metric labels low-cardinality.
RequestObserver = Callable[[str, int | None, float], None]


# --- errors --------------------------------------------------------------------------------


class HatchedAPIError(Exception):
    """A request Hatched refused or that did not complete; fields from its error envelope."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        details: Any = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.details = details
        self.request_id = request_id

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields would be lost by Exception's default pickling (arq pickles a
        # job's exception into its result).
        return (type(self), (self.message,), self.__dict__)

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no response"
        suffix = f" (request id {self.request_id})" if self.request_id else ""
        return f"Hatched API {where}, {self.code}: {self.message}{suffix}"


class RateLimited(HatchedAPIError):
    """Hatched answered 429; `retry_after_s` is how long it asked us to wait."""

    def __init__(
        self, message: str, *, retry_after_s: float = DEFAULT_RETRY_AFTER_S, **kwargs: Any
    ) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s


class HatchedUnavailable(HatchedAPIError):
    """No usable answer: a timeout (code `timeout`) or a connection failure (`connection_error`)."""


class BudgetExhausted(HatchedAPIError):
    """The shared rate budget had no token within the allowed wait; nothing was sent."""


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def error_from_response(response: httpx.Response) -> HatchedAPIError:
    """Turn an error response into an exception, from `{"error": {...}}` or whatever came."""
    status = response.status_code
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    code: Any = None
    message: Any = None
    details: Any = None
    request_id: Any = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            code = err.get("code")
            message = err.get("message")
            details = err.get("details")
            request_id = err.get("requestId") or err.get("request_id")
        else:
            # Not the documented envelope; take what other common shapes offer.
            code = err if isinstance(err, str) else body.get("code")
            message = body.get("message") or body.get("detail") or body.get("title")
            details = body.get("details")
        request_id = request_id or body.get("requestId") or body.get("request_id")
    request_id = (
        request_id or response.headers.get("x-request-id") or response.headers.get("request-id")
    )
    if not isinstance(code, str) or not code:
        code = "rate_limited" if status == 429 else f"http_{status}"
    if not isinstance(message, str) or not message:
        text = response.text.strip() if body is None else ""
        message = (response.reason_phrase or "error") + (f": {text[:200]}" if text else "")
    kwargs: dict[str, Any] = {
        "status": status,
        "code": code,
        "details": details,
        "request_id": str(request_id) if request_id else None,
    }
    if status == 429:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if retry_after is None and isinstance(details, dict):
            for key in ("retry_after", "retryAfter", "retry_after_s"):
                hint = details.get(key)
                if isinstance(hint, int | float) and not isinstance(hint, bool):
                    retry_after = max(0.0, float(hint))
                    break
        return RateLimited(
            message,
            retry_after_s=DEFAULT_RETRY_AFTER_S if retry_after is None else retry_after,
            **kwargs,
        )
    return HatchedAPIError(message, **kwargs)


# --- the buddy as the REST API returns it ---------------------------------------------------

_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")


def _snake(key: str) -> str:
    return _CAMEL.sub(r"_\1", key).lower()


def _snake_keys(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {_snake(k) if isinstance(k, str) else k: v for k, v in obj.items()}


def _snake_deep(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {_snake(str(k)): _snake_deep(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_snake_deep(v) for v in value]
    return value


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _number(value: Any) -> int | float | None:
    """Skill values may be fractional; keep them exact rather than dropping them."""
    as_int = _int(value)
    if as_int is not None:
        return as_int
    if isinstance(value, float) and value == value:
        return value
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _time(value: Any) -> datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = value / 1000 if value > 1e11 else value  # epoch milliseconds or seconds
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _iso(value: Any) -> str | None:
    """Badge times as the projector writes them (UTC, `Z`); unreadable strings kept as sent."""
    parsed = _time(value)
    if parsed is None:
        return value if isinstance(value, str) and value else None
    return parsed.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _first(obj: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = obj.get(key)
        if value is not None:
            return value
    return None


def _entries(value: Any, key_fields: tuple[str, ...]) -> list[tuple[str, Any]]:
    """A keyed collection as (key, entry) pairs, from `{key: entry}` or `[{<key field>: ..}]`."""
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    out: list[tuple[str, Any]] = []
    if isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping):
                entry = _snake_keys(item)
                key = _text(_first(entry, *key_fields))
                if key is not None:
                    out.append((key, entry))
            elif (key := _text(item)) is not None:
                out.append((key, None))
    return out


def _tokens(value: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, entry in _entries(value, ("token_type", "token_key", "key", "type", "id")):
        amount = _int(entry)
        if amount is None and isinstance(entry, Mapping):
            amount = _int(_first(_snake_keys(entry), "balance", "amount", "value", "count"))
        if amount is not None:
            out[key] = amount
    return out


def _skills(value: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, entry in _entries(value, ("skill_key", "key", "id")):
        if isinstance(entry, Mapping):
            entry = _snake_keys(entry)
            out[key] = {"value": _number(entry.get("value")), "level": _int(entry.get("level"))}
        else:
            out[key] = {"value": _number(entry), "level": None}
    return out


def _badges(value: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, entry in _entries(value, ("badge_id", "id", "key")):
        status, awarded_at = "awarded", None
        if isinstance(entry, Mapping):
            entry = _snake_keys(entry)
            status = _text(entry.get("status")) or "awarded"
            awarded_at = _iso(entry.get("awarded_at"))
        elif isinstance(entry, str):
            awarded_at = _iso(entry)
        elif entry is False:
            continue
        out[key] = {"status": status, "awarded_at": awarded_at if status == "awarded" else None}
    return out


def _streaks(value: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, entry in _entries(value, ("streak_key", "key", "id")):
        if isinstance(entry, Mapping):
            entry = _snake_keys(entry)
            milestone = _first(entry, "last_milestone", "milestone")
            out[key] = {"count": _int(entry.get("count")), "last_milestone": _int(milestone)}
        else:
            out[key] = {"count": _int(entry), "last_milestone": None}
    return out


def _item_ids(value: Any) -> list[str] | None:
    if not isinstance(value, list):
        return None
    ids: set[str] = set()
    for item in value:
        if isinstance(item, Mapping):
            item_id = _text(_first(_snake_keys(item), "item_id", "id"))
        else:
            item_id = _text(item)
        if item_id is not None:
            ids.add(item_id)
    return sorted(ids)


def _unwrap(obj: Any) -> Any:
    """The object itself when it came under `data` (or `buddy`) rather than bare."""
    if isinstance(obj, Mapping) and not any(k in obj for k in ("buddy_id", "buddyId", "id")):
        for key in ("data", "buddy"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return inner
    return obj


@dataclass(frozen=True)
class RemoteBuddy:
    """A buddy as Hatched's REST API reports it, mapped onto the mirror's vocabulary.

    Maps use the projector's shapes (skills `{value, level}`, badges `{status, awarded_at}`,
    streaks `{count, last_milestone}`), so a refresh can be compared with mirrored state directly.
    `owned_item_ids` is None when the response says nothing about ownership (only equipped items
    are in the documented shape); `raw` is the buddy object exactly as received.
    """

    buddy_id: str
    user_id: str | None = None
    audience: str | None = None
    egg_id: str | None = None
    name: str | None = None
    status: str | None = None
    config_version_id: str | None = None
    evolution_stage: int | None = None
    image_url: str | None = None
    thumb_url: str | None = None
    base_image_url: str | None = None
    coins: int | None = None
    tokens: dict[str, int] = field(default_factory=dict)
    skills: dict[str, dict[str, Any]] = field(default_factory=dict)
    badges: dict[str, dict[str, Any]] = field(default_factory=dict)
    streaks: dict[str, dict[str, Any]] = field(default_factory=dict)
    equipped_item_ids: list[str] = field(default_factory=list)
    owned_item_ids: list[str] | None = None
    appearance: dict[str, Any] | None = None
    progression: dict[str, Any] | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any) -> RemoteBuddy:
        """Map a buddy object, bare or under `data`, snake_case or camelCase.

        Raises ValueError when it is not an object or carries no buddy id.
        """
        obj = _unwrap(obj)
        if not isinstance(obj, Mapping):
            raise ValueError(f"a buddy must be a JSON object, not {type(obj).__name__}")
        src = _snake_keys(obj)
        buddy_id = _text(_first(src, "buddy_id", "id"))
        if buddy_id is None:
            raise ValueError("buddy object without a buddy id")

        image = src.get("image")
        image = _snake_keys(image) if isinstance(image, Mapping) else {}
        items = src.get("items")
        items = _snake_keys(items) if isinstance(items, Mapping) else {}
        coins = src.get("coins")
        if isinstance(coins, Mapping):
            coins = _snake_keys(coins).get("balance")
        stage = _first(src, "evolution_stage", "stage")
        if stage is None:
            stage = image.get("stage")
        equipped = _first(src, "equipped_item_ids", "equipped_items")
        if equipped is None:
            equipped = items.get("equipped")
        owned = _first(src, "owned_item_ids", "owned_items")
        if owned is None:
            owned = items.get("owned")
        appearance = src.get("appearance")
        progression = src.get("progression")
        return cls(
            buddy_id=buddy_id,
            user_id=_text(src.get("user_id")),
            audience=_text(src.get("audience")),
            egg_id=_text(src.get("egg_id")),
            name=_text(src.get("name")),
            status=_text(src.get("status")),
            config_version_id=_text(src.get("config_version_id")),
            evolution_stage=_int(stage),
            image_url=_text(_first(src, "image_url") or image.get("url")),
            thumb_url=_text(
                _first(src, "thumb_url", "thumbnail_url") or _first(image, "thumb_url")
            ),
            base_image_url=_text(src.get("base_image_url")),
            coins=_int(coins),
            tokens=_tokens(src.get("tokens")),
            skills=_skills(src.get("skills")),
            badges=_badges(src.get("badges")),
            streaks=_streaks(src.get("streaks")),
            equipped_item_ids=_item_ids(equipped) or [],
            owned_item_ids=_item_ids(owned),
            # Appearance has a fixed vocabulary; progression is opaque, so it stays as sent.
            appearance=_snake_deep(appearance) if isinstance(appearance, Mapping) else None,
            progression=dict(progression) if isinstance(progression, Mapping) else None,
            created_at=_time(_first(src, "created_at", "hatched_at")),
            updated_at=_time(src.get("updated_at")),
            raw=dict(obj),
        )


def next_cursor(body: Any, sent: str | None = None) -> str | None:
    """The cursor of the next page, wherever this response keeps it; None on the last page."""
    if not isinstance(body, Mapping):
        return None
    meta = body.get("meta")
    meta = _snake_keys(meta) if isinstance(meta, Mapping) else {}
    if meta.get("has_more") is False:
        return None
    found = _first(meta, "next_cursor", "cursor", "next")
    if found is None:
        found = _first(_snake_keys(body), "next_cursor")
    cursor = _text(found)
    # An API that echoes the cursor it was sent would otherwise loop a backfill forever.
    return None if cursor is None or cursor == sent else cursor


def _object(body: Any) -> dict[str, Any]:
    """A bootstrap answer: unwrapped from `data`, top-level keys in snake_case."""
    if isinstance(body, Mapping):
        inner = body.get("data")
        if isinstance(inner, Mapping) and len(body.keys() - {"data", "meta"}) == 0:
            body = inner
        return _snake_keys(body)
    return {}


# --- the client ----------------------------------------------------------------------------


class HatchedAPI:
    """Async client for Hatched's REST API; use as `async with` or call `aclose()`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        bucket: RedisTokenBucket | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_attempts: int = 4,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        max_retry_after_s: float = 60.0,
        budget_wait_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        on_request: RequestObserver | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={
                "Authorization": f"Bearer {api_key}",
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            },
            timeout=timeout,
            transport=transport,
        )
        self.bucket = bucket
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._max_retry_after_s = max_retry_after_s
        self._budget_wait_s = budget_wait_s
        self._on_request = on_request

    @classmethod
    def from_settings(
        cls, settings: Settings, *, bucket: RedisTokenBucket | None = None, **options: Any
    ) -> HatchedAPI:
        if not (settings.hatched_api_url and settings.hatched_api_key):
            raise ValueError("HATCHED_API_URL and HATCHED_API_KEY are needed for the REST API")
        return cls(settings.hatched_api_url, settings.hatched_api_key, bucket=bucket, **options)

    async def __aenter__(self) -> HatchedAPI:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- buddies ---------------------------------------------------------------------------

    async def get_buddy(self, buddy_id: str, *, priority: bool = False) -> RemoteBuddy | None:
        """`GET /buddies/{id}`; None when Hatched does not know the buddy (404)."""
        try:
            body = await self._call(
                "GET", f"/buddies/{_seg(buddy_id)}", "GET /buddies/{buddy_id}", priority=priority
            )
        except HatchedAPIError as exc:
            if exc.status == 404:
                return None
            raise
        try:
            return RemoteBuddy.from_json(body)
        except ValueError as exc:
            raise HatchedAPIError(
                f"unreadable buddy in the response: {exc}", status=200, code="invalid_response"
            ) from None

    async def list_buddies(
        self,
        *,
        user_id: str | None = None,
        status: str | None = "active",
        cursor: str | None = None,
        limit: int = 100,
        priority: bool = False,
    ) -> tuple[list[RemoteBuddy], str | None]:
        """One page of `GET /buddies`: (buddies, cursor of the next page or None)."""
        params = {"user_id": user_id, "status": status, "cursor": cursor, "limit": limit}
        body = await self._call(
            "GET",
            "/buddies",
            "GET /buddies",
            params={k: v for k, v in params.items() if v is not None},
            priority=priority,
        )
        items = body.get("data") if isinstance(body, Mapping) else body
        if not isinstance(items, list):
            raise HatchedAPIError(
                "buddy list without a data array", status=200, code="invalid_response"
            )
        buddies: list[RemoteBuddy] = []
        for item in items:
            try:
                buddies.append(RemoteBuddy.from_json(item))
            except ValueError as exc:
                log.warning("hatched_api.skipped_buddy", reason=str(exc))
        return buddies, next_cursor(body, cursor)

    async def iter_pages(
        self,
        *,
        user_id: str | None = None,
        status: str | None = "active",
        cursor: str | None = None,
        limit: int = 100,
        priority: bool = False,
    ) -> AsyncIterator[tuple[list[RemoteBuddy], str | None]]:
        """Every page from `cursor` on, each with the cursor that resumes after it."""
        while True:
            page, cursor = await self.list_buddies(
                user_id=user_id, status=status, cursor=cursor, limit=limit, priority=priority
            )
            yield page, cursor
            if cursor is None:
                return

    # --- first-user bootstrap --------------------------------------------------------------

    async def ensure_egg(
        self, user_id: str, audience: str | None = None, *, priority: bool = False
    ) -> dict[str, Any]:
        """`POST /eggs?ensure=true`: the user's egg for the audience, created when there is none.

        Returns `{egg_id, status, buddy_id, ...}`. 409 `no_published_config` (details.publish_url)
        and 409 `active_egg_limit` (details.active) arrive as HatchedAPIError.
        """
        payload: dict[str, Any] = {"user_id": user_id}
        if audience is not None:
            payload["audience"] = audience
        # `ensure` makes a repeat return the same egg, so a retry after a lost answer is safe.
        body = await self._call(
            "POST",
            "/eggs",
            "POST /eggs",
            params={"ensure": "true"},
            json=payload,
            priority=priority,
        )
        return _object(body)

    async def mark_egg_ready(self, egg_id: str, *, priority: bool = False) -> dict[str, Any]:
        """`PATCH /eggs/{id}/status` with `{"status": "ready"}`."""
        body = await self._call(
            "PATCH",
            f"/eggs/{_seg(egg_id)}/status",
            "PATCH /eggs/{egg_id}/status",
            json={"status": "ready"},
            priority=priority,
        )
        return _object(body)

    async def hatch_egg(self, egg_id: str, *, priority: bool = False) -> dict[str, Any]:
        """`POST /eggs/{id}/hatch`: `{operation_id, status}`; poll it with `get_operation`."""
        # Not idempotent as far as the docs say: only a 429 (refused, so nothing happened) is
        # retried. After a timeout the caller re-reads the egg with `ensure_egg` instead.
        body = await self._call(
            "POST",
            f"/eggs/{_seg(egg_id)}/hatch",
            "POST /eggs/{egg_id}/hatch",
            priority=priority,
            idempotent=False,
        )
        return _object(body)

    async def get_operation(self, operation_id: str, *, priority: bool = False) -> dict[str, Any]:
        """`GET /operations/{id}`: `{status, result: {buddy_id}}` once completed."""
        body = await self._call(
            "GET",
            f"/operations/{_seg(operation_id)}",
            "GET /operations/{operation_id}",
            priority=priority,
        )
        return _object(body)

    async def create_widget_session(
        self,
        buddy_id: str,
        user_id: str,
        scopes: list[str],
        ttl_seconds: int,
        *,
        priority: bool = False,
    ) -> dict[str, Any]:
        """`POST /widget-sessions`: `{token, session_id, expires_at, scopes}`."""
        payload = {
            "buddy_id": buddy_id,
            "user_id": user_id,
            "scopes": list(scopes),
            "ttl_seconds": ttl_seconds,
        }
        # A duplicate session after a retried timeout only expires unused: retrying is fine.
        body = await self._call(
            "POST", "/widget-sessions", "POST /widget-sessions", json=payload, priority=priority
        )
        return _object(body)

    async def create_embed_token(
        self, buddy_id: str, user_id: str, *, priority: bool = False
    ) -> dict[str, Any]:
        """`POST /embed-tokens`: `{token, expires_at}`."""
        body = await self._call(
            "POST",
            "/embed-tokens",
            "POST /embed-tokens",
            json={"buddy_id": buddy_id, "user_id": user_id},
            priority=priority,
        )
        return _object(body)

    # --- transport -------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        route: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        priority: bool = False,
        idempotent: bool = True,
    ) -> Any:
        def retryable(exc: BaseException) -> bool:
            if isinstance(exc, RateLimited):
                return exc.retry_after_s <= self._max_retry_after_s
            if not idempotent or isinstance(exc, BudgetExhausted):
                return False
            if isinstance(exc, HatchedUnavailable):
                return True
            return isinstance(exc, HatchedAPIError) and (exc.status or 0) >= 500

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_attempts),
            wait=self._wait,
            retry=retry_if_exception(retryable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._send(method, path, route, params, json, priority)
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, RateLimited):
            # Jitter so that every process released by the same penalty does not fire at once.
            return exc.retry_after_s + random.uniform(0, 0.25)
        # Exponential with full jitter on top (tenacity's helper for this changed signature
        # across the versions pyproject allows).
        exponential = self._backoff_s * 2.0 ** (state.attempt_number - 1)
        return min(self._backoff_max_s, exponential + random.uniform(0, self._backoff_s))

    async def _send(
        self,
        method: str,
        path: str,
        route: str,
        params: Mapping[str, Any] | None,
        json: Any,
        priority: bool,
    ) -> Any:
        if self.bucket is not None and not await self.bucket.acquire(
            priority=priority, max_wait_s=self._budget_wait_s
        ):
            raise BudgetExhausted(
                f"no rate budget for {route} within {self._budget_wait_s:g}s",
                code="rate_budget_exhausted",
            )
        started = time.perf_counter()
        try:
            response = await self._client.request(method, path, params=params, json=json)
        except httpx.TimeoutException as exc:
            self._observe(route, None, started)
            raise HatchedUnavailable(
                f"{route} timed out ({type(exc).__name__})", code="timeout"
            ) from exc
        except httpx.TransportError as exc:
            self._observe(route, None, started)
            raise HatchedUnavailable(
                f"{route} failed: {type(exc).__name__}: {exc}", code="connection_error"
            ) from exc
        except httpx.RequestError as exc:
            self._observe(route, None, started)
            raise HatchedAPIError(f"{route} failed: {exc}", code="request_error") from exc
        self._observe(route, response.status_code, started)

        if response.status_code >= 400:
            error = error_from_response(response)
            if isinstance(error, RateLimited):
                log.warning(
                    "hatched_api.rate_limited", route=route, retry_after_s=error.retry_after_s
                )
                if self.bucket is not None:
                    await self.bucket.penalize(error.retry_after_s)
            raise error
        if response.status_code == 204 or not response.content:
            return {}
        try:
            return response.json()
        except ValueError:
            raise HatchedAPIError(
                f"{route} answered {response.status_code} with a body that is not JSON",
                status=response.status_code,
                code="invalid_response",
                request_id=response.headers.get("x-request-id"),
            ) from None

    def _observe(self, route: str, status: int | None, started: float) -> None:
        if self._on_request is not None:
            self._on_request(route, status, time.perf_counter() - started)


def _seg(value: str) -> str:
    """One path segment: an id containing `/` or `?` must not change the route."""
    return quote(value, safe="")
