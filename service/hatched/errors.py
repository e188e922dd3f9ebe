"""Hatched's error envelope as exceptions, and Retry-After parsing."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    pass


# Used when a 429 names no Retry-After: long enough to let a per-second limiter recover.
DEFAULT_RETRY_AFTER_S = 1.0


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
