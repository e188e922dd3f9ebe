"""The request id: the caller's when it is a sane token, else a fresh one, echoed back."""

from __future__ import annotations

import re

import pytest
import structlog
from starlette.types import Message, Receive, Scope, Send

from service.logs import RequestIdMiddleware


async def _answer(headers: list[tuple[bytes, bytes]]) -> tuple[str, str]:
    """The X-Request-ID sent back, and the request_id bound while the app ran."""
    seen: dict[str, str] = {}
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.update(structlog.contextvars.get_contextvars())
        await send({"type": "http.response.start", "status": 204, "headers": []})

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": headers}
    await RequestIdMiddleware(app)(scope, receive, send)
    echoed = dict(sent[0]["headers"])[b"x-request-id"].decode()
    assert structlog.contextvars.get_contextvars().get("request_id") is None  # unbound after
    return echoed, seen["request_id"]


async def test_a_sane_caller_id_is_kept() -> None:
    assert await _answer([(b"x-request-id", b"req-123")]) == ("req-123", "req-123")


@pytest.mark.parametrize("given", [b"", b"req-123\n", b"a" * 65, b"bad id", "é".encode()])
async def test_anything_else_gets_a_fresh_id(given: bytes) -> None:
    echoed, bound = await _answer([(b"x-request-id", given)])
    assert echoed == bound and re.fullmatch(r"[0-9a-f]{32}", echoed)


async def test_no_header_gets_a_fresh_id_each_time() -> None:
    first, second = await _answer([]), await _answer([])
    assert first[0] != second[0]
