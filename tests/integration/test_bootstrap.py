"""First-user bootstrap against the fake Hatched API, real Postgres, Redis and worker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool

from service import store
from service.app import create_app
from service.apply.context import WorkerContext
from service.bootstrap import jobs as bootstrap_jobs
from service.bootstrap import repository
from service.bootstrap import routes as bootstrap_routes
from service.bootstrap.schemas import EmbedTokenOut, HatchingOut, WidgetSessionOut
from service.config import Settings
from service.dev.samples import build_delivery
from service.hatched.client import HatchedAPI
from service.read import openapi
from service.read.schemas import BuddyOut, ProblemOut
from tests.support.bootstrap import configured, deliver_outbox, with_knobs
from tests.support.config import API_TOKEN, SECRET
from tests.support.fake_hatched import DEFAULT_API_KEY, FakeHatched, buddy_json
from tests.support.running import running_worker, serving, wait_until

READ = {"Authorization": f"Bearer {API_TOKEN}"}
USER = "user_first"


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert ProblemOut.model_validate(response.json()).code == code
    body: dict[str, Any] = response.json()
    return body


async def row(pool: store.Pool, user_id: str = USER, key: str = "") -> dict[str, Any]:
    found = await repository.get_row(pool, user_id, key)
    assert found is not None
    return dict(found)


async def wait_outbox(fake: FakeHatched) -> None:
    """Until Hatched finished a hatch and queued its buddy.hatched."""

    async def queued() -> bool:
        return bool(fake.outbox)

    await wait_until(queued)


async def wait_status(pool: store.Pool, status: str, user_id: str = USER, key: str = "") -> None:
    async def reached() -> bool:
        found = await repository.get_row(pool, user_id, key)
        return found is not None and found["status"] == status

    await wait_until(reached, within=15)


@pytest.fixture
async def boot_settings(
    settings: Settings, fake_url: str, migrated: str, redis_url: str, pool: store.Pool
) -> Settings:
    return await configured(migrated, redis_url, pool, fake_url)


@pytest.fixture
async def http(boot_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serving(create_app(boot_settings)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        yield client


@pytest.fixture
async def arq_redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    redis = await create_pool(RedisSettings.from_dsn(redis_url))
    yield redis
    await redis.aclose()


@dataclass
class Jobs:
    """What the worker's bootstrap jobs run with, for calling them directly."""

    pool: store.Pool
    redis: ArqRedis
    hatched_url: str

    def hatched(self) -> HatchedAPI:
        return HatchedAPI(self.hatched_url, DEFAULT_API_KEY)

    def ctx(self, settings: Settings, hatched: HatchedAPI) -> WorkerContext:
        return {"settings": settings, "pool": self.pool, "redis": self.redis, "hatched": hatched}


@pytest.fixture
def jobs(pool: store.Pool, arq_redis: ArqRedis, fake_url: str) -> Jobs:
    return Jobs(pool, arq_redis, fake_url)


async def queued_polls(redis: ArqRedis, settings: Settings) -> list[str]:
    jobs = await redis.zrange(settings.queue_name, 0, -1)
    return [j.decode() for j in jobs if j.decode().startswith(repository.POLL_JOB)]


async def start(http: httpx.AsyncClient, user_id: str = USER, **body: Any) -> httpx.Response:
    return await http.post(f"/v1/users/{user_id}/buddy", json=body, headers=READ)


def expect_202(response: httpx.Response) -> HatchingOut:
    assert response.status_code == 202, response.text
    return HatchingOut.model_validate(response.json())


# --- the guard -----------------------------------------------------------------------------


async def test_ten_concurrent_calls_create_one_egg(
    http: httpx.AsyncClient, fake: FakeHatched, pool: store.Pool
) -> None:
    answers = await asyncio.gather(*(start(http) for _ in range(10)))
    accepted = [expect_202(a) for a in answers]
    assert len({a.operation_id for a in accepted}) == 1 and accepted[0].operation_id
    assert accepted[0].status_url == f"/v1/users/{USER}/buddy/stream"
    assert len(fake.eggs) == 1
    assert fake.calls["POST /eggs"] == 1
    assert fake.calls["POST /eggs/{egg_id}/hatch"] == 1
    assert fake.calls["GET /buddies"] == 1
    state = await row(pool)
    assert (state["status"], state["operation_id"]) == ("hatching", accepted[0].operation_id)
    # A repeat while hatching answers from the row without asking Hatched anything.
    calls = len(fake.log)
    assert expect_202(await start(http)).operation_id == accepted[0].operation_id
    assert len(fake.log) == calls


