"""Subscriptions: the admin API, and the worker's sender pushing the change feed to a real HTTP
endpoint (signed per Standard Webhooks, at least once, in order per buddy)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from service import store
from service.app import create_app
from service.config import Settings
from service.read.schemas import ProblemOut
from service.store.subscriptions import SUBSCRIPTION_LOCK_SPACE
from service.subscriptions.schemas import (
    SubscriptionCreated,
    SubscriptionOut,
    SubscriptionPage,
)
from tests.support.config import ADMIN_TOKEN, API_TOKEN, make_settings
from tests.support.running import running_worker, serving, wait_until
from tests.support.scenario import learning_day, signed
from tests.support.subscriber import Subscriber

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
READER = {"Authorization": f"Bearer {API_TOKEN}"}

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def feed(db: store.Pool) -> store.Pool:
    await db.execute("TRUNCATE changes, subscriptions CASCADE")
    return db


def fast(settings: Settings, **overrides: Any) -> Settings:
    """Settings whose retries come quickly enough for a test."""
    values = {
        "MIRROR_SUBSCRIPTION_BACKOFF_S": "0.05",
        "MIRROR_SUBSCRIPTION_BACKOFF_MAX_S": "0.3",
        "MIRROR_SUBSCRIPTION_TIMEOUT_S": "2",
        **overrides,
    }
    return make_settings(settings.postgres_dsn, settings.redis_dsn, **values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """`serve` and a `worker` for `settings`; a client of the first."""
    async with (
        serving(create_app(settings)) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as http,
        running_worker(settings),
    ):
        yield http


@pytest.fixture
async def subscriber() -> AsyncIterator[tuple[Subscriber, str]]:
    sink = Subscriber()
    async with serving(sink.app()) as url:
        yield sink, url


async def subscribe(http: httpx.AsyncClient, url: str, sink: Subscriber, **extra: Any) -> str:
    r = await http.post("/v1/subscriptions", json={"url": url, **extra}, headers=ADMIN)
    assert r.status_code == 201, r.text
    created = SubscriptionCreated.model_validate(r.json())
    assert created.status == "active" and created.secret.startswith("whsec_")
    sink.secret = created.secret
    return created.subscription_id


async def post_day(http: httpx.AsyncClient, buddies: int, per_buddy: int, seed: int) -> None:
    """A day of new buddies (ids of their own per seed), as signed deliveries."""
    rng = random.Random(seed)
    events = learning_day(buddies, per_buddy, rng)
    for event in events:
        event["buddy_id"] = f"s{seed}_{event['buddy_id']}"
        if "user_id" in event["data"]:
            event["data"]["user_id"] = f"s{seed}_{event['data']['user_id']}"
    for headers, body in signed(events, "mixed", rng):
        r = await http.post("/webhooks/hatched", content=body, headers=headers)
        assert r.status_code in (200, 202), r.text


async def feed_entries(http: httpx.AsyncClient, **params: Any) -> dict[str, dict[str, Any]]:
    """Every entry of the feed, by change_id, once the writers' transactions have ended."""

    async def complete() -> bool:
        r = await http.get("/v1/changes", params={"limit": 1000, **params}, headers=READER)
        return r.status_code == 200

    await wait_until(complete)
    out: dict[str, dict[str, Any]] = {}
    after: str | None = None
    while True:
        query: dict[str, Any] = {"limit": 1000, **params}
        if after:
            query["after"] = after
        r = await http.get("/v1/changes", params=query, headers=READER)
        page = r.json()
        for e in page["data"]:
            out[e["change_id"]] = e
        if not page["data"]:
            return out
        after = page["next_cursor"]


async def settled(db: store.Pool) -> bool:
    """Nothing left to apply, and no entry held back behind a transaction still running
    (anywhere on the server): the feed read next is the whole feed."""
    waiting = await db.fetchval("SELECT count(*) FROM delivery_states WHERE status = 'accepted'")
    return waiting == 0 and not (await store.feed_bounds(db)).held


async def scraped(http: httpx.AsyncClient, line: str) -> None:
    """Until /metrics shows `line` (its Postgres figures are at most a few seconds old)."""

    async def shown() -> bool:
        return line in (await http.get("/metrics")).text

    await wait_until(shown, within=15, interval=0.5)


async def all_delivered(http: httpx.AsyncClient, db: store.Pool, sink: Subscriber) -> None:
    """Until the endpoint has acknowledged every entry of the feed."""

    async def done() -> bool:
        if not await settled(db):
            return False
        entries = await feed_entries(http)
        return bool(entries) and set(sink.delivered()) >= set(entries)

    await wait_until(done, within=60, interval=0.2)


