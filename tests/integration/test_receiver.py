"""Every receiver case of the contract, against real Postgres and Redis over real HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from prometheus_client import REGISTRY
from starlette.types import Message

from service import store
from service.app import create_app, unexpected_error
from service.dev.samples import build_delivery
from service.ingest import receiver
from service.ingest.fast import FastWebhooks
from service.ingest.signatures import V2_SIGNATURE, signature_headers
from tests.support.config import API_TOKEN, SECOND_SECRET, SECRET, make_settings
from tests.support.running import app_client

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hatched"
CLOSED_PORT_PG = "postgresql://postgres@127.0.0.1:1/nothing"
CLOSED_PORT_REDIS = "redis://127.0.0.1:1/0"


def resign(
    fixture: dict[str, Any], secret: str = SECRET, ts: int | None = None
) -> tuple[dict[str, str], bytes]:
    """A recorded delivery, signed now (the recorded signature is outside the replay window)."""
    body = json.dumps(fixture["body"], separators=(",", ":")).encode()
    ts = int(time.time()) if ts is None else ts
    fmt: Literal["v1", "v2"] = "v2" if fixture["era"] == "v2_headers" else "v1"
    headers = {k: v for k, v in fixture["headers"].items() if "signature" not in k.lower()}
    headers = {k: v for k, v in headers.items() if k.lower() != "x-hatched-timestamp"}
    headers.update(signature_headers(body, secret, ts, fmt))
    return headers, body


async def stored(pool: store.Pool, delivery_id: str) -> dict[str, Any] | None:
    row = await pool.fetchrow("SELECT * FROM inbox WHERE delivery_id = $1", delivery_id)
    return dict(row) if row is not None else None


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.json")), ids=lambda p: p.stem)
async def test_every_fixture_is_accepted_and_stored(
    http: httpx.AsyncClient, db: store.Pool, path: Path
) -> None:
    fixture = json.loads(path.read_text())
    headers, body = resign(fixture)
    response = await http.post("/webhooks/hatched", content=body, headers=headers)
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["status"] == "accepted"
    row = await stored(db, answer["delivery_id"])
    assert row is not None
    assert bytes(row["body"]) == body
    assert row["buddy_id"] == "buddy_01HXA7Q2M9K3"
    assert row["event_type"] == fixture["event_type"].replace("coin.", "coins.")


async def test_duplicate_delivery_answers_200_and_stores_nothing_new(
    http: httpx.AsyncClient, db: store.Pool
) -> None:
    headers, body = build_delivery("coins.earned", "v2", secret=SECRET)
    first = await http.post("/webhooks/hatched", content=body, headers=headers)
    # Hatched signs each attempt afresh: a retry has a new timestamp, same delivery id.
    retry_headers = {**headers, **signature_headers(body, SECRET, int(time.time()) + 1, "v2")}
    second = await http.post("/webhooks/hatched", content=body, headers=retry_headers)
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.json() == {"delivery_id": first.json()["delivery_id"], "status": "duplicate"}
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 1


async def test_second_secret_is_accepted_during_rotation(
    http: httpx.AsyncClient, db: store.Pool
) -> None:
    headers, body = build_delivery("buddy.hatched", "v1", secret=SECOND_SECRET)
    response = await http.post("/webhooks/hatched", content=body, headers=headers)
    assert response.status_code == 202


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json at all", "body_not_json"),
        (b"[1, 2, 3]", "body_not_object"),
        (b'{"amount": 5}', "no_buddy_id"),
    ],
)
async def test_signed_but_unusable_body_is_kept_as_dead(
    http: httpx.AsyncClient, db: store.Pool, body: bytes, reason: str
) -> None:
    headers = {"X-Hatched-Event": "coins.earned", "X-Hatched-Delivery": f"dead-{reason}"}
    headers.update(signature_headers(body, SECRET, int(time.time()), "v2"))
    response = await http.post("/webhooks/hatched", content=body, headers=headers)
    assert response.status_code == 202
    assert response.json() == {"delivery_id": f"dead-{reason}", "status": "dead"}
    row = await stored(db, f"dead-{reason}")
    assert row is not None
    assert row["status"] == "dead"
    assert row["reason"] == reason
    assert bytes(row["body"]) == body


async def test_unknown_event_type_is_kept_as_unmapped(
    http: httpx.AsyncClient, db: store.Pool
) -> None:
    body = b'{"buddy_id":"buddy_x","box_id":"box_1"}'
    headers = {"X-Hatched-Event": "mystery_box.opened", "X-Hatched-Delivery": "unmapped-1"}
    headers.update(signature_headers(body, SECRET, int(time.time()), "v2"))
    response = await http.post("/webhooks/hatched", content=body, headers=headers)
    assert response.status_code == 202
    assert response.json()["status"] == "unmapped"
    row = await stored(db, "unmapped-1")
    assert row is not None
    assert (row["status"], row["event_type"], row["buddy_id"]) == (
        "unmapped",
        "mystery_box.opened",
        "buddy_x",
    )


async def _problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code
    assert problem["status"] == status
    assert {"type", "title", "detail"} <= problem.keys()


async def test_missing_signature_is_401(http: httpx.AsyncClient, db: store.Pool) -> None:
    headers, body = build_delivery("coins.earned", "v2", secret=SECRET)
    del headers["X-Hatched-Signature"]
    await _problem(
        await http.post("/webhooks/hatched", content=body, headers=headers),
        401,
        "missing_signature",
    )
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 0


async def test_malformed_signature_is_401(http: httpx.AsyncClient, db: store.Pool) -> None:
    headers, body = build_delivery("coins.earned", "v1", secret=SECRET)
    headers["Hatched-Signature"] = "garbage"
    await _problem(
        await http.post("/webhooks/hatched", content=body, headers=headers),
        401,
        "missing_signature",
    )


async def test_forged_signature_is_401(http: httpx.AsyncClient, db: store.Pool) -> None:
    headers, body = build_delivery("coins.earned", "v2", secret="whsec_someone_else")
    await _problem(
        await http.post("/webhooks/hatched", content=body, headers=headers),
        401,
        "invalid_signature",
    )
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 0


async def test_tampered_body_is_401(http: httpx.AsyncClient, db: store.Pool) -> None:
    headers, body = build_delivery("coins.earned", "v2", secret=SECRET, data={"balance": 10})
    tampered = body.replace(b'"balance":10', b'"balance":99999')
    assert tampered != body
    await _problem(
        await http.post("/webhooks/hatched", content=tampered, headers=headers),
        401,
        "invalid_signature",
    )


async def test_stale_timestamp_is_401(http: httpx.AsyncClient, db: store.Pool) -> None:
    headers, body = build_delivery(
        "coins.earned", "v2", secret=SECRET, timestamp=int(time.time()) - 301
    )
    await _problem(
        await http.post("/webhooks/hatched", content=body, headers=headers), 401, "stale_timestamp"
    )
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 0


async def test_oversized_body_is_413_by_content_length(
    http: httpx.AsyncClient, db: store.Pool
) -> None:
    body = b"{" + b" " * 2_000_000 + b"}"
    headers = signature_headers(body, SECRET, int(time.time()), "v2")
    await _problem(
        await http.post("/webhooks/hatched", content=body, headers=headers),
        413,
        "payload_too_large",
    )
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 0


async def test_oversized_chunked_body_is_413_while_reading(
    http: httpx.AsyncClient, db: store.Pool
) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(64):
            sent += 65536
            yield b" " * 65536

    response = await http.post(
        "/webhooks/hatched", content=chunks(), headers={"X-Hatched-Signature": "x"}
    )
    await _problem(response, 413, "payload_too_large")
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 0


async def test_database_down_answers_503_with_retry_after(migrated: str, redis_url: str) -> None:
    settings = make_settings(CLOSED_PORT_PG, redis_url, MIRROR_DB_TIMEOUT_S="1")
    async with app_client(settings) as http:
        headers, body = build_delivery("coins.earned", "v2", secret=SECRET)
        started = time.monotonic()
        response = await http.post("/webhooks/hatched", content=body, headers=headers)
        assert time.monotonic() - started < 3, "a dead database must not hang the request"
        await _problem(response, 503, "unavailable")
        assert response.headers["retry-after"].isdigit()
        ready = await http.get("/readyz")
        assert ready.status_code == 503


async def test_redis_down_still_answers_202_and_stores(migrated: str, db: store.Pool) -> None:
    settings = make_settings(migrated, CLOSED_PORT_REDIS)
    async with app_client(settings) as http:
        headers, body = build_delivery("coins.earned", "v2", secret=SECRET)
        response = await http.post("/webhooks/hatched", content=body, headers=headers)
        assert response.status_code == 202
        row = await stored(db, response.json()["delivery_id"])
        assert row is not None and row["status"] == "accepted"


async def test_health_and_readiness(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).status_code == 200
    ready = await http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "postgres": True, "redis": True}


async def test_header_names_are_case_insensitive(http: httpx.AsyncClient, db: store.Pool) -> None:
    headers, body = build_delivery("coins.earned", "v1", secret=SECRET)
    lowered = {k.lower(): v for k, v in headers.items()}
    response = await http.post("/webhooks/hatched", content=body, headers=lowered)
    assert response.status_code == 202


async def test_deliveries_skip_the_stack_and_everything_else_goes_through(
    db: store.Pool, migrated: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, on the real app: what FastWebhooks answers itself (with what the layers it
    skips would have added), and what it leaves to the middleware stack behind it."""
    settings = make_settings(migrated, redis_url, MIRROR_CORS_ORIGINS="https://app.example")
    app = create_app(settings)
    routed: list[str] = []
    made: list[str] = []

    def count(status: int) -> float:
        labels = {"method": "POST", "route": "/webhooks/hatched", "status": str(status)}
        return REGISTRY.get_sample_value("hatched_mirror_http_requests_total", labels) or 0.0

    async def through(
        *extra: tuple[bytes, bytes],
        method: str = "POST",
        query: bytes = b"",
        root_path: str = "",
        signed: bool = True,
    ) -> tuple[str, int, dict[bytes, bytes], dict[str, Any]]:
        routed.clear()
        sent: list[Message] = []
        # A buddy of its own each time: the same body signed in the same second is a replay.
        buddy_id = f"buddy_f{len(made)}"
        made.append(buddy_id)
        headers, body = build_delivery("coins.earned", "v2", secret=SECRET, buddy_id=buddy_id)
        if not signed:
            headers = {k: v for k, v in headers.items() if "signature" not in k.lower()}

        async def stack(scope: Any, receive: Any, send: Any) -> None:
            routed.append(scope["path"])
            await app(scope, receive, send)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": method,
            "path": "/webhooks/hatched",
            "root_path": root_path,
            "query_string": query,
            "headers": [
                (b"host", b"mirror"),
                (b"content-type", b"application/json"),
                *((k.lower().encode(), v.encode()) for k, v in headers.items()),
                *extra,
            ],
            "app": app,
        }
        before = count(202)
        await FastWebhooks(stack, unexpected=unexpected_error, cors=True)(scope, receive, send)
        start, answer = sent[0], sent[-1]
        got = json.loads(answer["body"]) if answer.get("body") else {}
        if start["status"] == 202 and not routed:
            assert count(202) == before + 1  # counted as the HTTP metrics layer counts it
        return ("stack" if routed else "fast"), start["status"], dict(start["headers"]), got

    async with app.router.lifespan_context(app):
        where, status, headers, got = await through((b"x-request-id", b"req-fast"))
        assert (where, status, got["status"]) == ("fast", 202, "accepted")
        assert headers[b"x-request-id"] == b"req-fast"
        where, status, headers, got = await through(signed=False)
        assert (where, status, got["code"]) == ("fast", 401, "missing_signature")
        assert len(headers[b"x-request-id"]) == 32  # one made for it
        twice = (V2_SIGNATURE.encode(), b"v1,AAAA")
        where, status, _, got = await through(twice)
        assert (where, status, got.get("code")) == ("fast", 400, "ambiguous_header")

        # A bug in the handler is the app's 500 problem, with the request id, not a crash.
        def broken(request: Any) -> Any:
            raise RuntimeError("a bug")

        monkeypatch.setattr(receiver, "receive", broken)
        where, status, headers, got = await through()
        assert (where, status, got["code"]) == ("fast", 500, "internal_error")
        assert b"x-request-id" in headers
        monkeypatch.undo()

        # Whatever the stack may answer otherwise goes on to it.
        assert (await through(method="GET"))[:2] == ("stack", 405)
        assert (await through(query=b"x=1"))[:2] == ("stack", 202)
        assert (await through((b"authorization", f"Bearer {API_TOKEN}".encode())))[:2] == (
            "stack",
            202,
        )
        where, status, headers, _ = await through((b"origin", b"https://app.example"))
        assert (where, status) == ("stack", 202)
        assert headers[b"access-control-allow-origin"] == b"https://app.example"
        assert (await through(root_path="/mirror"))[0] == "stack"
