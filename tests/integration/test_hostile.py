"""Hostile and malformed deliveries against a real `serve` process: one bad delivery never
costs another, replays and ambiguous headers change nothing, and nothing answers 500."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from service import store
from service.config import Settings
from service.ingest.inbox import Inbox
from service.ingest.signatures import signature_headers
from service.ingest.wakeups import Waker
from service.store import NewDelivery
from tests.support.config import SECRET
from tests.support.harness import serve, service_env

BODY_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def served(
    migrated: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    log = tmp_path_factory.mktemp("hostile") / "serve.log"
    env = service_env(migrated, redis_url, MIRROR_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S))
    with serve(env, log) as url:
        yield url, log
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]
    assert "unhandled_error" not in text, text[-4000:]


@pytest.fixture
async def http(served: tuple[str, Path], db: store.Pool) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served[0], timeout=30) as client:
        yield client


def signed(
    body: bytes, delivery_id: str, event_type: str = "coins.earned", ts: int | None = None
) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {
        "X-Hatched-Delivery": delivery_id,
        "X-Hatched-Event": event_type,
        "Content-Type": "application/json",
        **signature_headers(body, SECRET, ts, "v2"),
    }


def coins(buddy_id: str, n: int) -> bytes:
    return json.dumps(
        {"buddy_id": buddy_id, "amount": 1, "balance": n, "ledger_id": f"l{n}"}
    ).encode()


async def test_over_long_ids_are_dead_and_cost_no_other_delivery(
    http: httpx.AsyncClient, db: store.Pool, served: tuple[str, Path]
) -> None:
    # Random, so that compression cannot bring them under Postgres's index entry limit.
    long_ids = [secrets.token_urlsafe(3000) for _ in range(20)]
    long_buddy = secrets.token_urlsafe(2250)
    requests = [(coins(f"buddy_{i}", i), f"normal-{i}") for i in range(200)]
    requests += [(coins("buddy_x", 1000 + i), d) for i, d in enumerate(long_ids)]
    requests += [(coins(long_buddy, 5000), "long-buddy")]

    async def send(body: bytes, delivery_id: str) -> httpx.Response:
        return await http.post("/webhooks/hatched", content=body, headers=signed(body, delivery_id))

    answers = await asyncio.gather(*(send(b, d) for b, d in requests))
    statuses = [(a.status_code, a.json()["status"]) for a in answers]
    assert statuses[:200] == [(202, "accepted")] * 200
    assert statuses[200:] == [(202, "dead")] * 21
    stored = {
        r["delivery_id"]: r
        for r in await db.fetch("SELECT delivery_id, status, reason, buddy_id FROM inbox")
    }
    assert len(stored) == 221
    assert all(stored[f"normal-{i}"]["buddy_id"] == f"buddy_{i}" for i in range(200))
    dead = [r for r in stored.values() if r["status"] == "dead"]
    assert len(dead) == 21
    for row in dead:
        assert row["reason"].startswith("invalid_id:")
        assert len(row["reason"]) < 200
    # A retry of a long-id delivery is a duplicate, not a second dead row nor a 503.
    again = await send(coins("buddy_x", 1000), long_ids[0])
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    log = served[1].read_text()
    assert not any(d[:100] in log for d in long_ids) and long_buddy[:100] not in log


async def test_a_row_the_database_refuses_is_dead_and_its_batch_is_stored(
    settings: Settings, db: store.Pool
) -> None:
    """Bypassing the parser's id rule: the group commit itself isolates a refused row."""
    waker = Waker(settings.redis_url or "", settings.queue_name, settings.redis_timeout_s)
    inbox = Inbox(db, waker)

    def delivery(delivery_id: str, buddy_id: str) -> NewDelivery:
        return NewDelivery(
            delivery_id=delivery_id,
            format="v2",
            event_type="coins.earned",
            event_id=None,
            buddy_id=buddy_id,
            shard=0,
            occurred_at=None,
            signed_at=datetime.now(UTC),
            headers={},
            body=b"{}",
            status="accepted",
            reason=None,
        )

    # A buddy id over the btree entry limit: the inbox's buddy index refuses the row.
    batch = [delivery(f"ok-{i}", f"buddy_{i}") for i in range(30)]
    poison = secrets.token_urlsafe(6000)
    batch.insert(10, delivery("poison", poison))
    try:
        outcomes = await asyncio.gather(*(inbox.store(d) for d in batch))
    finally:
        await inbox.close()
        await waker.close()
    assert [o.status for o in outcomes] == ["accepted"] * 10 + ["dead"] + ["accepted"] * 20
    assert all(o.seq is not None for o in outcomes)
    row = await db.fetchrow(
        "SELECT status, reason, buddy_id FROM inbox WHERE delivery_id = 'poison'"
    )
    assert row is not None and row["status"] == "dead" and row["buddy_id"] is None
    assert row["reason"].startswith("store_refused:") and poison[:50] not in row["reason"]
    assert await db.fetchval("SELECT count(*) FROM inbox WHERE status = 'accepted'") == 30


