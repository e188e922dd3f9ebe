"""Conditional GETs of a buddy: its ETag is derived from its id and `version`."""

from __future__ import annotations

import hashlib
import re

from starlette.requests import Request
from starlette.responses import Response

# Ids that can stand in a header as they are. Any other (non-latin-1, a quote, a comma that
# would split If-None-Match) is represented by a hash of it: the ETag stays header-safe.
_HEADER_SAFE = re.compile(r"[A-Za-z0-9._~:@+\-]+")


def etag(buddy_id: str, version: int) -> str:
    if _HEADER_SAFE.fullmatch(buddy_id) is None:
        buddy_id = "h-" + hashlib.sha256(buddy_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
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
