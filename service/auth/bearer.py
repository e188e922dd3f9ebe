"""Bearer tokens for the read and admin APIs, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.requests import Request
from starlette.types import Scope

from service.auth.user_tokens import Principal
from service.problems import Problem

# Where service/auth/scope.py leaves the verified user token of a request (only it sets this key).
PRINCIPAL = "hatched_mirror.principal"


def bearer(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, else None."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def known(token: str | None, tokens: Sequence[str]) -> bool:
    # Compare against every token so the time taken does not tell which one was close.
    matched = False
    for candidate in tokens:
        if token is not None and hmac.compare_digest(token.encode(), candidate.encode()):
            matched = True
    return matched


def authorized(header: str, tokens: Sequence[str]) -> bool:
    return known(bearer(header), tokens)


def principal_of(scope: Scope) -> Principal | None:
    """The user token this request was admitted with, if it came with one."""
    principal: Principal | None = scope.get(PRINCIPAL)
    return principal


def require_token(request: Request, tokens: Sequence[str]) -> None:
    if not authorized(request.headers.get("authorization", ""), tokens):
        raise Problem(
            401,
            "unauthorized",
            "Unauthorized",
            "send Authorization: Bearer <token> with a valid token",
            {"WWW-Authenticate": "Bearer"},
        )


def require_reader(request: Request, tokens: Sequence[str]) -> None:
    """An API token, or a user token service/auth/scope.py admitted to this very route."""
    if principal_of(request.scope) is None:
        require_token(request, tokens)