async def test_a_replayed_signature_is_a_duplicate_whatever_its_headers_say(
    http: httpx.AsyncClient, db: store.Pool
) -> None:
    body = coins("buddy_replay", 10)
    ts = int(time.time())
    first = await http.post("/webhooks/hatched", content=body, headers=signed(body, "orig", ts=ts))
    assert first.status_code == 202
    for delivery_id, event_type in [
        ("new-1", "coins.earned"),
        ("new-2", "coins.earned"),
        ("orig", "coins.spent"),
        ("new-3", "coins.spent"),
    ]:
        replay = await http.post(
            "/webhooks/hatched", content=body, headers=signed(body, delivery_id, event_type, ts)
        )
        assert replay.status_code == 200, replay.text
        assert replay.json() == {"delivery_id": delivery_id, "status": "duplicate"}
    # The same HMAC under the other scheme's header is the same attempt too.
    v1 = {"X-Hatched-Delivery": "new-4", "X-Hatched-Event": "coins.earned"}
    v1.update(signature_headers(body, SECRET, ts, "v1"))
    as_v1 = await http.post("/webhooks/hatched", content=body, headers=v1)
    assert as_v1.status_code == 200 and as_v1.json()["status"] == "duplicate"
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 1
    # Hatched's own retry is signed afresh: a new signature, the same delivery id.
    retry = await http.post(
        "/webhooks/hatched", content=body, headers=signed(body, "orig", ts=ts + 1)
    )
    assert retry.status_code == 200 and retry.json()["status"] == "duplicate"
    # A new delivery with a new signature is stored as usual.
    other = coins("buddy_replay", 11)
    fresh = await http.post("/webhooks/hatched", content=other, headers=signed(other, "next"))
    assert fresh.status_code == 202


@pytest.mark.parametrize(
    "repeated",
    ["X-Hatched-Delivery", "X-Hatched-Event", "X-Hatched-Signature", "X-Hatched-Timestamp"],
)
async def test_repeated_significant_headers_are_refused_and_nothing_is_stored(
    http: httpx.AsyncClient, db: store.Pool, repeated: str
) -> None:
    body = coins("buddy_dup", 1)
    headers = list(signed(body, "duphdr-first").items())
    value = dict(headers)[repeated]
    other = {"X-Hatched-Delivery": "duphdr-second", "X-Hatched-Event": "coins.spent"}
    headers.append((repeated, other.get(repeated, value)))
    response = await http.post("/webhooks/hatched", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "ambiguous_header"
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 0


async def test_both_signature_schemes_at_once_are_ambiguous(
    http: httpx.AsyncClient, db: store.Pool
) -> None:
    body = coins("buddy_dup", 1)
    headers = {**signed(body, "both"), **signature_headers(body, SECRET, int(time.time()), "v1")}
    response = await http.post("/webhooks/hatched", content=body, headers=headers)
    assert response.status_code == 400 and response.json()["code"] == "ambiguous_header"
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 0


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"buddy_id":"b","x":' + b"[" * 900 + b"]" * 900 + b"}", "body_too_deep"),
        (b'{"buddy_id":"b","amount":1,"occurred_at":"0001-01-01T00:00:00+14:00"}', "time_out"),
        (b'{"buddy_id":"b","amount":1,"occurred_at":"9999-12-31T23:59:59-14:00"}', "time_out"),
    ],
)
async def test_deep_or_out_of_range_bodies_are_dead_not_500(
    http: httpx.AsyncClient, db: store.Pool, body: bytes, reason: str
) -> None:
    response = await http.post("/webhooks/hatched", content=body, headers=signed(body, reason))
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "dead"
    row = await db.fetchrow("SELECT status, reason FROM inbox WHERE delivery_id = $1", reason)
    assert row is not None and row["reason"].startswith(reason)


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    """What the server sends, until `marker` arrives or it closes the connection."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while marker not in data and (chunk := sock.recv(65536)):
            data += chunk
    return data


async def test_an_aborted_upload_is_one_info_line(served: tuple[str, Path], db: store.Pool) -> None:
    url, log = served
    before = len(log.read_text())
    for _ in range(5):
        with _raw(url) as sock:
            sock.sendall(
                b"POST /webhooks/hatched HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                + b"{" * 10
            )
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    lines = [json.loads(line) for line in log.read_text()[before:].splitlines() if line.strip()]
    disconnects = [line for line in lines if line.get("event") == "client_disconnected"]
    assert len(disconnects) == 5, lines
    assert all(line["level"] == "info" for line in disconnects)
    assert all(line.get("level") not in ("error", "critical") for line in lines), lines


async def test_a_trickled_body_is_cut_at_the_body_timeout(
    served: tuple[str, Path], db: store.Pool
) -> None:
    started = time.monotonic()
    with _raw(served[0]) as sock:
        sock.sendall(b"POST /webhooks/hatched HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        answer = await asyncio.to_thread(_read_until, sock, b"}")
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"code":"request_timeout"' in answer
        # Then the connection is closed (after the keep-alive timeout, 5 s by default): the
        # rest of that body buys nothing.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"x" * 10)
        assert _read_until(sock, b"never") in (b"", answer.partition(b"}")[2])
    assert time.monotonic() - started < BODY_TIMEOUT_S + 5 + 3
