"""Structured logs: JSON lines in production, readable lines in `dev`."""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
import time
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
    handler.addFilter(RedactQueryTokens())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # One line per outgoing REST call is noise; the hatched_api_requests_total metric counts them.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    arq_worker = logging.getLogger("arq.worker")
    if not any(isinstance(f, _ArqChatter) for f in arq_worker.filters):
        arq_worker.addFilter(_ArqChatter())


# arq's "  0.01s → cron:sweep()" and "  0.02s ← cron:sweep ● 0" lines, its health record, and
# the "shutdown on SIGUSR1" it writes when stopped in-process with no signal at all (`dev`).
_ARQ_CHATTER = re.compile(r"\s*-?[\d.]+s [→←] cron:|recording health|shutdown on SIGUSR1")


class _ArqChatter(logging.Filter):
    """arq logs every cron run twice (start and end) and each health record at INFO: at idle
    that is most of a worker's output. Those lines become DEBUG (kept only at DEBUG level);
    the jobs that apply deliveries, retries and shutdown summaries stay at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        if not _ARQ_CHATTER.match(record.getMessage()):
            return True
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


# A flood of forged or misconfigured deliveries must not fill the disk: per refusal code, at
# most this many lines per window; the next line says how many were left out.
REFUSED_LINES_PER_WINDOW = 5
REFUSED_WINDOW_S = 10.0
_refused: dict[str, list[float]] = {}  # code -> [window start, lines in it, suppressed]

_log = structlog.get_logger("service.ingest.receiver")


def signature_refused(code: str, now: float | None = None) -> bool:
    """One warning line for a refused signature (its code; never a secret or a signature),
    rate-limited. True when a line was written."""
    now = time.monotonic() if now is None else now
    window = _refused.setdefault(code, [now, 0, 0])
    if now - window[0] >= REFUSED_WINDOW_S:
        window[0], window[1] = now, 0
    if window[1] >= REFUSED_LINES_PER_WINDOW:
        window[2] += 1
        return False
    window[1] += 1
    suppressed, window[2] = int(window[2]), 0
    if suppressed:
        _log.warning("signature_refused", code=code, suppressed=suppressed)
    else:
        _log.warning("signature_refused", code=code)
    return True


_QUERY_TOKEN = re.compile(r"(access_token=)[^&\s\"']*")


def redact(text: str) -> str:
    """A URL's `access_token=` value replaced: a user token in a URL is never written out."""
    return _QUERY_TOKEN.sub(r"\1[redacted]", text) if "access_token=" in text else text


class RedactQueryTokens(logging.Filter):
    """On the one stdlib handler, so uvicorn's access lines (`hatched-mirror dev` writes them)
    and anything else logging a URL never carry a token from a query string."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


_SAFE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
# A new id is this process's random prefix and a count: 32 hex digits, unique across processes
# and restarts without a random read per request (an id is a label, not a secret).
_ID_PREFIX = os.urandom(8).hex()
_ids = itertools.count()


def _new_prefix() -> None:
    global _ID_PREFIX
    _ID_PREFIX = os.urandom(8).hex()


# A forked child (a server that forks its workers) must not repeat its parent's ids.
os.register_at_fork(after_in_child=_new_prefix)


def request_id(given: bytes) -> bytes:
    """The caller's X-Request-ID value when it is a sane token, else a new id."""
    if given and _SAFE_ID.fullmatch(given):
        return given
    return f"{_ID_PREFIX}{next(_ids):016x}".encode()


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
        raw = request_id(raw)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", raw)]
            await send(message)

        tokens = structlog.contextvars.bind_contextvars(request_id=raw.decode())
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)
