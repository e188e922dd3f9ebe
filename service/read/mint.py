"""POST /v1/user-tokens: user tokens minted by the mirror, for backends that would rather not
hold the signing key (any backend that does can mint them itself; see the README)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from service.apply.projector import iso
from service.auth import user_tokens
from service.auth.bearer import require_token
from service.ingest.receiver import read_json_object
from service.problems import Problem, invalid_parameter, json_response
from service.state import AppState

MAX_BODY = 4096


def _text(body: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 256 or "\x00" in value:
        kind = "a string" if required else "a string or null"
        raise invalid_parameter(name, f"must be {kind} of 1 to 256 characters without NUL")
    return value


async def create_user_token(request: Request) -> Response:
    state: AppState = request.app.state.mirror
    settings = state.settings
    require_token(request, settings.api_tokens)
    if not settings.user_token_secrets:
        raise Problem(
            409,
            "user_tokens_not_configured",
            "User tokens not configured",
            "set MIRROR_USER_TOKEN_SECRETS to mint user tokens",
        )
    body = await read_json_object(request, MAX_BODY, settings.body_timeout_s)
    user_id = _text(body, "user_id", required=True)
    assert user_id is not None
    audience = _text(body, "audience", required=False)
    limit = settings.user_token_max_ttl_s
    ttl = body.get("ttl_seconds")
    if ttl is None:
        ttl = min(user_tokens.DEFAULT_TTL_S, limit)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= limit:
        raise invalid_parameter("ttl_seconds", f"must be an integer from 1 to {limit}")
    now = int(time.time())
    token = user_tokens.mint(settings.user_token_secrets[0], user_id, audience, ttl, now)
    answer = {
        "token": token,
        "user_id": user_id,
        "audience": audience,
        "expires_at": iso(datetime.fromtimestamp(now + ttl, UTC)),
    }
    return json_response(answer, 201, {"Cache-Control": "no-store"})