async def test_ten_concurrent_calls_for_two_audiences_make_two_eggs(
    http: httpx.AsyncClient, fake: FakeHatched
) -> None:
    answers = await asyncio.gather(
        *(start(http, audience=("kids" if i % 2 else "adults")) for i in range(10))
    )
    assert {a.status_code for a in answers} == {202}
    assert sorted(e["audience"] for e in fake.eggs.values()) == ["adults", "kids"]


async def test_webhook_path_then_the_mirror_answers_without_hatched(
    http: httpx.AsyncClient, fake: FakeHatched, boot_settings: Settings, pool: store.Pool
) -> None:
    accepted = expect_202(await start(http))
    await wait_outbox(fake)
    async with running_worker(boot_settings):
        await deliver_outbox(http, fake)
        await wait_status(pool, "completed")
    state = await row(pool)
    buddy_id = fake.outbox[0].buddy_id
    assert state["buddy_id"] == buddy_id and state["polls"] == 0
    assert fake.calls["GET /operations/{operation_id}"] == 0
    assert accepted.operation_id == state["operation_id"]

    calls = len(fake.log)
    response = await start(http)
    assert response.status_code == 200, response.text
    buddy = BuddyOut.model_validate(response.json())
    assert (buddy.buddy_id, buddy.user_id, buddy.status) == (buddy_id, USER, "active")
    same = await http.get(f"/v1/buddies/{buddy_id}", headers=READ)
    assert response.json() == same.json()
    assert response.headers["etag"] == same.headers["etag"]
    assert len(fake.log) == calls  # Hatched was not asked anything
    assert len(fake.eggs) == 1


async def test_active_buddy_at_hatched_is_mirrored_not_hatched_again(
    http: httpx.AsyncClient, fake: FakeHatched, boot_settings: Settings, pool: store.Pool
) -> None:
    fake.set_buddy(buddy_json("buddy_known", USER, name="Known"))
    async with running_worker(boot_settings):
        response = await start(http)
        await wait_status(pool, "completed")
    assert response.status_code == 200, response.text
    buddy = BuddyOut.model_validate(response.json())
    assert (buddy.buddy_id, buddy.name, buddy.user_id) == ("buddy_known", "Known", USER)
    assert not fake.eggs and fake.calls["POST /eggs"] == 0


async def test_buddy_of_another_audience_is_completed_by_the_cron(
    http: httpx.AsyncClient,
    fake: FakeHatched,
    boot_settings: Settings,
    jobs: Jobs,
) -> None:
    # No audience asked: the user's buddy of any audience answers, as GET /v1/users/{id}/buddy.
    fake.set_buddy(buddy_json("buddy_kids", USER, audience="kids"))
    async with running_worker(boot_settings):
        response = await start(http)
    assert response.status_code == 200, response.text
    assert response.json()["audience"] == "kids"
    async with jobs.hatched() as api:
        await bootstrap_jobs.poll_stalled_hatches(jobs.ctx(boot_settings, api))
    state = await row(jobs.pool)
    assert (state["status"], state["buddy_id"]) == ("completed", "buddy_kids")
    assert not fake.eggs


async def test_stale_start_is_taken_over_and_a_failure_is_retried(
    http: httpx.AsyncClient, fake: FakeHatched, pool: store.Pool
) -> None:
    fake.hatch_delay_s = 60  # a finished hatch would be found as an active buddy instead
    # A request that died mid-flow: its lease ran out long ago.
    await pool.execute(
        "INSERT INTO bootstraps (user_id, audience_key, status, claim, updated_at)"
        " VALUES ($1, '', 'starting', gen_random_uuid(), now() - interval '1 hour')",
        USER,
    )
    expect_202(await start(http))
    assert (await row(pool))["attempts"] == 2
    await pool.execute("UPDATE bootstraps SET status = 'failed' WHERE user_id = $1", USER)
    expect_202(await start(http))
    state = await row(pool)
    assert (state["status"], state["attempts"]) == ("hatching", 3)
    assert len(fake.eggs) == 1  # ensure=true gave the same egg back


# --- the polling fallback ------------------------------------------------------------------


