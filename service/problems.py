"""RFC 9457 problem responses with a stable `code` for every error the service returns."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response

PROBLEM_TYPE = "https://hatched-mirror.dev/problems/"


class Problem(Exception):
    """Raised anywhere in a request; the app turns it into application/problem+json."""

    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail or title
        self.headers = dict(headers or {})

    def response(self) -> Response:
        body = {
            "type": PROBLEM_TYPE + self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        return Response(
            orjson.dumps(body),
            status_code=self.status,
            headers=self.headers,
            media_type="application/problem+json",
        )


def unavailable(detail: str) -> Problem:
    # Hatched retries on any non-2xx; Retry-After tells other clients when to come back.
    return Problem(503, "unavailable", "Service unavailable", detail, {"Retry-After": "5"})
