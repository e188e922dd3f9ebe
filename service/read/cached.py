"""Buddy reads answered from the per-process cache, in front of the router."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from service import metrics
from service.auth.bearer import authorized, principal_of
from service.problems import no_such_buddy
from service.read.cache import Owner
from service.read.etags import matches
from service.state import AppState

_BUDDY_PREFIX = "/v1/buddies/"


class CachedBuddyReads:
    """ASGI middleware: `GET /v1/buddies/{id}` answered from the read cache before routing.

    The hottest route, and on a hit its whole work is a dictionary lookup, so what it costs is
    the framework around it: routing, the exception layer, Request and Response objects. A hit
    with a valid token is answered here with the very bytes and headers `get_buddy` sends;
    anything else (a miss, no or a wrong token, another path or method, a mounted root_path)
    goes on to the router unchanged, so errors keep their one implementation there.

    A user token reaches here only admitted by service/auth/scope.py (which checked, on this very
    cache or in Postgres, that the buddy is its user's); the entry served is checked again, so
    one user's cached buddy is never sent to another's token whatever happened in between.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("root_path"):
            path: str = scope["path"]
            buddy_id = path[len(_BUDDY_PREFIX) :]
            if path.startswith(_BUDDY_PREFIX) and buddy_id and "/" not in buddy_id:
                state: AppState = scope["app"].state.mirror
                cache = state.broadcaster.cache
                hit = cache.lookup(buddy_id) if state.broadcaster.connected.is_set() else None
                scope[metrics.ROUTE_KEY] = "/v1/buddies/{buddy_id}"
                if hit is not None and await _send_cached(
                    scope, receive, send, state, buddy_id, hit
                ):
                    return
        await self.app(scope, receive, send)


async def _send_cached(
    scope: Scope,
    receive: Receive,
    send: Send,
    state: AppState,
    buddy_id: str,
    hit: tuple[str, bytes, Owner],
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
    headers = [(b"etag", tag.encode()), (b"cache-control", b"no-cache")]
    if matches(if_none_match, tag):
        await send({"type": "http.response.start", "status": 304, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return True
    headers += [
        (b"content-length", str(len(body)).encode()),
        (b"content-type", b"application/json"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return True
