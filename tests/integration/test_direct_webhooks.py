"""Deliveries answered by the HTTP protocol itself (service/server.py, DirectWebhooks), over
real sockets on a real uvicorn server running the service's protocol: which requests take that
path, and that HTTP/1.1 holds on it (keep-alive, pipelining, Connection: close, a body that
comes later)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from service import store
from service.app import create_app
from service.dev.samples import build_delivery
from service.ingest.fast import DirectWebhooks
from service.ingest.receiver import PATH
from tests.support.config import API_TOKEN, SECRET, make_settings
from tests.support.running import serving


@pytest.fixture
def direct_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The delivery ids DirectWebhooks answered (the protocol's path), in order."""
    calls: list[str] = []
    answer = DirectWebhooks.answer

    async def counted(self: DirectWebhooks, scope: Any, body: bytes, given: bytes) -> Any:
        response = await answer(self, scope, body, given)
        calls.append(json.loads(bytes(response.body)).get("delivery_id", ""))
        return response

    monkeypatch.setattr(DirectWebhooks, "answer", counted)
    return calls


@pytest.fixture
async def url(migrated: str, redis_url: str) -> AsyncIterator[str]:
    async with serving(create_app(make_settings(migrated, redis_url))) as served:
        yield served


def _request(buddy_id: str, *extra: str, path: str = PATH) -> tuple[bytes, str]:
    """A signed delivery as raw HTTP/1.1 bytes, and its delivery id."""
    headers, body = build_delivery("coins.earned", "v2", secret=SECRET, buddy_id=buddy_id)
    lines = [f"POST {path} HTTP/1.1", "Host: mirror", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"Content-Length: {len(body)}", *extra, "", ""]
    delivery_id = headers["X-Hatched-Delivery"]
    return "\r\n".join(lines).encode() + body, delivery_id


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def _stored(db: store.Pool, delivery_id: str) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM inbox WHERE delivery_id = $1", delivery_id))


async def test_a_plain_delivery_is_answered_by_the_protocol_as_the_app_would(
    url: str, db: store.Pool, direct_calls: list[str]
) -> None:
    reader, writer = await _open(url)
    try:
        raw, delivery_id = _request("buddy_direct_1", "X-Request-ID: req-direct")
        writer.write(raw)
        status, headers, body = await _response(reader)
    finally:
        writer.close()
    assert status == 202
    assert json.loads(body) == {"delivery_id": delivery_id, "status": "accepted"}
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"] == "req-direct"
    assert "date" in headers and "connection" not in headers
    assert direct_calls == [delivery_id]
    assert await _stored(db, delivery_id)


async def test_what_the_stack_may_answer_otherwise_goes_to_the_app(
    url: str, db: store.Pool, direct_calls: list[str]
) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        headers, body = build_delivery("coins.earned", "v2", secret=SECRET, buddy_id="buddy_q")
        query = await http.post(f"{PATH}?x=1", content=body, headers=headers)
        headers, body = build_delivery("coins.earned", "v2", secret=SECRET, buddy_id="buddy_a")
        token = {**headers, "Authorization": f"Bearer {API_TOKEN}"}
        authorized = await http.post(PATH, content=body, headers=token)
    assert (query.status_code, authorized.status_code) == (202, 202)
    assert direct_calls == []
    # HTTP/1.0, and a body that comes after its head, go to the app too, and are stored.
    reader, writer = await _open(url)
    try:
        raw, old_id = _request("buddy_http10")
        writer.write(raw.replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        assert (await _response(reader))[0] == 202
    finally:
        writer.close()
    reader, writer = await _open(url)
    try:
        raw, late_id = _request("buddy_late")
        head, _, body = raw.partition(b"\r\n\r\n")
        writer.write(head + b"\r\n\r\n" + body[:10])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(body[10:])
        status, _, answer = await _response(reader)
    finally:
        writer.close()
    assert (status, json.loads(answer)["delivery_id"]) == (202, late_id)
    assert direct_calls == []
    assert await _stored(db, old_id) and await _stored(db, late_id)


async def test_pipelined_requests_are_answered_in_their_order(
    url: str, db: store.Pool, direct_calls: list[str]
) -> None:
    first, first_id = _request("buddy_pipe_1")
    second, second_id = _request("buddy_pipe_2")
    health = b"GET /healthz HTTP/1.1\r\nHost: mirror\r\n\r\n"
    reader, writer = await _open(url)
    try:
        # One write: the read and the deliveries after it wait behind the first one's answer;
        # the last is the first again under another delivery id (a replay of its signature).
        writer.write(first + health + second + first.replace(first_id.encode(), b"dup", 1))
        answers = [await _response(reader) for _ in range(4)]
    finally:
        writer.close()
    assert [a[0] for a in answers] == [202, 200, 202, 200]
    assert json.loads(answers[0][2])["delivery_id"] == first_id
    assert json.loads(answers[1][2]) == {"status": "ok"}
    assert json.loads(answers[2][2])["delivery_id"] == second_id
    assert json.loads(answers[3][2]) == {"delivery_id": "dup", "status": "duplicate"}
    # The first went the protocol's way; those behind it were queued for the app.
    assert direct_calls == [first_id]
    assert await _stored(db, first_id) and await _stored(db, second_id)


async def test_keep_alive_and_connection_close_hold(
    url: str, db: store.Pool, direct_calls: list[str]
) -> None:
    reader, writer = await _open(url)
    try:
        ids = []
        for i in range(3):
            raw, delivery_id = _request(f"buddy_keep_{i}")
            writer.write(raw)
            status, headers, _ = await _response(reader)
            assert status == 202 and "connection" not in headers
            ids.append(delivery_id)
        raw, last_id = _request("buddy_close", "Connection: close")
        writer.write(raw)
        status, headers, _ = await _response(reader)
        # Answered, then closed by the server.
        assert (status, headers.get("connection")) == (202, "close")
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    assert direct_calls == ids  # a Connection: close request goes to the app
    for delivery_id in (*ids, last_id):
        assert await _stored(db, delivery_id)


async def test_a_failure_past_the_receiver_ends_the_connection_not_the_server(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: Any) -> Any:
        raise RuntimeError("a bug")

    with monkeypatch.context() as patched:
        patched.setattr(DirectWebhooks, "answer", broken)
        reader, writer = await _open(url)
        try:
            writer.write(_request("buddy_broken")[0])
            # No answer to give: the connection ends, as when an app fails before responding.
            assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            writer.close()
    reader, writer = await _open(url)
    try:
        writer.write(_request("buddy_after")[0])
        assert (await _response(reader))[0] == 202
    finally:
        writer.close()
