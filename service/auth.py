"""Bearer tokens for the read and admin APIs, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.requests import Request

from service.problems import Problem


def bearer(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, else None."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authorized(header: str, tokens: Sequence[str]) -> bool:
    token = bearer(header)
    # Compare against every token so the time taken does not tell which one was close.
    matched = False
    for candidate in tokens:
        if token is not None and hmac.compare_digest(token.encode(), candidate.encode()):
            matched = True
    return matched


def require_token(request: Request, tokens: Sequence[str]) -> None:
    if not authorized(request.headers.get("authorization", ""), tokens):
        raise Problem(
            401,
            "unauthorized",
            "Unauthorized",
            "send Authorization: Bearer <token> with a valid token",
            {"WWW-Authenticate": "Bearer"},
        )