async def test_polling_fallback_finishes_without_the_webhook(
    http: httpx.AsyncClient,
    fake: FakeHatched,
    boot_settings: Settings,
    jobs: Jobs,
) -> None:
    fake.hatch_delay_s = 30  # still hatching at the first poll
    settings = with_knobs(boot_settings, poll_after_s=0)
    accepted = expect_202(await start(http))
    assert await queued_polls(jobs.redis, settings)  # the POST queued the first poll
    async with jobs.hatched() as api:
        ctx = jobs.ctx(settings, api)
        await jobs.redis.delete(settings.queue_name)
        assert await bootstrap_jobs.poll_operation(ctx, USER, "") == "pending"
        assert await queued_polls(jobs.redis, settings)  # and re-queued itself
        fake.settle()  # the hatch completes; its buddy.hatched is never delivered
        assert await bootstrap_jobs.poll_operation(ctx, USER, "") == "mirroring"
    assert fake.calls["GET /operations/{operation_id}"] == 2
    async with running_worker(boot_settings):
        await wait_status(jobs.pool, "completed")
    state = await row(jobs.pool)
    assert (state["operation_id"], state["polls"]) == (accepted.operation_id, 2)
    response = await start(http)
    assert response.status_code == 200, response.text
    assert response.json()["buddy_id"] == fake.outbox[0].buddy_id == state["buddy_id"]


async def test_poll_waits_for_its_time_and_stops_when_the_webhook_won(
    http: httpx.AsyncClient,
    fake: FakeHatched,
    boot_settings: Settings,
    jobs: Jobs,
) -> None:
    expect_202(await start(http))
    async with jobs.hatched() as api:
        ctx = jobs.ctx(boot_settings, api)
        assert await bootstrap_jobs.poll_operation(ctx, USER, "") == "waiting"  # poll_after_s=60
        await wait_outbox(fake)
        async with running_worker(boot_settings):
            await deliver_outbox(http, fake)
            await wait_status(jobs.pool, "completed")
        assert await bootstrap_jobs.poll_operation(ctx, USER, "") == "done"
    assert fake.calls["GET /operations/{operation_id}"] == 0


async def test_stalled_hatch_is_polled_by_the_cron(
    http: httpx.AsyncClient,
    fake: FakeHatched,
    boot_settings: Settings,
    jobs: Jobs,
) -> None:
    settings = with_knobs(boot_settings, poll_after_s=0.1)
    expect_202(await start(http))
    await jobs.redis.delete(settings.queue_name)  # the poll job was lost
    await jobs.pool.execute(
        "UPDATE bootstraps SET hatch_started_at = now() - interval '1 minute' WHERE user_id = $1",
        USER,
    )
    await wait_outbox(fake)
    async with jobs.hatched() as api:
        ctx = jobs.ctx(settings, api)
        assert await bootstrap_jobs.poll_stalled_hatches(ctx) == 1
        assert (await row(jobs.pool))["status"] == "mirroring"
        async with running_worker(boot_settings):
            await wait_status(jobs.pool, "completed")
        assert await bootstrap_jobs.poll_stalled_hatches(ctx) == 0


async def test_failed_and_timed_out_hatches_are_reported_then_retried(
    http: httpx.AsyncClient,
    fake: FakeHatched,
    boot_settings: Settings,
    jobs: Jobs,
) -> None:
    settings = with_knobs(boot_settings, poll_after_s=0, poll_max_s=30)
    fake.fail_hatch = True
    first = expect_202(await start(http))
    fake.settle()
    async with jobs.hatched() as api:
        ctx = jobs.ctx(settings, api)
        assert await bootstrap_jobs.poll_operation(ctx, USER, "") == "failed"
        failed = await row(jobs.pool)
        assert failed["error"]["code"] == "hatch_failed"
        assert failed["error"]["hatched_code"] == "hatch_failed"

        fake.fail_hatch, fake.hatch_delay_s = False, 60
        second = expect_202(await start(http))  # the next call retries with the same egg
        assert second.operation_id != first.operation_id and len(fake.eggs) == 1
        await jobs.pool.execute(
            "UPDATE bootstraps SET hatch_started_at = now() - interval '1 minute'"
            " WHERE user_id = $1",
            USER,
        )
        assert await bootstrap_jobs.poll_operation(ctx, USER, "") == "failed"
        assert (await row(jobs.pool))["error"]["code"] == "hatch_timeout"


