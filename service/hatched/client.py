"""Client for Hatched's REST API: buddy refresh and backfill, and the first-user bootstrap calls.

Every request first takes a token from the shared `RedisTokenBucket` (when one is given), so all
processes together stay inside the plan. A 429 blocks every process for its Retry-After
(`penalize`) and is retried after it; transport errors, timeouts and 5xx are retried with
exponential backoff and jitter, at most `max_attempts` requests in all; any other 4xx is final.
Nothing waits without bound: each request has httpx timeouts, each retry wait is capped, and a
Retry-After longer than `max_retry_after_s` is raised instead of slept through."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from service.hatched.errors import (
    BudgetExhausted,
    HatchedAPIError,
    HatchedUnavailable,
    RateLimited,
    error_from_response,
)
from service.hatched.ratelimit import RedisTokenBucket
from service.hatched.remote import RemoteBuddy, _object, next_cursor

if TYPE_CHECKING:
    from service.config import Settings

log = structlog.get_logger(__name__)


DEFAULT_TIMEOUT = httpx.Timeout(10, connect=5)
USER_AGENT = "hatched-mirror/0.1"


# Called after every HTTP exchange: (route template, status or None on a transport error,
# seconds). Route templates ("GET /buddies/{buddy_id}") keep metric labels low-cardinality.
RequestObserver = Callable[[str, int | None, float], None]


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
            body = await self._call("GET /buddies/{buddy_id}", buddy_id=buddy_id, priority=priority)
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
            "POST /eggs",
            params={"ensure": "true"},
            json=payload,
            priority=priority,
        )
        return _object(body)

    async def mark_egg_ready(self, egg_id: str, *, priority: bool = False) -> dict[str, Any]:
        """`PATCH /eggs/{id}/status` with `{"status": "ready"}`."""
        body = await self._call(
            "PATCH /eggs/{egg_id}/status",
            egg_id=egg_id,
            json={"status": "ready"},
            priority=priority,
        )
        return _object(body)

    async def hatch_egg(self, egg_id: str, *, priority: bool = False) -> dict[str, Any]:
        """`POST /eggs/{id}/hatch`: `{operation_id, status}`; poll it with `get_operation`."""
        # Not idempotent as far as the docs say: only a 429 (refused, so nothing happened) is
        # retried. After a timeout the caller re-reads the egg with `ensure_egg` instead.
        body = await self._call(
            "POST /eggs/{egg_id}/hatch",
            egg_id=egg_id,
            priority=priority,
            idempotent=False,
        )
        return _object(body)

    async def get_operation(self, operation_id: str, *, priority: bool = False) -> dict[str, Any]:
        """`GET /operations/{id}`: `{status, result: {buddy_id}}` once completed."""
        body = await self._call(
            "GET /operations/{operation_id}",
            operation_id=operation_id,
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
        body = await self._call("POST /widget-sessions", json=payload, priority=priority)
        return _object(body)

    async def create_embed_token(
        self, buddy_id: str, user_id: str, *, priority: bool = False
    ) -> dict[str, Any]:
        """`POST /embed-tokens`: `{token, expires_at}`."""
        body = await self._call(
            "POST /embed-tokens",
            json={"buddy_id": buddy_id, "user_id": user_id},
            priority=priority,
        )
        return _object(body)

    # --- transport -------------------------------------------------------------------------

    async def _call(
        self,
        route: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        priority: bool = False,
        idempotent: bool = True,
        **segments: str,
    ) -> Any:
        """One REST call by its route template ("GET /buddies/{buddy_id}"), the template's
        `{names}` filled from `segments`, each one encoded path segment."""
        method, template = route.split(" ", 1)
        path = template.format_map({name: _seg(value) for name, value in segments.items()})

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
    """One path segment: an id containing `/` or `?` must not change the route. `.` and `..`
    are refused before any call: percent-encoding leaves them as they are, and a URL resolver
    would turn `/buddies/..` into `/` (another route, with our API key)."""
    if value in ("", ".", ".."):
        raise HatchedAPIError(f"refusing path segment {value!r}", code="invalid_id")
    return quote(value, safe="")
