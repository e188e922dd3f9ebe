"""Buddy reads answered from the per-process cache: in front of the whole middleware stack
(FastBuddyReads), and again in front of the router (CachedBuddyReads)."""

from __future__ import annotations

import functools
import time
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from service import metrics
from service.auth.bearer import authorized, bearer, known, principal_of
from service.auth.user_tokens import UserTokens
from service.logs import request_id
from service.problems import no_such_buddy
from service.read.cache import Owner
from service.read.etags import matches
from service.state import AppState

_BUDDY_PREFIX = "/v1/buddies/"
ROUTE = "/v1/buddies/{buddy_id}"
Hit = tuple[str, bytes, Owner]


def _cached(scope: Scope) -> tuple[AppState, str, Hit | None] | None:
    """For `GET /v1/buddies/{id}` (no root_path): the state, the id and its cache entry, if
    any. None for any other request."""
    if scope["type"] != "http" or scope["method"] != "GET" or scope.get("root_path"):
        return None
    path: str = scope["path"]
    buddy_id = path[len(_BUDDY_PREFIX) :]
    if not path.startswith(_BUDDY_PREFIX) or not buddy_id or "/" in buddy_id:
        return None
    state: AppState = scope["app"].state.mirror
    connected = state.broadcaster.connected.is_set()
    return state, buddy_id, state.broadcaster.cache.lookup(buddy_id) if connected else None


def _answer(tag: str, body: bytes, if_none_match: str) -> tuple[int, list[tuple[bytes, bytes]]]:
    """The status and headers `get_buddy` answers a cached buddy with (no body for a 304)."""
    headers = [(b"etag", tag.encode()), (b"cache-control", b"no-cache")]
    if matches(if_none_match, tag):
        return 304, headers
    headers += [
        (b"content-length", str(len(body)).encode()),
        (b"content-type", b"application/json"),
    ]
    return 200, headers


class FastBuddyReads:
    """ASGI middleware, the outermost: a cached `GET /v1/buddies/{id}` read with a token known
    to be good is answered here, before the layers every other request passes.

    On a hit the whole work is a dictionary lookup, and each layer in front of it (the HTTP
    metrics, the request id, CORS, the scope guard) costs a coroutine, a header scan and a
    wrapped `send` of its own: together more than the lookup and the answer. So this does in
    one header scan what those layers would have done with such a request:

    - auth: an API token, or a user token whose verdict is remembered (service/auth/
      user_tokens.py: it was verified before and has not expired) for a buddy of its own user
      and audience. Everything else (no token, an unknown or expired one, a token seen for the
      first time, another user's buddy) goes on through the stack, so the scope guard decides
      and answers as ever: another user's buddy stays the same `404` after the same Postgres
      query as a missing one, which a quick answer here would tell apart by its timing;
    - the request's count and time in the HTTP metrics, under the same labels;
    - the X-Request-ID echoed (nothing is logged, so nothing is bound);
    - CORS headers, by Starlette's own middleware instance when CORS is configured.

    Any other request (a miss, a query string, a repeated Authorization or If-None-Match
    header, other paths and methods, a mounted root_path) goes on unchanged.
    """

    def __init__(
        self, app: ASGIApp, tokens: UserTokens, cors: dict[str, Any] | None = None
    ) -> None:
        self.app = app
        self._tokens = tokens
        self._cors = CORSMiddleware(app, **cors) if cors else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        found = None if scope.get("query_string") else _cached(scope)
        state, _, hit = found if found is not None else (None, None, None)
        heads = _heads(scope) if hit is not None else None
        token = bearer(heads[0].decode("latin-1")) if heads is not None else None
        if state is None or hit is None or heads is None or token is None:
            await self.app(scope, receive, send)
            return
        tag, body, owner = hit
        # A remembered verdict belongs to a token the scope guard verified as a user token,
        # which it does only for tokens that are no API or admin token.
        principal = self._tokens.remembered(token)
        if principal is None:
            admitted = known(token, state.settings.api_tokens)
        else:
            admitted = principal.owns(*owner)
        if not admitted:
            await self.app(scope, receive, send)
            return
        _, if_none_match, given_id = heads
        status, headers = _answer(tag, body, if_none_match.decode("latin-1"))
        headers.append((b"x-request-id", request_id(given_id)))
        if self._cors is not None:
            request_headers = Headers(scope=scope)
            send = functools.partial(self._cors.send, send=send, request_headers=request_headers)
        metrics.observe_http("GET", ROUTE, str(status), time.perf_counter() - started)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body if status == 200 else b""})


def _heads(scope: Scope) -> tuple[bytes, bytes, bytes] | None:
    """Authorization, If-None-Match and X-Request-ID (b"" when absent), in one scan; None when
    Authorization or If-None-Match is repeated (the stack judges which one counts)."""
    authorization = if_none_match = given_id = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            if authorization is not None:
                return None
            authorization = value
        elif name == b"if-none-match":
            if if_none_match is not None:
                return None
            if_none_match = value
        elif name == b"x-request-id" and given_id is None:
            given_id = value
    return authorization or b"", if_none_match or b"", given_id or b""


class CachedBuddyReads:
    """ASGI middleware: `GET /v1/buddies/{id}` answered from the read cache before routing.

    The hottest route, and on a hit its whole work is a dictionary lookup, so what it costs is
    the framework around it: routing, the exception layer, Request and Response objects. A hit
    with a valid token is answered here with the very bytes and headers `get_buddy` sends;
    anything else (a miss, no or a wrong token, another path or method, a mounted root_path)
    goes on to the router unchanged, so errors keep their one implementation there. Most hits
    are answered sooner, by FastBuddyReads; this one answers those it leaves to the stack (a
    query string, a repeated header, the first request of a user token).

    A user token reaches here only admitted by service/auth/scope.py (which checked, on this very
    cache or in Postgres, that the buddy is its user's); the entry served is checked again, so
    one user's cached buddy is never sent to another's token whatever happened in between.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = _cached(scope)
        if found is not None:
            scope[metrics.ROUTE_KEY] = ROUTE
            state, buddy_id, hit = found
            if hit is not None and await _send_cached(scope, receive, send, state, buddy_id, hit):
                return
        await self.app(scope, receive, send)


async def _send_cached(
    scope: Scope,
    receive: Receive,
    send: Send,
    state: AppState,
    buddy_id: str,
    hit: Hit,
) -> bool:
    tag, body, owner = hit
    authorization = if_none_match = ""
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"if-none-match":
            if_none_match = value.decode("latin-1")
    principal = principal_of(scope)
    if principal is not None:
        if not principal.owns(*owner):
            # Not this user's, so not here: the same answer as a buddy that does not exist.
            await no_such_buddy(buddy_id).response()(scope, receive, send)
            return True
    elif not authorized(authorization, state.settings.api_tokens):
        return False
    status, headers = _answer(tag, body, if_none_match)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body if status == 200 else b""})
    return True