async def test_a_retry_after_hatch_timeout_adopts_the_running_hatch(
    http: httpx.AsyncClient,
    fake: FakeHatched,
    boot_settings: Settings,
    jobs: Jobs,
) -> None:
    """A hatch slower than MIRROR_BOOTSTRAP_POLL_MAX_S is still running at Hatched: the next
    call resumes it (and the egg it hatches) instead of asking for a second egg."""
    settings = with_knobs(boot_settings, poll_after_s=0, poll_max_s=30)
    fake.hatch_delay_s = 3600
    first = expect_202(await start(http))
    await jobs.pool.execute(
        "UPDATE bootstraps SET hatch_started_at = now() - interval '1 minute' WHERE user_id = $1",
        USER,
    )
    async with jobs.hatched() as api:
        ctx = jobs.ctx(settings, api)
        assert await bootstrap_jobs.poll_operation(ctx, USER, "") == "failed"
        assert (await row(jobs.pool))["error"]["code"] == "hatch_timeout"

        second = expect_202(await start(http))
        assert second.operation_id == first.operation_id
        assert len(fake.eggs) == 1 and fake.calls["POST /eggs/{egg_id}/hatch"] == 1
        assert (await row(jobs.pool))["status"] == "hatching"

        # It ends the usual way: the polled operation's buddy is mirrored.
        fake.settle()
        assert await bootstrap_jobs.poll_operation(ctx, USER, "") == "mirroring"
    assert len(fake.eggs) == 1 and len(fake.buddies) == 1


# --- the user stream -----------------------------------------------------------------------


async def collect(
    http: httpx.AsyncClient, path: str, into: asyncio.Queue[tuple[str, dict[str, Any]]]
) -> None:
    async with http.stream("GET", path, headers=READ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = "message"
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                await into.put((event, json.loads(line[5:])))


async def test_stream_shows_hatching_then_the_buddy(
    http: httpx.AsyncClient, fake: FakeHatched, boot_settings: Settings
) -> None:
    fake.hatch_delay_s = 0.5
    events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    listener = asyncio.create_task(collect(http, f"/v1/users/{USER}/buddy/stream", events))
    try:
        assert await asyncio.wait_for(events.get(), 5) == (
            "progress",
            {
                "status": "none",
                "operation_id": None,
                "egg_id": None,
                "error": None,
                "started_at": None,
            },
        )
        accepted = expect_202(await start(http))
        seen = [await asyncio.wait_for(events.get(), 5)]
        while seen[-1][1]["status"] != "hatching":
            seen.append(await asyncio.wait_for(events.get(), 5))
        assert seen[-1][0] == "progress" and seen[-1][1]["operation_id"] == accepted.operation_id
        await wait_outbox(fake)
        async with running_worker(boot_settings):
            await deliver_outbox(http, fake)
            kind, buddy = await asyncio.wait_for(events.get(), 10)
            while kind == "progress":  # at most a last one (mirroring) before the buddy
                kind, buddy = await asyncio.wait_for(events.get(), 10)
            assert kind == "buddy"
            assert BuddyOut.model_validate(buddy).buddy_id == fake.outbox[0].buddy_id
            # After the buddy, the stream follows its changes.
            headers, body = build_delivery(
                "coins.earned",
                "v2",
                secret=SECRET,
                buddy_id=buddy["buddy_id"],
                data={"amount": 5, "balance": 5},
            )
            await http.post("/webhooks/hatched", content=body, headers=headers)
            kind, changed = await asyncio.wait_for(events.get(), 10)
            assert (kind, changed["coins"], changed["version"]) == ("buddy", 5, 2)
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)


async def test_stream_learns_of_a_buddy_nobody_bootstrapped(
    http: httpx.AsyncClient, boot_settings: Settings
) -> None:
    events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    listener = asyncio.create_task(collect(http, "/v1/users/user_plain/buddy/stream", events))
    try:
        assert (await asyncio.wait_for(events.get(), 5))[1]["status"] == "none"
        async with running_worker(boot_settings):
            headers, body = build_delivery(
                "buddy.hatched",
                "v2",
                secret=SECRET,
                buddy_id="buddy_p",
                data={"user_id": "user_plain"},
            )
            await http.post("/webhooks/hatched", content=body, headers=headers)
            kind, buddy = await asyncio.wait_for(events.get(), 10)
        assert (kind, buddy["buddy_id"]) == ("buddy", "buddy_p")
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)


