"""The read, admin and operations routes of the contract, against real Postgres and Redis."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from service import store
from service.app import create_app
from service.config import Settings
from service.dev.samples import build_delivery
from service.read.schemas import (
    BuddyOut,
    BuddyPage,
    DeliveryPage,
    EventPage,
    LedgerPage,
    ProblemOut,
)
from tests.support.config import ADMIN_TOKEN, API_TOKEN, SECRET, make_settings
from tests.support.running import app_client, running_worker, serving, wait_settled

READ = {"Authorization": f"Bearer {API_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def post(http: httpx.AsyncClient, event_type: str, buddy_id: str, **kw: Any) -> str:
    headers, body = build_delivery(event_type, "v2", secret=SECRET, buddy_id=buddy_id, **kw)
    response = await http.post("/webhooks/hatched", content=body, headers=headers)
    assert response.status_code == 202, response.text
    delivery_id: str = response.json()["delivery_id"]
    return delivery_id


@pytest.fixture
async def seeded(settings: Settings, http: httpx.AsyncClient, db: store.Pool) -> list[str]:
    """Five buddies of two users; buddy_2 has a coin history."""
    async with running_worker(settings):
        for i in range(5):
            user = "user_a" if i < 3 else "user_b"
            await post(
                http,
                "buddy.hatched",
                f"buddy_{i}",
                data={"user_id": user, "occurred_at": f"2026-05-0{i + 1}T00:00:00Z"},
            )
        for n in range(1, 6):
            await post(
                http,
                "coins.earned",
                "buddy_2",
                data={"amount": 10, "balance": 10 * n, "occurred_at": f"2026-06-01T00:00:0{n}Z"},
            )
        await post(
            http,
            "token.earned",
            "buddy_2",
            data={
                "token_type": "gem",
                "amount": 1,
                "balance": 1,
                "occurred_at": "2026-06-02T00:00:00Z",
            },
        )
        await wait_settled(db)
    return [f"buddy_{i}" for i in range(5)]


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = ProblemOut.model_validate(response.json())
    assert body.code == code
    return response.json()  # type: ignore[no-any-return]


async def test_get_buddy_with_etag_and_304(http: httpx.AsyncClient, seeded: list[str]) -> None:
    response = await http.get("/v1/buddies/buddy_2", headers=READ)
    assert response.status_code == 200
    buddy = BuddyOut.model_validate(response.json())
    assert (buddy.coins, buddy.tokens, buddy.user_id) == (50, {"gem": 1}, "user_a")
    tag = response.headers["etag"]
    again = await http.get("/v1/buddies/buddy_2", headers={**READ, "If-None-Match": tag})
    assert again.status_code == 304 and again.content == b""
    stale = await http.get("/v1/buddies/buddy_2", headers={**READ, "If-None-Match": '"x.1"'})
    assert stale.status_code == 200


async def test_unknown_buddy_is_404(http: httpx.AsyncClient, db: store.Pool) -> None:
    problem(await http.get("/v1/buddies/nobody", headers=READ), 404, "buddy_not_found")
    for sub in ("ledger", "events"):
        problem(await http.get(f"/v1/buddies/nobody/{sub}", headers=READ), 404, "buddy_not_found")


async def test_list_buddies_pages_by_cursor(http: httpx.AsyncClient, seeded: list[str]) -> None:
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = BuddyPage.model_validate(
            (await http.get("/v1/buddies", params=params, headers=READ)).json()
        )
        seen += [b.buddy_id for b in page.data]
        assert len(page.data) <= 2
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == sorted(seeded)
    users = BuddyPage.model_validate(
        (await http.get("/v1/buddies", params={"user_id": "user_b"}, headers=READ)).json()
    )
    assert [b.buddy_id for b in users.data] == ["buddy_3", "buddy_4"]
    assert users.next_cursor is None


@pytest.mark.parametrize(
    ("path", "params", "code", "named"),
    [
        ("/v1/buddies", {"limit": "0"}, "invalid_parameter", "limit"),
        ("/v1/buddies", {"limit": "201"}, "invalid_parameter", "limit"),
        ("/v1/buddies", {"limit": "ten"}, "invalid_parameter", "limit"),
        ("/v1/buddies", {"cursor": "not-a-cursor"}, "invalid_cursor", "cursor"),
        ("/v1/buddies", {"user_id": ""}, "invalid_parameter", "user_id"),
        ("/v1/buddies/buddy_2/ledger", {"cursor": "WzFd"}, "invalid_cursor", "cursor"),
        ("/v1/buddies/buddy_2/events", {"limit": "-1"}, "invalid_parameter", "limit"),
        ("/v1/users/user_a/buddy", {"audience": ""}, "invalid_parameter", "audience"),
        ("/v1/users/user_a/buddy", {"audience": "kids\x00"}, "invalid_parameter", "audience"),
    ],
)
async def test_bad_parameters_are_400_naming_the_parameter(
    http: httpx.AsyncClient,
    seeded: list[str],
    path: str,
    params: dict[str, str],
    code: str,
    named: str,
) -> None:
    body = problem(await http.get(path, params=params, headers=READ), 400, code)
    assert named in body["detail"]


@pytest.mark.parametrize("path", ["/v1/buddies/a%00b", "/v1/users/a%00b/buddy"])
async def test_a_nul_in_a_path_is_400(http: httpx.AsyncClient, path: str) -> None:
    problem(await http.get(path, headers=READ), 400, "invalid_parameter")


async def test_user_buddy_is_the_most_recently_hatched(
    http: httpx.AsyncClient, seeded: list[str]
) -> None:
    response = await http.get("/v1/users/user_a/buddy", headers=READ)
    assert response.status_code == 200
    assert response.json()["buddy_id"] == "buddy_2"
    problem(await http.get("/v1/users/user_z/buddy", headers=READ), 404, "buddy_not_found")
    none_for_audience = await http.get(
        "/v1/users/user_a/buddy", params={"audience": "kids"}, headers=READ
    )
    problem(none_for_audience, 404, "buddy_not_found")


async def test_ledger_newest_first_by_currency_and_pages(
    http: httpx.AsyncClient, seeded: list[str]
) -> None:
    all_ = LedgerPage.model_validate(
        (await http.get("/v1/buddies/buddy_2/ledger", headers=READ)).json()
    )
    assert [e.currency for e in all_.data] == ["gem"] + ["coins"] * 5
    coins = LedgerPage.model_validate(
        (
            await http.get(
                "/v1/buddies/buddy_2/ledger",
                params={"currency": "coins", "limit": "3"},
                headers=READ,
            )
        ).json()
    )
    assert [e.balance_after for e in coins.data] == [50, 40, 30]
    assert coins.next_cursor is not None
    rest = LedgerPage.model_validate(
        (
            await http.get(
                "/v1/buddies/buddy_2/ledger",
                params={"currency": "coins", "cursor": coins.next_cursor},
                headers=READ,
            )
        ).json()
    )
    assert [e.balance_after for e in rest.data] == [20, 10]
    assert rest.next_cursor is None
    assert all(e.amount == 10 for e in coins.data + rest.data)


async def test_events_newest_first(http: httpx.AsyncClient, seeded: list[str]) -> None:
    page = EventPage.model_validate(
        (await http.get("/v1/buddies/buddy_2/events", params={"limit": "4"}, headers=READ)).json()
    )
    assert [e.type for e in page.data] == ["token.earned"] + ["coins.earned"] * 3
    assert page.next_cursor is not None
    rest = EventPage.model_validate(
        (
            await http.get(
                "/v1/buddies/buddy_2/events", params={"cursor": page.next_cursor}, headers=READ
            )
        ).json()
    )
    assert [e.type for e in rest.data] == ["coins.earned"] * 2 + ["buddy.hatched"]


async def test_admin_lists_deliveries_and_replays_one(
    settings: Settings, http: httpx.AsyncClient, seeded: list[str], db: store.Pool
) -> None:
    problem(await http.get("/v1/deliveries", headers=READ), 401, "unauthorized")
    page = DeliveryPage.model_validate(
        (await http.get("/v1/deliveries", params={"buddy_id": "buddy_2"}, headers=ADMIN)).json()
    )
    assert len(page.data) == 7 and {d.status for d in page.data} == {"applied"}
    dead_body = b"nope"
    from service.ingest.signatures import signature_headers

    headers = {
        "X-Hatched-Delivery": "dead-1",
        "X-Hatched-Event": "coins.earned",
        **signature_headers(dead_body, SECRET, int(__import__("time").time()), "v2"),
    }
    await http.post("/webhooks/hatched", content=dead_body, headers=headers)
    dead = DeliveryPage.model_validate(
        (await http.get("/v1/deliveries", params={"status": "dead"}, headers=ADMIN)).json()
    )
    assert [(d.delivery_id, d.reason) for d in dead.data] == [("dead-1", "body_not_json")]
    problem(
        await http.get("/v1/deliveries", params={"status": "lost"}, headers=ADMIN),
        400,
        "invalid_parameter",
    )

    target = page.data[0].delivery_id
    async with running_worker(settings):
        replay = await http.post(f"/v1/deliveries/{target}/replay", headers=ADMIN)
        assert replay.status_code == 202
        assert replay.json() == {"status": "queued", "delivery_id": target}
        await wait_settled(db)
    row = await db.fetchrow("SELECT status, attempts FROM inbox WHERE delivery_id=$1", target)
    assert row is not None and (row["status"], row["attempts"]) == ("applied", 1)
    assert await db.fetchval("SELECT count(*) FROM ledger WHERE buddy_id = 'buddy_2'") == 6
    problem(await http.post("/v1/deliveries/nope/replay", headers=ADMIN), 404, "delivery_not_found")


async def test_refresh_without_hatched_api_is_409(http: httpx.AsyncClient, db: store.Pool) -> None:
    problem(
        await http.post("/v1/buddies/buddy_1/refresh", headers=ADMIN),
        409,
        "hatched_api_not_configured",
    )


async def test_admin_routes_are_absent_without_admin_tokens(
    migrated: str, redis_url: str, db: store.Pool
) -> None:
    settings = make_settings(migrated, redis_url, MIRROR_ADMIN_TOKENS="")
    async with app_client(settings) as http:
        problem(await http.get("/v1/deliveries", headers=ADMIN), 404, "not_found")
        spec = (await http.get("/openapi.json")).json()
        assert "/v1/deliveries" not in spec["paths"]


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


async def test_every_v1_route_requires_a_token(
    settings: Settings, http: httpx.AsyncClient, db: store.Pool
) -> None:
    app = create_app(settings)
    v1 = [r for r in app.routes if isinstance(r, Route) and r.path.startswith("/v1")]
    assert len(v1) >= 9
    for route in v1:
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
                response = await http.request(method, _concrete(route.path), headers=headers)
                problem(response, 401, "unauthorized")
            if route.path.startswith(("/v1/deliveries", "/v1/buddies/{buddy_id}/refresh")) or (
                method == "DELETE"
            ):
                # A read token is not an admin token.
                response = await http.request(method, _concrete(route.path), headers=READ)
                problem(response, 401, "unauthorized")


async def test_stream_sends_the_buddy_then_each_change_within_a_second(
    settings: Settings, http: httpx.AsyncClient, db: store.Pool
) -> None:
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def listen() -> None:
        async with http.stream("GET", "/v1/buddies/buddy_live/stream", headers=READ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    await received.put(json.loads(line[5:]))

    async with running_worker(settings):
        listener = asyncio.create_task(listen())
        await asyncio.sleep(0.3)
        await post(http, "buddy.hatched", "buddy_live")
        first = await asyncio.wait_for(received.get(), 5)
        assert first["buddy_id"] == "buddy_live" and first["version"] == 1
        await post(http, "coins.earned", "buddy_live", data={"amount": 5, "balance": 5})
        loop = asyncio.get_running_loop()
        started = loop.time()
        second = await asyncio.wait_for(received.get(), 5)
        assert loop.time() - started < 1.0
        assert second["coins"] == 5 and second["version"] == 2
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)


async def test_stream_clients_are_bounded(migrated: str, redis_url: str, db: store.Pool) -> None:
    settings = make_settings(migrated, redis_url, MIRROR_STREAM_MAX_CLIENTS="1")
    async with (
        serving(create_app(settings)) as url,
        httpx.AsyncClient(base_url=url) as http,
        http.stream("GET", "/v1/buddies/b/stream", headers=READ) as first,
    ):
        assert first.status_code == 200
        await asyncio.sleep(0.2)
        problem(await http.get("/v1/buddies/b/stream", headers=READ), 503, "too_many_streams")


async def test_cors_preflight(migrated: str, redis_url: str, db: store.Pool) -> None:
    settings = make_settings(migrated, redis_url, MIRROR_CORS_ORIGINS="https://app.example")
    async with app_client(settings) as http:
        response = await http.options(
            "/v1/buddies/x",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        other = await http.options(
            "/v1/buddies/x",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        )
        assert "access-control-allow-origin" not in other.headers


async def test_metrics_expose_the_pipeline(http: httpx.AsyncClient, seeded: list[str]) -> None:
    text = (await http.get("/metrics")).text
    for name in (
        "hatched_deliveries_total",
        "hatched_inbox_lag_seconds",
        "hatched_inbox_pending",
        "hatched_signature_failures_total",
        "hatched_inbox_dead",
    ):
        assert name in text
    assert re.search(r'hatched_deliveries_total\{outcome="accepted",type="coins.earned"\} \d', text)


async def test_openapi_document_lists_every_route(
    settings: Settings, http: httpx.AsyncClient, db: store.Pool
) -> None:
    spec = (await http.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    app = create_app(settings)
    documented = {(p, m.upper()) for p, ops in spec["paths"].items() for m in ops}
    routed = {
        (r.path, m)
        for r in app.routes
        if isinstance(r, Route) and r.path != "/openapi.json"
        for m in (r.methods or ())
        if m != "HEAD"
    }
    assert routed == documented


async def test_cached_reads_follow_every_change(
    settings: Settings, http: httpx.AsyncClient, db: store.Pool
) -> None:
    async with running_worker(settings):
        await post(http, "buddy.hatched", "buddy_cached")
        await wait_settled(db)
        for balance in (5, 10, 15):
            first = await http.get("/v1/buddies/buddy_cached", headers=READ)
            again = await http.get("/v1/buddies/buddy_cached", headers=READ)  # from the cache
            assert again.content == first.content
            await post(http, "coins.earned", "buddy_cached", data={"amount": 5, "balance": balance})
            await wait_settled(db)
            deadline = asyncio.get_running_loop().time() + 1.0
            while True:
                seen = (await http.get("/v1/buddies/buddy_cached", headers=READ)).json()
                if seen["coins"] == balance:
                    break
                assert asyncio.get_running_loop().time() < deadline, "the cache kept a stale buddy"
                await asyncio.sleep(0.01)
            assert seen["version"] == first.json()["version"] + 1


async def test_cached_reads_answer_exactly_as_the_router_does(
    http: httpx.AsyncClient, seeded: list[str]
) -> None:
    """The first read of a buddy goes through the router and fills the cache; the same read
    again is answered by the fast path in front of it: the two answers must not differ."""

    def answer(r: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
        skip = {"date", "server", "x-request-id"}
        return r.status_code, [h for h in r.headers.multi_items() if h[0] not in skip], r.content

    # A 304 first: the router answers it (and fills the cache), then the fast path.
    conditional = {**READ, "If-None-Match": '"buddy_3.1"'}
    routed = await http.get("/v1/buddies/buddy_3", headers=conditional)
    assert routed.status_code == 304
    assert answer(await http.get("/v1/buddies/buddy_3", headers=conditional)) == answer(routed)
    routed = await http.get("/v1/buddies/buddy_4", headers=READ)
    assert routed.status_code == 200
    assert answer(await http.get("/v1/buddies/buddy_4", headers=READ)) == answer(routed)
    # A cached buddy still needs a token, and gets the router's problem without one.
    problem(await http.get("/v1/buddies/buddy_4"), 401, "unauthorized")
    request_id = await http.get("/v1/buddies/buddy_4", headers={**READ, "X-Request-ID": "r-7"})
    assert request_id.headers["x-request-id"] == "r-7"
