"""What a user token may do: decided here, once, for every route of the table.

A user token (service/auth/user_tokens.py) speaks for one Hatched user and maybe one audience. This
middleware sits in front of the cached reads and the router: it finds the route a request is for
in the same `Endpoint` table the router and /openapi.json are built from, and applies that
route's `user` access (service/read/openapi.py):

- "buddy": the `{buddy_id}` must be a buddy of the token's user (and audience); any other is
  answered exactly as a buddy that does not exist (`404 buddy_not_found`, the same body, and
  the same one query, so the timing does not tell either).
- "buddies": the listing is narrowed to the token's user (and audience); asking for another
  `user_id` (or audience) is `403 forbidden`.
- "user": the `{user_id}` in the path must be the token's own, else `403 forbidden`; an
  audience-bound token's audience is imposed on the query (and, in service/bootstrap, the body).
- "forbidden" (every other route, and any route added without saying otherwise): `403`.

`access_token=` in the query is taken on `…/stream` routes only (EventSource cannot send
headers), and only a user token: an API or admin token there is refused, as is the parameter
on any other route. API and admin tokens in the header pass through untouched: the handlers
check them exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, quote, unquote_plus

from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service import store
from service.auth.bearer import PRINCIPAL, bearer, known, principal_of
from service.auth.user_tokens import Principal, UserTokens
from service.problems import (
    DATABASE_ERRORS,
    Problem,
    forbidden,
    no_such_buddy,
    unauthorized,
    unavailable,
)
from service.read.openapi import Endpoint
from service.state import AppState

QUERY_TOKEN = "access_token"


class ScopeGuard:
    """ASGI middleware: admits a user token to the route it asks for, or answers the problem."""

    def __init__(self, app: ASGIApp, endpoints: Sequence[Endpoint], tokens: UserTokens) -> None:
        self.app = app
        self._routes: list[tuple[Endpoint, Route]] = [(ep, ep.route()) for ep in endpoints]
        self._tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                principal = await self._admit(scope)
            except Problem as problem:
                await problem.response()(scope, receive, send)
                return
            except DATABASE_ERRORS:
                await unavailable("the database is unreachable; retry later").response()(
                    scope, receive, send
                )
                return
            if principal is not None:
                scope[PRINCIPAL] = principal
        await self.app(scope, receive, send)

    async def _admit(self, scope: Scope) -> Principal | None:
        """The user token the request is admitted with; None for any other request."""
        raw_query: bytes = scope.get("query_string", b"")
        from_query = _query_token(raw_query) if QUERY_TOKEN.encode() in raw_query else None
        token = from_query or bearer(_header(scope, b"authorization"))
        # API and admin tokens in the header (and requests with none) pass untouched: the
        # handlers judge them as ever. A JWT is three dot-separated parts; anything else is not.
        if token is None or (from_query is None and token.count(".") != 2):
            return None
        state: AppState = scope["app"].state.mirror
        settings = state.settings
        service_tokens = [*settings.api_tokens, *settings.admin_tokens]
        if from_query is None and (not self._tokens.enabled or known(token, service_tokens)):
            return None
        found = self._match(scope)
        if from_query is not None:
            if found is None or not found[0].streams:
                raise unauthorized("`access_token` is taken by …/stream routes only")
            if known(from_query, service_tokens):
                raise unauthorized("`access_token` takes user tokens only")
            principal = self._tokens.verify(from_query)  # 401 when user tokens are off
        elif found is not None and found[0].auth in ("none", "signature"):
            # These routes take no token: a header that is no valid user token is not theirs
            # to judge. A valid one still may not use them (below).
            try:
                principal = self._tokens.verify(token)
            except Problem:
                return None
        else:
            principal = self._tokens.verify(token)
        if found is None:
            raise forbidden("a user token may not use this route")
        endpoint, params = found
        await _decide(endpoint, params, principal, scope, state)
        return principal

    def _match(self, scope: Scope) -> tuple[Endpoint, dict[str, Any]] | None:
        """The route the router will pick (the first whose path and method match) and its path
        parameters; Route.matches does the same with a child scope this does not need."""
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        method = scope["method"]
        for endpoint, route in self._routes:
            found = route.path_regex.match(path)
            if found is not None and route.methods is not None and method in route.methods:
                convert = route.param_convertors
                return endpoint, {k: convert[k].convert(v) for k, v in found.groupdict().items()}
        return None


async def _decide(
    endpoint: Endpoint,
    params: dict[str, Any],
    principal: Principal,
    scope: Scope,
    state: AppState,
) -> None:
    if endpoint.user == "buddy":
        buddy_id: str = params["buddy_id"]
        if not await _owns(state, principal, buddy_id):
            raise no_such_buddy(buddy_id)
    elif endpoint.user == "buddies":
        _narrow_query(scope, principal, "user_id")
    elif endpoint.user == "user":
        if params["user_id"] != principal.user_id:
            raise forbidden("a user token reads and bootstraps its own user only")
        _narrow_query(scope, principal)
    else:
        raise forbidden("a user token may not use this route")


async def _owns(state: AppState, principal: Principal, buddy_id: str) -> bool:
    cache = state.broadcaster.cache
    if cache.enabled and state.broadcaster.connected.is_set():
        hit = cache.lookup(buddy_id)
        if hit is not None and principal.owns(*hit[2]):
            return True
    # Not known to be the user's: ask Postgres, for a buddy that exists and one that does not
    # alike, so the answer takes the same time either way.
    owner = await store.buddy_owner(state.pool, buddy_id)
    return owner is not None and principal.owns(*owner)


def _narrow_query(scope: Scope, principal: Principal, *user_param: str) -> None:
    """Impose the token's user (when the route filters by a `user_id` query parameter) and
    audience on the query string; asking for another one is `403`."""
    imposed = {name: principal.user_id for name in user_param}
    if principal.audience is not None:
        imposed["audience"] = principal.audience
    if not imposed:
        return
    raw: bytes = scope.get("query_string", b"")
    kept: list[bytes] = []
    for part in raw.split(b"&") if raw else ():
        name = unquote_plus(part.partition(b"=")[0].decode("latin-1"))
        if name not in imposed:
            kept.append(part)
            continue
        value = unquote_plus(part.partition(b"=")[2].decode("latin-1"))
        if value != imposed[name]:
            raise forbidden(f"a user token may not ask for another `{name}`")
    kept += [f"{n}={quote(v, safe='')}".encode() for n, v in imposed.items()]
    scope["query_string"] = b"&".join(kept)


def narrow_body(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    """An audience-bound user token bootstraps and mints for its audience only."""
    principal = principal_of(request.scope)
    if principal is None or principal.audience is None:
        return body
    audience = body.get("audience")
    if audience is not None and audience != principal.audience:
        raise forbidden("a user token may not ask for another `audience`")
    return {**body, "audience": principal.audience}


def _query_token(raw: bytes) -> str | None:
    values = [v for k, v in parse_qsl(raw.decode("latin-1"), True) if k == QUERY_TOKEN]
    if not values:
        return None
    if len(values) > 1 or not values[0]:
        raise unauthorized("give one `access_token`")
    return values[0]


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return ""