# --- Hatched's errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knob", "status", "code"),
    [
        ("no_published_config", 409, "no_published_config"),
        ("active_egg_limit", 409, "active_egg_limit"),
        ("rate_limited", 429, "hatched_rate_limited"),
        ("no_credits", 402, "hatched_payment_required"),
        ("server_errors", 502, "hatched_unavailable"),
        ("validation", 502, "hatched_error"),
    ],
)
async def test_hatched_errors_map_to_documented_problems(
    http: httpx.AsyncClient, fake: FakeHatched, pool: store.Pool, knob: str, status: int, code: str
) -> None:
    if knob == "no_published_config":
        fake.no_published_config = True
    elif knob == "active_egg_limit":
        fake.fail_next(
            1, 409, code="active_egg_limit", details={"active": [], "limit": 1}, route="POST /eggs"
        )
    elif knob == "rate_limited":
        fake.fail_next(1, 429, retry_after=30, route="POST /eggs")
    elif knob == "no_credits":
        fake.credits = 0
    elif knob == "server_errors":
        fake.fail_next(2, 503, route="GET /buddies")  # both attempts of the call
    else:
        fake.fail_next(1, 422, code="validation_error", route="POST /eggs")

    body = problem(await start(http), status, code)
    state = await row(pool)
    assert state["status"] == "failed" and state["error"]["code"] == code
    if knob == "no_published_config":
        assert body["publish_url"] == fake.publish_url
        assert fake.publish_url in body["detail"]
    elif knob == "active_egg_limit":
        assert body["active"] == []
    elif knob == "rate_limited":
        assert body["retry_after_s"] == 30
    elif knob == "no_credits":
        assert body["hatched_code"] == "insufficient_credits"
    elif knob == "validation":
        assert (body["hatched_status"], body["hatched_code"]) == (422, "validation_error")
    if knob in ("rate_limited",):
        return  # the shared budget now waits out Retry-After; nothing to retry in a test
    # Once Hatched is fine again the next call retries, still with at most one egg.
    fake.no_published_config, fake.credits = False, None
    expect_202(await start(http))
    assert len(fake.eggs) == 1


async def test_rate_limited_answer_carries_retry_after(
    http: httpx.AsyncClient, fake: FakeHatched
) -> None:
    fake.fail_next(1, 429, retry_after=30, route="GET /buddies")
    response = await start(http)
    problem(response, 429, "hatched_rate_limited")
    assert response.headers["retry-after"] == "30"


async def test_concurrent_calls_share_the_leaders_failure(
    http: httpx.AsyncClient, fake: FakeHatched
) -> None:
    fake.no_published_config = True
    fake.delay_s = 0.5  # the leader is still talking to Hatched when the others arrive
    answers = await asyncio.gather(*(start(http) for _ in range(5)))
    for answer in answers:
        problem(answer, 409, "no_published_config")
    assert fake.calls["POST /eggs"] == 1


async def test_active_egg_limit_recovers_by_reusing_an_active_egg(
    http: httpx.AsyncClient, fake: FakeHatched, boot_settings: Settings, pool: store.Pool
) -> None:
    fake.max_active_eggs = 1
    egg = fake.add_egg(USER, audience="spring")
    accepted = expect_202(await start(http, audience="fall"))
    assert list(fake.eggs) == [egg["egg_id"]] and egg["operation_id"] == accepted.operation_id
    await wait_outbox(fake)
    async with running_worker(boot_settings):
        await deliver_outbox(http, fake)
        await wait_status(pool, "completed", key="fall")
    response = await start(http, audience="fall")
    assert response.status_code == 200, response.text
    assert response.json()["egg_id"] == egg["egg_id"]


async def test_wrong_hatched_key_is_a_hatched_error(
    boot_settings: Settings, fake: FakeHatched
) -> None:
    settings = boot_settings.model_copy(update={"hatched_api_key": "hk_wrong"})
    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
        body = problem(await start(http), 502, "hatched_error")
    assert (body["hatched_status"], body["hatched_code"]) == (401, "unauthorized")


# --- tokens ----------------------------------------------------------------------------------


async def hatched_buddy(
    http: httpx.AsyncClient,
    fake: FakeHatched,
    settings: Settings,
    pool: store.Pool,
    buddy_id: str,
    user_id: str,
) -> None:
    """A buddy both Hatched and the mirror know."""
    fake.set_buddy(buddy_json(buddy_id, user_id))

    async def mirrored() -> bool:
        return await store.get_version(pool, buddy_id) is not None

    async with running_worker(settings):
        headers, body = build_delivery(
            "buddy.hatched", "v2", secret=SECRET, buddy_id=buddy_id, data={"user_id": user_id}
        )
        await http.post("/webhooks/hatched", content=body, headers=headers)
        await wait_until(mirrored, within=10)


