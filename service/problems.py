"""RFC 9457 problem responses with a stable `code`, and the named problems the routes share.

Every error the service answers is a `Problem` raised anywhere in a request; the app's handler
turns it into `application/problem+json`. A problem may carry extension members (`extra`), as
Hatched's refusals during a bootstrap do (`publish_url`, `active`, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
import orjson
from starlette.responses import Response

PROBLEM_TYPE = "https://hatched-mirror.dev/problems/"
# How long a client is told to wait after a 503: long enough for a pool or Redis to recover.
RETRY_AFTER_S = 5
# What "the database is unreachable" looks like to asyncpg callers: a refused or dropped
# connection, a pool timeout, or a server error answered while it shuts down.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


def json_response(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(payload), status, dict(headers or {}), "application/json")


def retry_after(seconds: float = RETRY_AFTER_S) -> dict[str, str]:
    return {"Retry-After": str(max(1, round(seconds)))}


class Problem(Exception):
    """Raised anywhere in a request; the app turns it into application/problem+json."""

    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail or title
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        return {
            **self.extra,
            "type": PROBLEM_TYPE + self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }

    def response(self) -> Response:
        return Response(
            orjson.dumps(self.body()),
            status_code=self.status,
            headers=self.headers,
            media_type="application/problem+json",
        )


def unavailable(detail: str) -> Problem:
    # Hatched retries on any non-2xx; Retry-After tells other clients when to come back.
    return Problem(503, "unavailable", "Service unavailable", detail, retry_after())


def invalid_parameter(name: str, detail: str) -> Problem:
    return Problem(400, "invalid_parameter", f"Invalid parameter `{name}`", f"`{name}`: {detail}")


def buddy_not_found(detail: str) -> Problem:
    return Problem(404, "buddy_not_found", "Buddy not found", detail)


def no_such_buddy(buddy_id: str) -> Problem:
    """The one answer for a buddy not mirrored, or not the user token's: the same bytes."""
    return buddy_not_found(f"no buddy {buddy_id!r} mirrored")


def unauthorized(detail: str = "send Authorization: Bearer <token> with a valid token") -> Problem:
    return Problem(401, "unauthorized", "Unauthorized", detail, {"WWW-Authenticate": "Bearer"})


def too_many_streams() -> Problem:
    """A process at its MIRROR_STREAM_MAX_CLIENTS, for buddy and user streams alike."""
    return Problem(
        503,
        "too_many_streams",
        "Too many live streams",
        "this process serves its maximum of live streams; retry later",
        retry_after(),
    )


def hatched_api_not_configured(purpose: str) -> Problem:
    return Problem(
        409,
        "hatched_api_not_configured",
        "Hatched API not configured",
        f"set HATCHED_API_URL and HATCHED_API_KEY to {purpose}",
    )


def forbidden(detail: str) -> Problem:
    """A valid credential that may not do this (a user token outside its user, say)."""
    return Problem(403, "forbidden", "Forbidden", detail)
