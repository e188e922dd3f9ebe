"""The REST client against the fake Hatched over real HTTP, with the rate budget in real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from service.dev.samples import build_delivery
from service.hatched.client import HatchedAPI
from service.hatched.errors import BudgetExhausted, HatchedAPIError, HatchedUnavailable, RateLimited
from service.hatched.ratelimit import RedisTokenBucket
from tests.support.fake_hatched import FakeHatched, buddy_json
from tests.support.running import wait_until

GET_BUDDY = "GET /buddies/{buddy_id}"


@pytest.fixture
def base_url(fake: FakeHatched, fake_url: str) -> str:
    """The shared fake Hatched, holding one buddy and hatching quickly."""
    fake.hatch_delay_s = 0.1
    fake.set_buddy(buddy_json("buddy_1", "user_a", coins=10, tokens={"gem": 2}))
    return fake_url


def client(base_url: str, key: str, **options: Any) -> HatchedAPI:
    options.setdefault("backoff_s", 0.02)
    options.setdefault("backoff_max_s", 0.1)
    return HatchedAPI(base_url, key, **options)


@contextlib.asynccontextmanager
async def process(
    redis_url: str, rate_per_min: int, base_url: str, key: str, **options: Any
) -> AsyncIterator[tuple[RedisTokenBucket, HatchedAPI]]:
    """What one worker process holds: its own Redis connection, bucket and client."""
    conn = aioredis.Redis.from_url(redis_url)
    bucket = RedisTokenBucket(conn, rate_per_min)
    try:
        async with client(base_url, key, bucket=bucket, **options) as api:
            yield bucket, api
    finally:
        await conn.aclose()


# --- reads ----------------------------------------------------------------------------------


async def test_get_buddy_bare_or_wrapped_and_fresh(fake: FakeHatched, base_url: str) -> None:
    async with client(base_url, fake.api_key) as api:
        buddy = await api.get_buddy("buddy_1")
        assert buddy is not None
        assert (buddy.user_id, buddy.coins, buddy.tokens) == ("user_a", 10, {"gem": 2})
        assert buddy.raw == fake.buddies["buddy_1"]

        fake.bump_coins("buddy_1", 5)
        fake.award_badge("buddy_1", "badge_first", "2026-04-22T10:30:00Z")
        fake.wrap_data = False
        buddy = await api.get_buddy("buddy_1")
        assert buddy is not None and buddy.coins == 15
        assert buddy.badges == {
            "badge_first": {"status": "awarded", "awarded_at": "2026-04-22T10:30:00Z"}
        }

        assert await api.get_buddy("buddy_missing") is None
    assert fake.calls[GET_BUDDY] == 3


async def test_list_filters_and_pagination(fake: FakeHatched, base_url: str) -> None:
    for i in range(7):
        status = "archived" if i == 3 else "active"
        fake.set_buddy(buddy_json(f"buddy_a{i}", "user_a", status=status))
    for i in range(3):
        fake.set_buddy(buddy_json(f"buddy_b{i}", "user_b"))

    async with client(base_url, fake.api_key) as api:
        page, cursor = await api.list_buddies(user_id="user_a", limit=2)
        assert [b.buddy_id for b in page] == ["buddy_1", "buddy_a0"] and cursor is not None

        pages = [p async for p in api.iter_pages(user_id="user_a", limit=2)]
        ids = [b.buddy_id for page, _ in pages for b in page]
        assert ids == ["buddy_1"] + [f"buddy_a{i}" for i in (0, 1, 2, 4, 5, 6)]
        assert [c is None for _, c in pages] == [False, False, False, True]

        # Resuming from a page's cursor continues right after it (resumable --all).
        rest, _ = await api.list_buddies(user_id="user_a", cursor=pages[1][1], limit=10)
        assert [b.buddy_id for b in rest] == ["buddy_a4", "buddy_a5", "buddy_a6"]

        everything = [b async for page, _ in api.iter_pages(status=None, limit=4) for b in page]
        assert len(everything) == 11
        assert {b.status for b in everything} == {"active", "archived"}

        active = [b async for page, _ in api.iter_pages(limit=100) for b in page]
        assert len(active) == 10


# --- errors and retries ---------------------------------------------------------------------


async def test_wrong_key_is_401_and_not_retried(fake: FakeHatched, base_url: str) -> None:
    async with client(base_url, "hk_wrong") as api:
        with pytest.raises(HatchedAPIError) as caught:
            await api.get_buddy("buddy_1")
    err = caught.value
    assert (err.status, err.code) == (401, "unauthorized")
    assert err.request_id is not None and err.request_id.startswith("req_")
    assert fake.calls[GET_BUDDY] == 1


async def test_500_twice_then_success(fake: FakeHatched, base_url: str) -> None:
    fake.fail_next(2, 500)
    async with client(base_url, fake.api_key) as api:
        assert await api.get_buddy("buddy_1") is not None
    assert fake.calls[GET_BUDDY] == 3
    assert fake.statuses(GET_BUDDY) == {500: 2, 200: 1}


async def test_non_json_502_then_success(fake: FakeHatched, base_url: str) -> None:
    fake.fail_next(1, 502, body="<html><h1>502 Bad Gateway</h1></html>")
    async with client(base_url, fake.api_key) as api:
        assert await api.get_buddy("buddy_1") is not None
    assert fake.statuses(GET_BUDDY) == {502: 1, 200: 1}


async def test_persistent_5xx_gives_up(fake: FakeHatched, base_url: str) -> None:
    fake.fail_next(10, 503, code="maintenance")
    async with client(base_url, fake.api_key) as api:
        with pytest.raises(HatchedAPIError) as caught:
            await api.get_buddy("buddy_1")
    assert (caught.value.status, caught.value.code) == (503, "maintenance")
    assert fake.calls[GET_BUDDY] == 4


async def test_timeout_is_an_error_after_retries(fake: FakeHatched, base_url: str) -> None:
    fake.delay_s = 0.5
    started = time.monotonic()
    async with client(base_url, fake.api_key, timeout=0.1) as api:
        with pytest.raises(HatchedUnavailable) as caught:
            await api.get_buddy("buddy_1")
    elapsed = time.monotonic() - started
    assert caught.value.code == "timeout"
    assert elapsed < 2.0
    assert fake.calls[GET_BUDDY] == 4
    fake.delay_s = 0


async def test_429_honours_retry_after_and_blocks_the_fleet(
    fake: FakeHatched, base_url: str, redis: aioredis.Redis, redis_url: str
) -> None:
    fake.fail_next(1, 429, retry_after=1)
    async with (
        process(redis_url, 6000, base_url, fake.api_key) as (bucket, first),
        process(redis_url, 6000, base_url, fake.api_key) as (_, second),
    ):
        started = time.monotonic()
        refresh = asyncio.create_task(first.get_buddy("buddy_1"))

        async def refused() -> bool:
            return bool(fake.statuses()[429])

        await wait_until(refused, within=5, interval=0.005)
        refused_at = time.monotonic()
        await asyncio.sleep(0.05)  # let the client record the penalty
        blocked_s, _ = await bucket.peek()
        assert 0.5 < blocked_s <= 1.0

        # Another process starting now waits out the same penalty before calling Hatched.
        other = await second.get_buddy("buddy_1")
        assert other is not None
        assert time.monotonic() - refused_at >= 0.85
        assert await refresh is not None
        assert 0.9 <= time.monotonic() - started < 3.0

    assert fake.statuses(GET_BUDDY) == {429: 1, 200: 2}
    served = [r.at for r in fake.log if r.status == 200]
    assert min(served) - refused_at >= 0.85


async def test_retry_after_beyond_the_cap_is_raised(fake: FakeHatched, base_url: str) -> None:
    fake.fail_next(1, 429, retry_after=120)
    async with client(base_url, fake.api_key, max_retry_after_s=30) as api:
        with pytest.raises(RateLimited) as caught:
            await api.get_buddy("buddy_1")
    assert caught.value.retry_after_s == 120 and fake.calls[GET_BUDDY] == 1


async def test_the_fakes_own_rate_limit_is_survived(fake: FakeHatched, base_url: str) -> None:
    # One call per 2 s window and three calls: however the calls fall across the fixed windows,
    # two of them share one, so the fake must answer at least one 429 that the client survives.
    fake.rate_limit_per_min, fake.rate_window_s = 1, 2.0
    async with client(base_url, fake.api_key) as api:
        for _ in range(3):
            assert await api.get_buddy("buddy_1") is not None
    statuses = fake.statuses(GET_BUDDY)
    assert statuses[200] == 3 and statuses[429] >= 1


# --- the shared budget ----------------------------------------------------------------------


async def test_two_processes_share_one_budget(
    fake: FakeHatched, base_url: str, redis: aioredis.Redis, redis_url: str
) -> None:
    async def hammer(api: HatchedAPI) -> None:
        while True:
            await api.get_buddy("buddy_1")

    async with (
        process(redis_url, 60, base_url, fake.api_key) as (bucket, first),
        process(redis_url, 60, base_url, fake.api_key) as (_, second),
    ):
        started = time.monotonic()
        tasks = [asyncio.create_task(hammer(api)) for api in (first, second) for _ in range(3)]
        await asyncio.sleep(3.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    in_window = [r for r in fake.log if r.at - started <= 3.0]
    # 60/min: a 10-token bucket (2 held back for priority) plus 1 token a second. Whatever the
    # number of processes, 3 s allow at most capacity + 3 refills.
    assert bucket.capacity == 10
    print(f"calls in 3 s: {len(in_window)}")
    assert 8 <= len(in_window) <= bucket.capacity + 3 + 1
    assert fake.calls[GET_BUDDY] <= bucket.capacity + 3 + 1


async def test_priority_uses_the_reserve(
    fake: FakeHatched, base_url: str, redis: aioredis.Redis, redis_url: str
) -> None:
    async with (
        process(redis_url, 60, base_url, fake.api_key, budget_wait_s=0) as (bucket, api),
    ):
        for _ in range(8):
            assert await api.get_buddy("buddy_1") is not None
        with pytest.raises(BudgetExhausted):
            await api.get_buddy("buddy_1")
        # The 2 reserved tokens are there for buddies with a detected inconsistency.
        assert await api.get_buddy("buddy_1", priority=True) is not None
        assert await api.get_buddy("buddy_1", priority=True) is not None
        with pytest.raises(BudgetExhausted):
            await api.get_buddy("buddy_1", priority=True)
        _, tokens = await bucket.peek()
        assert tokens < 1
    assert fake.calls[GET_BUDDY] == 10


async def test_a_waiting_normal_caller_yields_to_priority(
    fake: FakeHatched, base_url: str, redis: aioredis.Redis, redis_url: str
) -> None:
    async with process(redis_url, 60, base_url, fake.api_key) as (bucket, api):
        while await bucket.acquire(max_wait_s=0):
            pass
        # The normal caller now waits ~1 s for the bucket to climb back above the reserve,
        # while a priority caller goes straight through.
        normal = asyncio.create_task(api.get_buddy("buddy_1"))
        started = time.monotonic()
        assert await api.get_buddy("buddy_1", priority=True) is not None
        assert time.monotonic() - started < 0.5
        assert not normal.done()
        assert await normal is not None
        assert time.monotonic() - started >= 0.5


# --- first-user bootstrap -------------------------------------------------------------------


async def test_bootstrap_flow(fake: FakeHatched, base_url: str) -> None:
    async with client(base_url, fake.api_key) as api:
        egg = await api.ensure_egg("user_new", "kids")
        assert egg["status"] == "incubating" and egg["buddy_id"] is None
        assert (await api.ensure_egg("user_new", "kids"))["egg_id"] == egg["egg_id"]
        assert (await api.mark_egg_ready(egg["egg_id"]))["status"] == "ready"

        op = await api.hatch_egg(egg["egg_id"])
        assert op["status"] == "pending"
        # Hatching twice returns the same operation rather than a second buddy.
        assert (await api.hatch_egg(egg["egg_id"]))["operation_id"] == op["operation_id"]
        for _ in range(100):
            done = await api.get_operation(op["operation_id"])
            if done["status"] == "completed":
                break
            await asyncio.sleep(0.02)
        buddy_id = done["result"]["buddy_id"]

        again = await api.ensure_egg("user_new", "kids")
        assert (again["egg_id"], again["status"], again["buddy_id"]) == (
            egg["egg_id"],
            "hatched",
            buddy_id,
        )
        buddy = await api.get_buddy(buddy_id)
        assert buddy is not None and (buddy.user_id, buddy.audience) == ("user_new", "kids")
        page, _ = await api.list_buddies(user_id="user_new")
        assert [b.buddy_id for b in page] == [buddy_id]

        session = await api.create_widget_session(buddy_id, "user_new", ["buddy:read"], 900)
        assert set(session) >= {"token", "session_id", "expires_at", "scopes"}
        assert session["scopes"] == ["buddy:read"]
        embed = await api.create_embed_token(buddy_id, "user_new")
        assert set(embed) >= {"token", "expires_at"}

        with pytest.raises(HatchedAPIError) as caught:
            await api.create_embed_token(buddy_id, "someone_else")
        assert (caught.value.status, caught.value.code) == (403, "forbidden")

    [event] = fake.outbox
    assert (event.type, event.buddy_id) == ("buddy.hatched", buddy_id)
    assert event.data["egg_id"] == egg["egg_id"] and event.data["audience"] == "kids"
    _, body = build_delivery(
        event.type,
        "v2",
        secret="s",
        buddy_id=event.buddy_id,
        delivery_id=event.delivery_id,
        data=event.data,
    )
    assert json.loads(body)["user_id"] == "user_new"


async def test_bootstrap_errors(fake: FakeHatched, base_url: str) -> None:
    async with client(base_url, fake.api_key) as api:
        fake.no_published_config = True
        with pytest.raises(HatchedAPIError) as caught:
            await api.ensure_egg("user_x")
        assert (caught.value.status, caught.value.code) == (409, "no_published_config")
        assert caught.value.details["publish_url"] == fake.publish_url
        fake.no_published_config = False

        fake.max_active_eggs = 1
        first = fake.add_egg("user_x", audience="teens")
        with pytest.raises(HatchedAPIError) as caught:
            await api.ensure_egg("user_x", "kids")
        assert caught.value.code == "active_egg_limit"
        assert caught.value.details["active"] == [first["egg_id"]]

        fake.credits = 0
        with pytest.raises(HatchedAPIError) as caught:
            await api.hatch_egg(first["egg_id"])
        assert (caught.value.status, caught.value.code) == (409, "egg_not_ready")
        await api.mark_egg_ready(first["egg_id"])
        with pytest.raises(HatchedAPIError) as caught:
            await api.hatch_egg(first["egg_id"])
        assert (caught.value.status, caught.value.code) == (402, "insufficient_credits")

        # A 5xx on hatch is not retried: the hatch may have happened.
        fake.credits = None
        fake.fail_next(1, 500, route="POST /eggs/{egg_id}/hatch")
        with pytest.raises(HatchedAPIError) as caught:
            await api.hatch_egg(first["egg_id"])
        assert caught.value.status == 500
        assert fake.calls["POST /eggs/{egg_id}/hatch"] == 3

        fake.fail_hatch = True
        op = await api.hatch_egg(first["egg_id"])
        fake.settle()
        failed = await api.get_operation(op["operation_id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "hatch_failed"
    assert fake.outbox == []
