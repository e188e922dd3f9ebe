"""The request id: the caller's when it is a sane token, else a fresh one, echoed back."""

from __future__ import annotations

import os
import re

import pytest
import structlog
from starlette.types import Message, Receive, Scope, Send

from service.logs import RequestIdMiddleware, request_id


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


def test_a_forked_child_makes_ids_of_its_own() -> None:
    """New ids are a per-process prefix and a count: a forked child must not reuse its
    parent's prefix, or both would hand out the same ids."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first new id, to the parent
        os.write(write_end, request_id(b""))
        os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 64)
    os.waitpid(pid, 0)
    mine = request_id(b"")
    assert re.fullmatch(rb"[0-9a-f]{32}", child) and child[:16] != mine[:16]