async def test_widget_session_and_embed_token(
    http: httpx.AsyncClient, fake: FakeHatched, boot_settings: Settings, pool: store.Pool
) -> None:
    await hatched_buddy(http, fake, boot_settings, pool, "buddy_w", "user_w")
    response = await http.post(
        "/v1/users/user_w/widget-session",
        json={"scopes": ["buddy:read"], "ttl_seconds": 600},
        headers=READ,
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    session = WidgetSessionOut.model_validate(response.json())
    assert session.scopes == ["buddy:read"]
    minted = fake.widget_sessions[session.session_id or ""]
    assert (minted["token"], minted["buddy_id"]) == (session.token, "buddy_w")

    defaults = await http.post("/v1/users/user_w/widget-session", headers=READ)
    assert WidgetSessionOut.model_validate(defaults.json()).scopes == []

    embed = await http.post("/v1/users/user_w/embed-token", headers=READ)
    assert embed.status_code == 200, embed.text
    token = EmbedTokenOut.model_validate(embed.json())
    assert token.mode == "read-only" and fake.embed_tokens[token.token]["buddy_id"] == "buddy_w"


async def test_tokens_need_a_buddy_and_valid_input(
    http: httpx.AsyncClient, fake: FakeHatched, boot_settings: Settings, pool: store.Pool
) -> None:
    for kind in ("widget-session", "embed-token"):
        response = await http.post(f"/v1/users/nobody/{kind}", headers=READ)
        problem(response, 404, "buddy_not_found")
    for body in ({"ttl_seconds": 5}, {"ttl_seconds": True}, {"scopes": "all"}, {"scopes": [1]}):
        response = await http.post("/v1/users/nobody/widget-session", json=body, headers=READ)
        assert problem(response, 400, "invalid_parameter")
    await hatched_buddy(http, fake, boot_settings, pool, "buddy_r", "user_r")
    fake.fail_next(1, 429, retry_after=30, route="POST /widget-sessions")
    response = await http.post("/v1/users/user_r/widget-session", headers=READ)
    problem(response, 429, "hatched_rate_limited")


async def test_bad_bodies_are_400(http: httpx.AsyncClient) -> None:
    for content in (
        b"[1]",
        b"{",
        b'{"audience": 5}',
        b'{"audience": ""}',
        b'{"audience": "a\\u0000"}',
    ):
        response = await http.post(f"/v1/users/{USER}/buddy", content=content, headers=READ)
        problem(response, 400, "invalid_parameter")
    for path in ("/buddy/stream?audience=", "/buddy/stream?audience=%00"):
        response = await http.get(f"/v1/users/{USER}{path}", headers=READ)
        problem(response, 400, "invalid_parameter")
    response = await http.post("/v1/users/a%00b/buddy", headers=READ)
    problem(response, 400, "invalid_parameter")
    empty = await http.post(f"/v1/users/{USER}/buddy", headers=READ)  # no body at all is fine
    assert empty.status_code == 202


async def test_not_configured_and_unauthorized(settings: Settings, pool: store.Pool) -> None:
    await pool.execute("TRUNCATE bootstraps")
    routes = [
        ("POST", f"/v1/users/{USER}/buddy"),
        ("GET", f"/v1/users/{USER}/buddy/stream"),
        ("POST", f"/v1/users/{USER}/widget-session"),
        ("POST", f"/v1/users/{USER}/embed-token"),
    ]
    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
        for method, path in routes:
            problem(await http.request(method, path), 401, "unauthorized")
            response = await http.request(method, path, headers=READ)
            problem(response, 409, "hatched_api_not_configured")


def test_openapi_documents_the_bootstrap_routes(settings: Settings) -> None:
    document = openapi.build(bootstrap_routes.endpoints(settings))
    paths = document["paths"]
    assert set(paths) == {
        "/v1/users/{user_id}/buddy",
        "/v1/users/{user_id}/buddy/stream",
        "/v1/users/{user_id}/widget-session",
        "/v1/users/{user_id}/embed-token",
    }
    post = paths["/v1/users/{user_id}/buddy"]["post"]
    assert set(post["responses"]) >= {"200", "202", "400", "401", "402", "409", "429", "502"}
    assert post["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/HatchingOut"
    }
    for name in ("HatchingOut", "WidgetSessionOut", "EmbedTokenOut", "BuddyOut"):
        assert name in document["components"]["schemas"]
