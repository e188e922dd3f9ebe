"""The HTTP server's own limits: uvicorn's httptools protocol, bounded the way a bare `serve`
needs.

`serve` may be exposed without a proxy in front, so the service bounds what uvicorn leaves
open. httptools (uvicorn's fast parser) buffers a header until it is complete, however long,
and has no limit of its own (a 64 MB header took 5.7 s and hundreds of MB). uvicorn's h11
parser has one, but measured on the receiver benchmark it cost a third or more of the
throughput. So this protocol keeps httptools and measures the request head itself:

- a head (request line and headers, up to its blank line) must end within
  `h11_max_incomplete_event_size` bytes (MIRROR_MAX_HEADER_BYTES) of where it began, else
  `431` as problem+json, and the connection is closed before the parser holds more;
- every connection gets `timeout_keep_alive` seconds (MIRROR_KEEPALIVE_TIMEOUT_S) to deliver
  a complete head, from when it opens and again after each response: uvicorn arms its
  keep-alive timer only after a response and disarms it at the first byte, so a connection
  that sends nothing, or a header a byte at a time, would stay open for good;
- a connection answered before its request body was in (`413`, `408`) gets the same time to
  finish sending it, then is closed;
- a request httptools cannot parse is a `400` problem+json (uvicorn answers plain text).

It also writes a response's head and body in one system call where uvicorn makes two
(`_JoinedWrites`): for a cached read that second send() was the largest single cost.

And it answers the plainest deliveries itself (`DirectWebhooks`, service/ingest/fast.py): a
`POST /webhooks/hatched` over HTTP/1.1 with no query, whose whole body arrived with its head
and whose headers `DirectWebhooks.takes`, while no other request of the connection is being
answered and the concurrency limit is not reached. Its answer is written as the response
cycle would write it; a request that follows on the same connection waits for it as it waits
behind a response cycle (uvicorn's pipeline). Anything else, or a body still to come, goes to
the ASGI app as before.

The body is bounded by the receiver itself (size and MIRROR_BODY_TIMEOUT_S), connections per
process by uvicorn's `limit_concurrency` (MIRROR_MAX_CONNECTIONS).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import structlog
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.ingest.fast import DIRECT_STATE_KEY, DirectWebhooks
from service.ingest.receiver import PATH
from service.problems import PROBLEM_TYPE

_PATH = PATH.encode("ascii")

log = structlog.get_logger(__name__)

_TOO_LARGE = "Request header fields too large"


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn always passes a size (its default is h11's, 16 KB).
        self._max_head = self.config.h11_max_incomplete_event_size or 16 * 1024
        self._in_head = True
        self._head_bytes = 0
        self._heads = 0  # heads completed so far: tells whether one ended within a chunk
        self._tail = b""  # the last bytes of the head so far: its blank line may straddle chunks
        # When the head now awaited must be complete (None: none is awaited), and the one timer
        # that checks it. Re-arming a timer for every request (a cancel and a call_later each)
        # cost a visible share of a cached read; moving the deadline is an assignment, and the
        # timer, when it fires early, waits again for the deadline as it stands then.
        self._head_due: float | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        # A delivery taken for DirectWebhooks: its body so far, and the X-Request-ID it gave.
        self._direct: list[bytes] | None = None
        self._direct_given = b""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._writes = _JoinedWrites(transport, self.loop)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_due = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._writes.drop()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._in_head:
            room = max(self._max_head - self._head_bytes, 0)
            if len(data) > room and b"\r\n\r\n" not in self._tail + data[: room + 4]:
                self._writes.flush()
                _send_problem(self.transport, 431, "header_too_large", _TOO_LARGE)
                return
        heads = self._heads
        super().data_received(data)
        if self._in_head and heads == self._heads:
            self._head_bytes += len(data)
            self._tail = (self._tail + data)[-3:]
        if self._direct is not None:
            # The body is still coming: the request goes the usual way, with what came of it
            # (unless the parser refused what followed, and the connection is closing).
            body, self._direct = b"".join(self._direct), None
            if not self.transport.is_closing():
                self._start_cycle()
                if self.cycle is not None and body:
                    self.on_body(body)

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes, self._tail = False, 0, b""
        self._heads += 1
        self._cancel_head_deadline()
        given = self._takes_directly()
        if given is None:
            self._start_cycle()
        else:
            self._direct, self._direct_given = [], given

    def _start_cycle(self) -> None:
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.transport = self._writes

    def _takes_directly(self) -> bytes | None:
        """For a delivery DirectWebhooks may answer, the X-Request-ID it gave; else None."""
        direct: DirectWebhooks | None = self.app_state.get(DIRECT_STATE_KEY)
        if (
            direct is None
            # `dev` writes an access line per request, which only the response cycle does.
            or self.config.access_log
            or self.url != _PATH
            or self.root_path
            or self.parser.get_method() != b"POST"
            or self.parser.get_http_version() != "1.1"
            or not self.parser.should_keep_alive()
            or self.parser.should_upgrade()
            or (self.cycle is not None and not self.cycle.response_complete)
            or (
                self.limit_concurrency is not None
                and max(len(self.connections), len(self.tasks)) >= self.limit_concurrency
            )
        ):
            return None
        return direct.takes(self.headers)

    def on_body(self, body: bytes) -> None:
        if self._direct is not None:
            self._direct.append(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._direct is None:
            super().on_message_complete()
            self._in_head = True
            return
        body, self._direct = b"".join(self._direct), None
        self._in_head = True
        # Stands in for a response cycle until the answer is written: a request pipelined
        # behind this one is queued (and reading paused) as behind any unanswered request,
        # and a shutdown lets the answer go out, then closes.
        answering = _Answering()
        self.cycle = answering  # type: ignore[assignment]
        # The scope as the cycle would have it, for the app's handler of the unexpected.
        scope: Any = self.scope
        scope.update(method="POST", path=PATH, raw_path=_PATH, query_string=b"")
        task = self.loop.create_task(
            self._answer_directly(answering, scope, body, self._direct_given)
        )
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _answer_directly(
        self, cycle: _Answering, scope: Any, body: bytes, given: bytes
    ) -> None:
        direct: DirectWebhooks = self.app_state[DIRECT_STATE_KEY]
        try:
            response = await direct.answer(scope, body, given)
            cycle.response_complete = True
            if self.transport.is_closing():
                return  # the client left; the delivery is stored all the same
            keep_alive = cycle.keep_alive
            self._writes.flush()
            self.transport.write(_encoded(response, self.server_state.default_headers, keep_alive))
        except Exception:
            # `answer` answers every error of the receiver; this is a bug past it. With no
            # answer to give, the connection ends (the client retries), as uvicorn's cycle
            # ends it when an app fails before responding.
            log.exception("direct_answer_failed")
            cycle.response_complete = True
            self.transport.close()
            return
        if keep_alive:
            self.on_response_complete()
        else:
            self.transport.close()

    def on_response_complete(self) -> None:
        self._writes.flush()
        super().on_response_complete()
        if not self.transport.is_closing():
            # Also when the answer came before the request's body was in (413, 408): the rest
            # of it must arrive within the same time, so a client trickling it cannot keep the
            # connection. (Closing at once would reset a client still sending: it could lose
            # the answer.)
            self._arm_head_deadline()

    def send_400_response(self, msg: str) -> None:
        self._writes.flush()
        _send_problem(self.transport, 400, "bad_request", "Invalid HTTP request")

    def _arm_head_deadline(self) -> None:
        self._head_due = self.loop.time() + self.timeout_keep_alive
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_due, self._check_head_deadline)

    def _cancel_head_deadline(self) -> None:
        self._head_due = None

    def _check_head_deadline(self) -> None:
        self._head_timer = None
        if self._head_due is None:
            return  # a head came in time; the next arm starts a timer again
        if self.loop.time() < self._head_due:
            self._head_timer = self.loop.call_at(self._head_due, self._check_head_deadline)
        elif not self.transport.is_closing():
            self.transport.close()


class _Answering:
    """What the protocol reads of a response cycle, for a delivery being answered by
    DirectWebhooks."""

    def __init__(self) -> None:
        self.response_complete = False
        self.keep_alive = True
        # Read when the connection is lost.
        self.disconnected = False
        self.message_event = asyncio.Event()


def _encoded(response: Response, default_headers: list[tuple[bytes, bytes]], keep: bool) -> bytes:
    """A complete Response as uvicorn's cycle writes it: status line, the server's default
    headers (date, server), the response's own, `connection: close` when the connection
    ends, and the body."""
    parts: list[bytes | memoryview] = [STATUS_LINE[response.status_code]]
    for name, value in (*default_headers, *response.raw_headers):
        parts += [name, b": ", value, b"\r\n"]
    if not keep:
        parts.append(b"connection: close\r\n")
    parts += [b"\r\n", response.body]
    return b"".join(parts)


class _JoinedWrites(asyncio.Transport):
    """The transport as uvicorn's response cycle sees it (it calls write, close and is_closing
    only): a write is held until the cycle's next write, which goes out with it, or until the
    loop's next turn. A response's head and its body, sent by the app one after the other,
    thus leave in one write; a streamed response's head and chunks leave as they did, a turn
    later at most. What the protocol writes itself (a 400 or 431) goes after what is held."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held:
            joined, self._held = self._held + data, b""
            self._transport.write(joined)
        elif data:
            self._held = bytes(data)
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        if self._held:
            held, self._held = self._held, b""
            if not self._transport.is_closing():
                self._transport.write(held)

    def drop(self) -> None:
        self._held = b""

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


def _send_problem(transport: asyncio.Transport, status: int, code: str, title: str) -> None:
    body = orjson.dumps(
        {
            "type": PROBLEM_TYPE + code,
            "title": title,
            "status": status,
            "detail": title,
            "code": code,
        }
    )
    head = (
        f"HTTP/1.1 {status} {title}\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    transport.write(head.encode("ascii") + body)
    transport.close()
