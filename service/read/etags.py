"""Conditional GETs of a buddy: its ETag is derived from its id and `version`."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response


def etag(buddy_id: str, version: int) -> str:
    return f'"{buddy_id}.{version}"'


def matches(if_none_match: str | None, tag: str) -> bool:
    if not if_none_match:
        return False
    candidates = [c.strip().removeprefix("W/") for c in if_none_match.split(",")]
    return "*" in candidates or tag in candidates


def rendered(request: Request, tag: str, body: bytes) -> Response:
    """`body` (the buddy's JSON) under `tag`, or a 304 when the client holds it already."""
    headers = {"ETag": tag, "Cache-Control": "no-cache"}
    if matches(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers=headers)
    return Response(body, headers=headers, media_type="application/json")
