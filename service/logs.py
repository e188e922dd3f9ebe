"""Structured logs: JSON lines in production, readable lines in `dev`."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

import orjson
import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _dumps(event: object, **kw: Any) -> str:
    return orjson.dumps(event, default=repr).decode()


def configure(fmt: str = "json", level: int = logging.INFO) -> None:
    renderer: structlog.typing.Processor = (
        # orjson: a line per stored delivery and per drained batch makes the stdlib encoder
        # a visible share of a busy process.
        structlog.processors.JSONRenderer(serializer=_dumps)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # uvicorn and arq log through the standard library; give them the same shape.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                *shared[1:],
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # uvicorn's own errors carry exc_info: render it, or JSON says "<traceback>".
                structlog.processors.format_exc_info,
                renderer,
            ]
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # One line per outgoing REST call is noise; the hatched_api_requests_total metric counts them.
    logging.getLogger("httpx").setLevel(logging.WARNING)


_SAFE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


class RequestIdMiddleware:
    """Every log line written while serving a request carries its `request_id` (the caller's
    X-Request-ID when it is a sane token, else a new one), echoed in the response.

    It runs on every request, the cheapest ones included (a cached read is a few dozen
    microseconds), so it reads the raw ASGI headers and appends raw bytes rather than building
    Headers objects, and binds with tokens rather than `bound_contextvars` (which copies the
    whole context to remember what it replaces)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                raw = value
                break
        if not _SAFE_ID.fullmatch(raw):
            raw = os.urandom(16).hex().encode()
        request_id = raw.decode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", raw)]
            await send(message)

        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)
