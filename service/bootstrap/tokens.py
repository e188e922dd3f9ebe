"""Widget sessions and embed tokens, minted by Hatched for the user's buddy."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any

import structlog
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from service import store
from service.bootstrap.endpoints import audience_param, json_body, states, user_id_param
from service.bootstrap.problems import hatched_problem
from service.coerce import text
from service.hatched.errors import HatchedAPIError
from service.problems import buddy_not_found, invalid_parameter, json_response, unavailable
from service.state import AppState

log = structlog.get_logger(__name__)


WIDGET_TTL_DEFAULT = 3600


# --- widget session and embed token --------------------------------------------------------


async def _user_buddy_id(state: AppState, user_id: str, audience: str | None) -> str:
    found = await store.user_buddy(state.pool, user_id, audience)
    if found is None:
        raise buddy_not_found(
            f"no buddy mirrored for user {user_id!r}; bootstrap it with POST "
            f"/v1/users/{{user_id}}/buddy first",
        )
    return found[0].buddy_id


def _scopes(value: Any) -> list[str]:
    if value is None:
        return []
    if (
        not isinstance(value, list)
        or len(value) > 32
        or not all(isinstance(s, str) and 1 <= len(s) <= 64 for s in value)
    ):
        raise invalid_parameter(
            "scopes", "must be a list of at most 32 strings of 1 to 64 characters"
        )
    return list(value)


def _ttl(value: Any) -> int:
    if value is None:
        return WIDGET_TTL_DEFAULT
    if isinstance(value, bool) or not isinstance(value, int) or not 60 <= value <= 86_400:
        raise invalid_parameter("ttl_seconds", "must be an integer from 60 to 86400")
    return value


async def _mint(call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await call
    except HatchedAPIError as exc:
        if exc.status == 404:
            raise buddy_not_found(
                "Hatched does not know the user's mirrored buddy",
            ) from None
        raise hatched_problem(exc) from None
    except RedisError:
        raise unavailable("the shared Hatched rate budget (Redis) is unreachable") from None


def _token(minted: Mapping[str, Any]) -> str:
    token = text(minted.get("token"))
    if token is None:
        raise hatched_problem(
            HatchedAPIError("Hatched answered without a token", status=200, code="invalid_response")
        )
    return token


async def create_widget_session(request: Request) -> Response:
    """A Hatched widget session for the user's buddy (POST /widget-sessions)."""
    state, _, hatched = states(request)
    user_id = user_id_param(request)
    body = await json_body(request)
    scopes, ttl = _scopes(body.get("scopes")), _ttl(body.get("ttl_seconds"))
    buddy_id = await _user_buddy_id(state, user_id, audience_param(body.get("audience")))
    minted = await _mint(hatched.create_widget_session(buddy_id, user_id, scopes, ttl))
    granted = minted.get("scopes")
    answer = {
        "token": _token(minted),
        "session_id": text(minted.get("session_id")),
        "expires_at": text(minted.get("expires_at")),
        "scopes": granted if isinstance(granted, list) else scopes,
    }
    return json_response(answer, headers={"Cache-Control": "no-store"})


async def create_embed_token(request: Request) -> Response:
    """A read-only embed token for the user's buddy (POST /embed-tokens)."""
    state, _, hatched = states(request)
    user_id = user_id_param(request)
    body = await json_body(request)
    buddy_id = await _user_buddy_id(state, user_id, audience_param(body.get("audience")))
    minted = await _mint(hatched.create_embed_token(buddy_id, user_id))
    answer = {
        "token": _token(minted),
        "expires_at": text(minted.get("expires_at")),
        "mode": "read-only",
    }
    return json_response(answer, headers={"Cache-Control": "no-store"})