async def test_admin_api(settings: Settings, feed: store.Pool) -> None:
    settings = fast(settings, MIRROR_SUBSCRIPTIONS_MAX="2")
    async with serving(create_app(settings)) as base, httpx.AsyncClient(base_url=base) as http:
        r = await http.post(
            "/v1/subscriptions",
            json={"url": "http://hooks.internal/changes", "fields": ["coins", "badges"]},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        created = r.json()
        SubscriptionCreated.model_validate(created)
        assert created["fields"] == ["badges", "coins"] and created["description"] is None
        sid = created["subscription_id"]

        r = await http.get(f"/v1/subscriptions/{sid}", headers=ADMIN)
        assert r.status_code == 200
        one = SubscriptionOut.model_validate(r.json())
        assert one.status == "active" and one.lag == 0 and one.last_success_at is None
        assert "secret" not in r.json()  # shown only at creation

        r = await http.get("/v1/subscriptions", headers=ADMIN)
        page = SubscriptionPage.model_validate(r.json())
        assert [s.subscription_id for s in page.data] == [sid]

        # Bounded: MIRROR_SUBSCRIPTIONS_MAX.
        r = await http.post("/v1/subscriptions", json={"url": "https://b.internal/"}, headers=ADMIN)
        assert r.status_code == 201
        r = await http.post("/v1/subscriptions", json={"url": "https://c.internal/"}, headers=ADMIN)
        assert r.status_code == 409 and r.json()["code"] == "too_many_subscriptions"

        for body, name in [
            ({"url": "ftp://hooks.internal/x"}, "url"),
            ({"url": "file:///etc/passwd"}, "url"),
            ({"url": "http://user:pw@hooks.internal/"}, "url"),
            ({"url": "/relative"}, "url"),
            ({"url": "http://h.internal/" + "a" * 3000}, "url"),
            ({"url": "http://h.internal:99999/"}, "url"),
            ({}, "url"),
            ({"url": "http://h.internal/", "fields": ["nope"]}, "fields"),
            ({"url": "http://h.internal/", "fields": []}, "fields"),
            ({"url": "http://h.internal/", "description": 5}, "description"),
        ]:
            r = await http.post("/v1/subscriptions", json=body, headers=ADMIN)
            assert r.status_code == 400, (body, r.text)
            problem = ProblemOut.model_validate(r.json())
            assert problem.code == "invalid_parameter" and name in (problem.detail or ""), body
        r = await http.post("/v1/subscriptions", content=b"[1]", headers=ADMIN)
        assert r.status_code == 400

        # The admin token only: an API token is not one.
        r = await http.get("/v1/subscriptions", headers=READER)
        assert r.status_code == 401
        r = await http.post("/v1/subscriptions", json={"url": "http://x.internal/"})
        assert r.status_code == 401

        r = await http.post(f"/v1/subscriptions/{sid}/enable", headers=ADMIN)
        assert r.status_code == 202 and r.json() == {"subscription_id": sid, "status": "active"}
        r = await http.delete(f"/v1/subscriptions/{sid}", headers=ADMIN)
        assert r.status_code == 204 and r.content == b""
        for method, path in [
            ("GET", f"/v1/subscriptions/{sid}"),
            ("DELETE", f"/v1/subscriptions/{sid}"),
            ("POST", f"/v1/subscriptions/{sid}/enable"),
            ("GET", "/v1/subscriptions/" + "x" * 300),
        ]:
            r = await http.request(method, path, headers=ADMIN)
            assert r.status_code == 404 and r.json()["code"] == "subscription_not_found"


async def test_changes_arrive_signed_once_each_in_order(
    settings: Settings, feed: store.Pool, subscriber: tuple[Subscriber, str]
) -> None:
    sink, hook = subscriber
    settings = fast(settings)
    async with running(settings) as http:
        sid = await subscribe(http, f"{hook}/hook", sink)
        await post_day(http, buddies=6, per_buddy=15, seed=1)
        await all_delivered(http, feed, sink)
        entries = await feed_entries(http)
        # Each body is the feed's entry exactly, under its change_id, verified by the
        # standardwebhooks package (sink.unverified counts refusals).
        assert sink.delivered() == entries
        assert sink.unverified == 0 and not sink.out_of_order and not sink.concurrent
        # Nothing sent twice when nothing failed.
        assert len(sink.requests) == len(entries)

        async def caught_up() -> bool:
            # The endpoint answered; the sender records it right after.
            r = await http.get(f"/v1/subscriptions/{sid}", headers=ADMIN)
            view = SubscriptionOut.model_validate(r.json())
            return view.lag == 0 and view.lag_seconds == 0 and view.last_success_at is not None

        await wait_until(caught_up)
        delivered = REGISTRY.get_sample_value(
            "hatched_subscription_deliveries_total",
            {"subscription_id": sid, "outcome": "delivered"},
        )
        assert delivered == len(entries)

        # The operator's view: lag gauges from /metrics (read from Postgres at scrape time).
        await scraped(http, f'hatched_subscription_lag_entries{{subscription_id="{sid}"}} 0.0')
        await scraped(http, 'hatched_subscriptions{status="active"} 1.0')


async def test_a_failing_endpoint_gets_everything_in_order_once_it_recovers(
    settings: Settings, feed: store.Pool, subscriber: tuple[Subscriber, str]
) -> None:
    sink, hook = subscriber
    sink.answer = 500
    settings = fast(settings)
    async with running(settings) as http:
        sid = await subscribe(http, f"{hook}/hook", sink)
        await post_day(http, buddies=5, per_buddy=12, seed=2)

        async def failing() -> bool:
            r = await http.get(f"/v1/subscriptions/{sid}", headers=ADMIN)
            return bool(r.json()["status"] == "failing" and len(sink.requests) >= 10)

        await wait_until(failing, within=30)
        r = await http.get(f"/v1/subscriptions/{sid}", headers=ADMIN)
        view = SubscriptionOut.model_validate(r.json())
        assert view.last_error == "HTTP 500" and view.lag > 0 and view.failing_since
        # While failing, a buddy's later change is never tried before its first was acked.
        assert not sink.delivered()
        tried = {(r.change["buddy_id"], r.change["version"]) for r in sink.requests}
        firsts = {b: min(v for bb, v in tried if bb == b) for b, _ in tried}
        assert all(v == firsts[b] for b, v in tried)

        sink.answer = 200
        await all_delivered(http, feed, sink)
        assert sink.delivered() == await feed_entries(http)
        assert not sink.out_of_order and not sink.concurrent
        r = await http.get(f"/v1/subscriptions/{sid}", headers=ADMIN)
        assert r.json()["status"] == "active" and r.json()["failing_since"] is None


async def test_an_endpoint_killed_and_restarted_misses_nothing(
    settings: Settings, feed: store.Pool
) -> None:
    sink = Subscriber()
    port = free_port()
    settings = fast(settings)
    async with running(settings) as http:
        async with serving(sink.app(), port=port) as hook:
            await subscribe(http, f"{hook}/hook", sink)
            await post_day(http, buddies=3, per_buddy=5, seed=3)
            await all_delivered(http, feed, sink)
        # The endpoint is gone (connection refused) while more changes come.
        before = len(sink.delivered())
        await post_day(http, buddies=6, per_buddy=8, seed=4)
        await asyncio.sleep(1.0)
        assert len(sink.delivered()) == before
        async with serving(sink.app(), port=port):
            await all_delivered(http, feed, sink)
        assert sink.delivered() == await feed_entries(http)
        assert not sink.out_of_order


async def test_two_workers_never_send_a_change_twice_at_once(
    settings: Settings, feed: store.Pool, subscriber: tuple[Subscriber, str]
) -> None:
    """Both workers run a sender; the first owns the subscription. It stops mid-way, with
    sends in flight: the second takes over and sends what was not acknowledged, never
    concurrently with the first, and the endpoint gets every change."""
    sink, hook = subscriber
    sink.delay_s = 0.02
    settings = fast(settings)
    async with (
        serving(create_app(settings)) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as http,
    ):
        async with contextlib.AsyncExitStack() as first:
            await first.enter_async_context(running_worker(settings))
            await subscribe(http, f"{hook}/hook", sink)
            await wait_until(lambda: owner_count(feed, 1))
            owner = await owner_pid(feed)
            async with running_worker(settings):
                await post_day(http, buddies=8, per_buddy=10, seed=5)
                await wait_until(lambda: _some(sink, http), within=30)
                await first.aclose()  # the owner stops, sends in flight
                await wait_until(lambda: owner_count(feed, 1))
                assert await owner_pid(feed) != owner
                await post_day(http, buddies=8, per_buddy=10, seed=6)
                await all_delivered(http, feed, sink)
        assert not sink.concurrent, sink.concurrent
        assert set(sink.delivered()) == set(await feed_entries(http))
        assert not sink.out_of_order


# Owning a subscription is holding its advisory lock (service/store/subscriptions.py).
OWNERS = f"""
SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND classid = {SUBSCRIPTION_LOCK_SPACE} AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


async def owner_count(db: store.Pool, n: int) -> bool:
    return len(await db.fetch(OWNERS)) == n


async def owner_pid(db: store.Pool) -> int:
    pid: int = await db.fetchval(OWNERS)
    return pid


async def _some(sink: Subscriber, http: httpx.AsyncClient) -> bool:
    """Some of the feed sent, about half of what is in it now. Not a fixed count: how many
    changes a day makes depends on how many deliveries each applied batch takes (a buddy's
    deliveries in one batch are one change), so it varies with timing."""
    entries = await feed_entries(http)
    return bool(entries) and len(sink.requests) >= max(1, len(entries) // 2)


async def test_disabled_after_failing_long_enough_then_enabled_resumes(
    settings: Settings, feed: store.Pool, subscriber: tuple[Subscriber, str]
) -> None:
    sink, hook = subscriber
    sink.answer = 503
    settings = fast(settings, MIRROR_SUBSCRIPTION_DISABLE_AFTER_S="1.0")
    async with running(settings) as http:
        sid = await subscribe(http, f"{hook}/hook", sink)
        await post_day(http, buddies=3, per_buddy=6, seed=7)

        async def disabled() -> bool:
            r = await http.get(f"/v1/subscriptions/{sid}", headers=ADMIN)
            return bool(r.json()["status"] == "disabled")

        await wait_until(disabled, within=30)
        await scraped(http, 'hatched_subscriptions{status="disabled"} 1.0')
        # Disabled: nothing more is tried, and the place in the feed is kept.
        await asyncio.sleep(0.5)
        tried = len(sink.requests)
        await asyncio.sleep(1.0)
        assert len(sink.requests) == tried
        await wait_until(lambda: settled(feed))
        r = await http.get(f"/v1/subscriptions/{sid}", headers=ADMIN)
        assert r.json()["lag"] == len(await feed_entries(http))
        assert r.json()["last_error"] == "HTTP 503"

        sink.answer = 200
        r = await http.post(f"/v1/subscriptions/{sid}/enable", headers=ADMIN)
        assert r.status_code == 202
        await all_delivered(http, feed, sink)
        assert sink.delivered() == await feed_entries(http)
        assert not sink.out_of_order


async def test_redirects_are_not_followed(
    settings: Settings, feed: store.Pool, subscriber: tuple[Subscriber, str]
) -> None:
    sink, hook = subscriber
    sink.answer = 307
    sink.location = f"{hook}/elsewhere"
    settings = fast(settings)
    async with running(settings) as http:
        sid = await subscribe(http, f"{hook}/hook", sink)
        await post_day(http, buddies=1, per_buddy=2, seed=8)

        async def refused() -> bool:
            r = await http.get(f"/v1/subscriptions/{sid}", headers=ADMIN)
            return bool(r.json()["last_error"])

        await wait_until(refused, within=30)
        r = await http.get(f"/v1/subscriptions/{sid}", headers=ADMIN)
        assert r.json()["last_error"] == "HTTP 307 (redirects are not followed)"
        assert sink.redirected_to == 0 and not sink.delivered()


async def test_fields_filter_and_erasure(
    settings: Settings, feed: store.Pool, subscriber: tuple[Subscriber, str]
) -> None:
    sink, hook = subscriber
    settings = fast(settings)
    async with running(settings) as http:
        await subscribe(http, f"{hook}/hook", sink, fields=["badges"])
        await post_day(http, buddies=4, per_buddy=15, seed=9)
        await wait_until(lambda: settled(feed))
        badges = await feed_entries(http, field="badges")
        assert badges

        async def got_them() -> bool:
            return await settled(feed) and set(sink.delivered()) >= set(
                await feed_entries(http, field="badges")
            )

        await wait_until(got_them, within=60)
        assert all("badges" in c["changed"] for c in sink.delivered().values())
        assert set(sink.delivered()) == set(await feed_entries(http, field="badges"))

        # An erased user's pending entries leave every outbox with the feed's.
        sink.answer = 500
        await post_day(http, buddies=4, per_buddy=15, seed=10)

        async def queued() -> bool:
            return bool(await feed.fetchval("SELECT count(*) FROM subscription_outbox"))

        await wait_until(queued, within=30)
        users = [r["user_id"] for r in await feed.fetch("SELECT DISTINCT user_id FROM buddies")]
        for user in users:
            r = await http.delete(f"/v1/users/{user}", headers=ADMIN)
            assert r.status_code == 200, r.text
        assert await feed.fetchval("SELECT count(*) FROM subscription_outbox") == 0
