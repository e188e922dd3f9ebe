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
        started = time.perf_counter()
        rid = request_id(given)
        tokens = structlog.contextvars.bind_contextvars(request_id=rid.decode())
        try:
            request = Request(scope, receive)
            try:
                response = await receiver.receive(request)
            except Problem as problem:
                response = problem.response()
            except Exception as exc:
                response = await self._unexpected(request, exc)
            response.raw_headers.append((b"x-request-id", rid))
            metrics.observe_http(
                "POST", receiver.PATH, str(response.status_code), time.perf_counter() - started
            )
            await response(scope, receive, send)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)

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
        given: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization" or (self._cors and name == b"origin"):
                return None
            if name == b"x-request-id" and given is None:
                given = value
        return given or b""
