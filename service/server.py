"""The HTTP server's own limits: uvicorn's h11 protocol, bounded the way a bare `serve` needs.

`serve` may be exposed without a proxy in front, so the service bounds what uvicorn leaves
open. uvicorn's default parser (httptools) accepts a request head of any size (a 64 MB header
took 5.7 s and hundreds of MB of memory); h11 refuses one over `max_incomplete_event_size`,
which is the whole head (request line and every header). On top of h11 this protocol:

- answers an over-long head with `431` (h11's own status hint; uvicorn would say 400), as a
  problem+json like every other error;
- gives every connection `timeout_keep_alive` seconds to deliver a complete request head,
  from when it opens and again after each response: uvicorn arms its keep-alive timer only
  after a response and disarms it at the first byte, so a connection that sends nothing, or a
  header a byte at a time, would stay open for good.

The body is bounded by the receiver itself (size and MIRROR_BODY_TIMEOUT_S), connections per
process by uvicorn's `limit_concurrency`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.problems import PROBLEM_TYPE


class _Connection(h11.Connection):
    """h11's connection, remembering why it refused the peer and telling when a head is in."""

    def __init__(self, max_incomplete_event_size: int, on_request: Any) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
        self.refusal: h11.RemoteProtocolError | None = None
        self._on_request = on_request

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refusal = exc
            raise
        if isinstance(event, h11.Request):
            self._on_request()
        return event


class BoundedH11Protocol(H11Protocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn always passes a size (its default is h11's, 16 KB).
        limit = self.config.h11_max_incomplete_event_size or 16 * 1024
        self.conn = _Connection(limit, self._head_received)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_received()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._head_received()
        self._head_deadline = self.loop.call_later(self.timeout_keep_alive, self._head_too_slow)

    def _head_received(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        refusal = self.conn.refusal if isinstance(self.conn, _Connection) else None
        if refusal is not None and refusal.error_status_hint == 431:
            self._send_problem(431, "header_too_large", "Request header fields too large")
        else:
            self._send_problem(400, "bad_request", "Invalid HTTP request")

    def _send_problem(self, status: int, code: str, title: str) -> None:
        body = orjson.dumps(
            {
                "type": PROBLEM_TYPE + code,
                "title": title,
                "status": status,
                "detail": title,
                "code": code,
            }
        )
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        # h11 refuses to send on a connection it put in the ERROR state; write the bytes.
        head = f"HTTP/1.1 {status} {title}\r\n".encode()
        head += b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"
        self.transport.write(head + body)
        self.transport.close()
