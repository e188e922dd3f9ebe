"""Read API for the customer's frontends."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from service import store
from service.auth import require_token
from service.problems import Problem
from service.projector import public_view
from service.state import AppState


def etag(buddy_id: str, version: int) -> str:
    return f'"{buddy_id}.{version}"'


def _matches(if_none_match: str | None, tag: str) -> bool:
    if not if_none_match:
        return False
    candidates = [c.strip().removeprefix("W/") for c in if_none_match.split(",")]
    return "*" in candidates or tag in candidates


async def get_buddy(request: Request) -> Response:
    state: AppState = request.app.state.mirror
    require_token(request, state.settings.api_tokens)
    buddy_id = request.path_params["buddy_id"]
    found = await store.get_buddy(state.pool, buddy_id)
    if found is None:
        raise Problem(404, "buddy_not_found", "Buddy not found", f"no buddy {buddy_id!r} mirrored")
    buddy, version, updated_at = found
    tag = etag(buddy_id, version)
    headers = {"ETag": tag, "Cache-Control": "no-cache"}
    if _matches(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers=headers)
    body = orjson.dumps(public_view(buddy, version, updated_at))
    return Response(body, media_type="application/json", headers=headers)
