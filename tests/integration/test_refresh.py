"""Self-healing from Hatched's REST API, against a fake Hatched that holds the ground truth."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import httpx
import pytest
from arq.connections import create_pool

from service import store
from service.apply.context import WorkerContext
from service.apply.projector import public_view
from service.apply.worker import reconcile
from service.config import Settings
from service.dev.samples import build_delivery
from service.hatched import refresh
from service.hatched.client import HatchedAPI
from service.hatched.ratelimit import RedisTokenBucket
from service.hatched.remote import RemoteBuddy
from service.ingest.wakeups import redis_settings
from tests.support.config import ADMIN_TOKEN, SECRET, make_settings
from tests.support.fake_hatched import FakeHatched, buddy_json
from tests.support.harness import service_env
from tests.support.running import running_worker, service_running, wait_settled

GET_BUDDY = "GET /buddies/{buddy_id}"
LIST = "GET /buddies"
COMPARED = (
    "coins",
    "tokens",
    "skills",
    "badges",
    "streaks",
    "evolution_stage",
    "image_url",
    "name",
    "user_id",
    "config_version_id",
)


def hatched_settings(migrated: str, redis_url: str, url: str, key: str, **extra: str) -> Settings:
    values = {"MIRROR_REFRESH_SETTLE_S": "0.5", "HATCHED_API_TIMEOUT_S": "0.5", **extra}
    return make_settings(migrated, redis_url, HATCHED_API_URL=url, HATCHED_API_KEY=key, **values)


@pytest.fixture
def with_hatched(
    migrated: str, redis_url: str, db: store.Pool, redis: object, fake: FakeHatched, fake_url: str
) -> Callable[..., Settings]:
    """Settings with the (clean) fake Hatched as REST API, and these extra variables."""

    def settings(**extra: str) -> Settings:
        return hatched_settings(migrated, redis_url, fake_url, fake.api_key, **extra)

    return settings


async def post(url: str, deliveries: list[tuple[dict[str, str], bytes]]) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        return [
            (await http.post("/webhooks/hatched", content=b, headers=h)).status_code
            for h, b in deliveries
        ]


def truth(world: FakeHatched, buddy_id: str) -> dict[str, Any]:
    """The fake's buddy, seen through the mirror's mapping and public shape."""
    from service.apply.projector import project
    from service.ingest.events import Event

    remote = RemoteBuddy.from_json(world.buddies[buddy_id])
    data = {name: getattr(remote, name) for name in RemoteBuddy.__dataclass_fields__}
    event = Event("t", None, refresh.REFRESH_EVENT, buddy_id, _now(), _now(), data)
    view = public_view(project(None, buddy_id, [(1, event)]).buddy, 1, _now())
    return {k: view[k] for k in COMPARED}


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


async def mirrored_view(pool: store.Pool, buddy_id: str) -> dict[str, Any]:
    found = await store.get_buddy(pool, buddy_id)
    assert found is not None
    view = public_view(*found)
    return {k: view[k] for k in COMPARED}


def late_retry_scenario(buddy_id: str) -> tuple[list[tuple[dict[str, str], bytes]], dict[str, Any]]:
    """v2 carries no event time, so a retry signed later looks newer than events it preceded.

    Coins went 10 then 20. The first attempt of the `10` delivery failed; its retry arrives
    signed after the `20` one, and per-field last-writer-wins alone would settle on 10.
    """
    now = int(time.time())
    hatched = build_delivery(
        "buddy.hatched", "v2", secret=SECRET, buddy_id=buddy_id, timestamp=now - 200
    )
    twenty = build_delivery(
        "coins.earned",
        "v2",
        secret=SECRET,
        buddy_id=buddy_id,
        timestamp=now - 100,
        data={"amount": 10, "balance": 20},
    )
    ten_retry = build_delivery(
        "coins.earned",
        "v2",
        secret=SECRET,
        buddy_id=buddy_id,
        timestamp=now,
        data={"amount": 10, "balance": 10},
    )
    world = buddy_json(buddy_id, user_id="user_42", coins=20, name="Pip", egg_id="egg_01HXA7P0ZC1D")
    return [hatched, twenty, ten_retry], world


async def test_without_refresh_a_late_v2_retry_leaves_the_mirror_wrong(
    settings: Settings, server: str, db: store.Pool
) -> None:
    # The control: this is the failure the REST refresh exists to heal.
    deliveries, _ = late_retry_scenario("buddy_late")
    async with running_worker(settings):
        assert await post(server, deliveries) == [202, 202, 202]
        await wait_settled(db)
    found = await store.get_buddy(db, "buddy_late")
    assert found is not None and found[0].coins == 10


async def test_retried_and_reordered_v2_deliveries_converge_with_refresh(
    db: store.Pool,
    fake: FakeHatched,
    with_hatched: Callable[..., Settings],
) -> None:
    world = fake
    settings = with_hatched()
    deliveries, truth_json = late_retry_scenario("buddy_heal")
    world.set_buddy(truth_json)
    async with service_running(settings) as server:
        assert await post(server, deliveries) == [202, 202, 202]
        await wait_settled(db)

        async def healed() -> bool:
            await wait_settled(db)
            found = await store.get_buddy(db, "buddy_heal")
            return found is not None and found[0].refreshed_at is not None

        deadline = time.monotonic() + 15
        while not await healed():
            assert time.monotonic() < deadline, "no refresh arrived"
            await asyncio.sleep(0.1)
        await wait_settled(db)
    assert await mirrored_view(db, "buddy_heal") == truth(world, "buddy_heal")
    assert world.calls[GET_BUDDY] == 1


async def test_a_burst_causes_one_refresh_call_per_buddy(
    db: store.Pool,
    fake: FakeHatched,
    with_hatched: Callable[..., Settings],
) -> None:
    world = fake
    settings = with_hatched(MIRROR_REFRESH_SETTLE_S="1.5")
    buddies = [f"buddy_burst_{i}" for i in range(3)]
    for buddy_id in buddies:
        world.set_buddy(buddy_json(buddy_id, coins=50 * 10))
    burst = []
    for n in range(1, 51):
        for buddy_id in buddies:
            burst.append(
                build_delivery(
                    "coins.earned",
                    "v2",
                    secret=SECRET,
                    buddy_id=buddy_id,
                    data={
                        "amount": 10,
                        "balance": 10 * n,
                        "occurred_at": f"2026-01-01T00:{n // 60:02d}:{n % 60:02d}Z",
                    },
                )
            )
    async with service_running(settings) as server:
        assert set(await post(server, burst)) == {202}
        await wait_settled(db)
        await asyncio.sleep(3.0)
        await wait_settled(db)
    assert world.calls[GET_BUDDY] == len(buddies)
    for buddy_id in buddies:
        assert (await mirrored_view(db, buddy_id))["coins"] == 500


async def test_two_workers_share_one_budget(
    redis_url: str,
    db: store.Pool,
    fake: FakeHatched,
    with_hatched: Callable[..., Settings],
) -> None:
    world = fake
    for i in range(40):
        world.set_buddy(buddy_json(f"buddy_budget_{i}"))
    settings = with_hatched(HATCHED_API_RATE_PER_MIN="30")
    arq = await create_pool(redis_settings(redis_url, 1), default_queue_name=settings.queue_name)
    try:
        async with running_worker(settings), running_worker(settings):
            started = time.monotonic()
            for i in range(40):
                await refresh_request(arq, settings, f"buddy_budget_{i}")
            await asyncio.sleep(4.0)
    finally:
        await arq.aclose()
    in_window = [c for c in world.log if c.route == GET_BUDDY and c.at - started <= 4.0]
    # 30/min: a bucket of 5 plus refill of 25/min; four seconds allow at most 5 + 25 * 4 / 60.
    assert 1 <= len(in_window) <= 7, len(in_window)


async def refresh_request(arq: Any, settings: Settings, buddy_id: str) -> None:
    from service.hatched.debounce import request_refresh

    await request_refresh(arq, settings.queue_name, buddy_id, priority=False)


async def test_hatched_errors_never_touch_mirrored_state(
    db: store.Pool,
    fake: FakeHatched,
    with_hatched: Callable[..., Settings],
) -> None:
    world = fake
    settings = with_hatched()
    world.set_buddy(buddy_json("buddy_safe", coins=999))
    async with service_running(settings) as server:
        await post(
            server,
            [
                build_delivery(
                    "coins.earned",
                    "v2",
                    secret=SECRET,
                    buddy_id="buddy_safe",
                    data={"amount": 5, "balance": 5},
                )
            ],
        )
        await wait_settled(db)
        before = await store.get_buddy(db, "buddy_safe")
        world.fail_next(20, status=500)
        world.delay_s = 0  # first 500s
        await asyncio.sleep(4)
        world.delay_s = 2.0  # then timeouts (client timeout 0.5 s)
        async with httpx.AsyncClient(base_url=server) as http:
            answer = await http.post(
                "/v1/buddies/buddy_safe/refresh", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
            )
            assert answer.status_code == 202
        await asyncio.sleep(4)
        await wait_settled(db)
        after = await store.get_buddy(db, "buddy_safe")
    assert before is not None and after is not None
    assert after[0] == before[0] and after[1] == before[1], "a failed refresh changed the mirror"
    assert 500 in world.statuses(GET_BUDDY)
    assert await db.fetchval("SELECT count(*) FROM deliveries WHERE format = 'rest'") == 0


async def test_reconciliation_refreshes_the_stalest_first(
    redis_url: str,
    db: store.Pool,
    redis: object,
    fake: FakeHatched,
    with_hatched: Callable[..., Settings],
) -> None:
    world = fake
    settings = with_hatched(
        MIRROR_RECONCILE_AFTER_S="1",
        MIRROR_REFRESH_SETTLE_S="0",
    )
    for i in range(3):
        world.set_buddy(buddy_json(f"buddy_rec_{i}", coins=i * 100))
    async with service_running(settings) as server:
        await post(
            server,
            [
                build_delivery("buddy.hatched", "v2", secret=SECRET, buddy_id=f"buddy_rec_{i}")
                for i in range(3)
            ],
        )
        await wait_settled(db)
        assert world.calls[GET_BUDDY] == 0  # settle refreshes are off here
        arq = await create_pool(
            redis_settings(redis_url, 1), default_queue_name=settings.queue_name
        )
        try:
            # Any client object: with every buddy just refreshed, reconcile calls none.
            ctx = cast(
                WorkerContext, {"settings": settings, "pool": db, "redis": arq, "hatched": object()}
            )
            assert await reconcile(ctx) == 3
        finally:
            await arq.aclose()
        deadline = time.monotonic() + 10
        while await db.fetchval("SELECT count(*) FROM buddies WHERE refreshed_at IS NULL"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
            await wait_settled(db)
    for i in range(3):
        assert (await mirrored_view(db, f"buddy_rec_{i}"))["coins"] == i * 100


async def test_backfill_loads_everything_and_resumes_after_being_killed(
    migrated: str,
    redis_url: str,
    db: store.Pool,
    redis: object,
    fake: FakeHatched,
    fake_url: str,
) -> None:
    world, url = fake, fake_url
    world.max_page_size = 5
    world.delay_s = 0.15
    for i in range(60):
        world.set_buddy(buddy_json(f"buddy_bf_{i:02d}", user_id=f"user_{i}", coins=i))
    env = service_env(
        migrated,
        redis_url,
        HATCHED_API_URL=url,
        HATCHED_API_KEY=world.api_key,
        HATCHED_API_RATE_PER_MIN="6000",
    )
    first = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "backfill",
        "--all",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while (await store.get_checkpoint(db, "all") or (None, 0, False))[1] < 15:
        assert time.monotonic() < deadline, "backfill made no progress"
        await asyncio.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    await first.wait()
    halfway = await store.get_checkpoint(db, "all")
    assert halfway is not None and 15 <= halfway[1] < 60 and not halfway[2]
    pages_before = world.calls[LIST]

    second = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "backfill",
        "--all",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(second.communicate(), 60)
    assert second.returncode == 0, err.decode()
    assert b"backfill loaded 60 buddies" in out
    assert b"backfill" in err and b"buddy" in err  # the progress bar
    # Resumed from its checkpoint: at most the interrupted page is fetched again.
    assert world.calls[LIST] - pages_before <= 12 - halfway[1] // 5 + 1
    async with running_worker(make_settings(migrated, redis_url)):
        await wait_settled(db)
    assert await db.fetchval("SELECT count(*) FROM buddies WHERE buddy_id LIKE 'buddy_bf_%'") == 60
    assert (await mirrored_view(db, "buddy_bf_42"))["coins"] == 42
    assert (await store.get_checkpoint(db, "all") or (None, 0, False))[2] is True


async def test_drift_is_counted(
    db: store.Pool,
    fake: FakeHatched,
    with_hatched: Callable[..., Settings],
) -> None:
    world = fake
    settings = with_hatched()
    deliveries, truth_json = late_retry_scenario("buddy_drift")
    world.set_buddy(truth_json)
    async with service_running(settings) as server:
        await post(server, deliveries)
        await asyncio.sleep(3)
        await wait_settled(db)
        async with httpx.AsyncClient(base_url=server) as http:
            text = (await http.get("/metrics")).text
    assert 'hatched_refresh_drift_fields_total{field="coins"}' in text
    assert 'hatched_api_requests_total{route="GET /buddies/{buddy_id}",status="200"}' in text


async def test_token_bucket_is_shared_with_the_client(redis_url: str, redis: object) -> None:
    # Sanity for the wiring used by worker and backfill: one bucket name across instances.
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        a = RedisTokenBucket(client, 60)
        b = RedisTokenBucket(client, 60)
        assert a.keys == b.keys
        api = HatchedAPI("http://127.0.0.1:1", "k", bucket=a)
        await api.aclose()
    finally:
        await client.aclose()
