"""POST /webhooks/hatched handled in front of the middleware stack (FastWebhooks)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service import metrics
from service.ingest import receiver
from service.logs import request_id
from service.problems import Problem
from service.state import AppState

Unexpected = Callable[[Request, Exception], Awaitable[Response]]


class FastWebhooks:
    """ASGI middleware, the outermost: a delivery goes straight to the receiver's handler.

    Every delivery is one request, and the layers in front of the handler (the HTTP metrics,
    the request id, the scope guard, the cached reads, Starlette's two exception layers, the
    router) each cost a coroutine, a header scan and a wrapped `send`: together about a fifth
    of the receiver's CPU, for a request none of them has anything to decide about. So this
    does what they would have done with it:

    - the request's count and time in the HTTP metrics, under the same labels;
    - the X-Request-ID echoed, and bound for every log line written while it is served;
    - a Problem answered as the exception handlers answer it, anything else by `unexpected`
      (the app's handler for what no route handled: 503 for the database, 500 for a bug).

    Requests the stack may answer otherwise go on through it unchanged: any other path or
    method, a mounted root_path, a query string or an Authorization header (the scope guard
    judges tokens on every route), an Origin header when CORS is configured.
    """

    def __init__(self, app: ASGIApp, unexpected: Unexpected, cors: bool = False) -> None:
        self.app = app
        self._unexpected = unexpected
        self._cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        given = self._plain(scope)
        if given is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        response = await answer(lambda: receiver.receive(request), given, scope, self._unexpected)
        await response(scope, receive, send)

    def _plain(self, scope: Scope) -> bytes | None:
        """The X-Request-ID given (b"" when absent) of a delivery this answers; None for any
        request that goes on through the stack."""
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != receiver.PATH
            or scope.get("root_path")
            or scope.get("query_string")
        ):
            return None
        return plain_headers(scope["headers"], self._cors)


def plain_headers(
    headers: list[tuple[bytes, bytes]], cors: bool, max_body: int | None = None
) -> bytes | None:
    """The X-Request-ID given (b"" when absent) when no header of a delivery would have the
    stack answer it otherwise (an Authorization header: the scope guard judges tokens on
    every route; an Origin header when CORS is configured); else None. With `max_body`, for
    a body the HTTP protocol reads itself: also a Content-Length within it (beyond it the
    stack answers 413), and no Transfer-Encoding or Expect header."""
    given: bytes | None = None
    length = max_body is None
    for name, value in headers:
        if name == b"authorization" or (cors and name == b"origin"):
            return None
        if name == b"x-request-id":
            if given is None:
                given = value
        elif max_body is not None:
            if name == b"content-length":
                if length or not value.isdigit() or int(value) > max_body:
                    return None
                length = True
            elif name in (b"transfer-encoding", b"expect"):
                return None
    return (given or b"") if length else None


async def answer(
    handling: Callable[[], Awaitable[Response]],
    given: bytes,
    scope: Scope,
    unexpected: Unexpected,
) -> Response:
    """The answer to a delivery, as the stack would give it: `handling` (the receiver's work)
    run with the request id bound for its log lines, a Problem answered as the exception
    handlers answer it and anything else by `unexpected`; the request id echoed and the
    request counted in the HTTP metrics."""
    started = time.perf_counter()
    rid = request_id(given)
    tokens = structlog.contextvars.bind_contextvars(request_id=rid.decode())
    try:
        try:
            response = await handling()
        except Problem as problem:
            response = problem.response()
        except Exception as exc:
            response = await unexpected(Request(scope), exc)
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
    response.raw_headers.append((b"x-request-id", rid))
    metrics.observe_http(
        "POST", receiver.PATH, str(response.status_code), time.perf_counter() - started
    )
    return response


# The key of the lifespan state under which the app hands DirectWebhooks to the protocol.
DIRECT_STATE_KEY = "direct_webhooks"


class DirectWebhooks:
    """A delivery answered by the HTTP protocol itself (service/server.py), below ASGI.

    Even with FastWebhooks in front of the stack, uvicorn's response cycle, the ASGI scope
    and messages and Starlette's Request and Response around each delivery cost about a third
    of `serve`'s CPU per delivery (bench/BENCHMARKS.md, "A quiet VM"). So the protocol hands
    this the deliveries that need none of that: the whole request already read, of a known
    length within MIRROR_MAX_BODY_BYTES, and nothing about it that a layer of the stack would
    decide otherwise (see `takes`). What they get is what FastWebhooks would answer, through
    the same receiver; every other request goes the way it always went.
    """

    def __init__(self, state: AppState, unexpected: Unexpected) -> None:
        self._state = state
        self._unexpected = unexpected
        self._cors = bool(state.settings.cors_origins)
        self._max_body = state.settings.max_body_bytes

    def takes(self, headers: list[tuple[bytes, bytes]]) -> bytes | None:
        """The X-Request-ID given (b"" when absent) of a delivery whose headers allow it to
        be answered here, else None. The method and path are the protocol's to check."""
        return plain_headers(headers, self._cors, self._max_body)

    async def answer(self, scope: Scope, body: bytes, given: bytes) -> Response:
        """`scope`: the request's ASGI scope; `given`: what `takes` returned."""
        headers = scope["headers"]

        async def handling() -> Response:
            receiver.refuse_ambiguous(headers)
            return await receiver.store_body(self._state, headers, body)

        return await answer(handling, given, scope, self._unexpected)
