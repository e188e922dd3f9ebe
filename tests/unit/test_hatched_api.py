"""The REST client without a network: buddy mapping, error envelopes, cursors, retry policy."""

from __future__ import annotations

import json
import pickle
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from service.hatched.client import HatchedAPI
from service.hatched.errors import (
    BudgetExhausted,
    HatchedAPIError,
    HatchedUnavailable,
    RateLimited,
    error_from_response,
    parse_retry_after,
)
from service.hatched.ratelimit import RedisTokenBucket
from service.hatched.remote import RemoteBuddy, next_cursor

REST_BUDDY: dict[str, Any] = {
    "buddy_id": "buddy_1",
    "user_id": "user_42",
    "audience": "kids",
    "egg_id": "egg_1",
    "name": "Pip",
    "status": "active",
    "config_version_id": "cfg_v12",
    "evolution_stage": 2,
    "image_url": "https://cdn/x/stage2.png",
    "thumb_url": "https://cdn/x/stage2_thumb.png",
    "base_image_url": "https://cdn/x/base.png",
    "coins": 120,
    "tokens": {"gem": 3},
    "skills": {"pronunciation": {"value": 65, "level": 3}},
    "badges": [{"badge_id": "badge_week_warrior", "awarded_at": "2026-04-22T10:30:00+00:00"}],
    "streaks": {"daily_lesson": {"count": 7}},
    "equipped_item_ids": ["item_hat", "item_cape", "item_hat"],
    "appearance": {
        "status": "ready",
        "desired_equipped_item_ids": ["item_hat"],
        "rendered_equipped_item_ids": ["item_hat"],
        "error": None,
    },
    "progression": {"xp": 340, "next_stage_at": 500},
    "created_at": "2026-04-01T09:00:00Z",
    "updated_at": "2026-04-22T10:31:00Z",
    "some_future_field": {"kept": True},
}


def camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part.title() for part in rest)


# --- mapping --------------------------------------------------------------------------------


def test_bare_object_maps_every_field() -> None:
    b = RemoteBuddy.from_json(REST_BUDDY)
    assert (b.buddy_id, b.user_id, b.audience, b.egg_id, b.name, b.status) == (
        "buddy_1",
        "user_42",
        "kids",
        "egg_1",
        "Pip",
        "active",
    )
    assert b.config_version_id == "cfg_v12"
    assert b.evolution_stage == 2
    assert b.image_url == "https://cdn/x/stage2.png"
    assert b.thumb_url == "https://cdn/x/stage2_thumb.png"
    assert b.base_image_url == "https://cdn/x/base.png"
    assert b.coins == 120
    assert b.tokens == {"gem": 3}
    assert b.skills == {"pronunciation": {"value": 65, "level": 3}}
    assert b.badges == {
        "badge_week_warrior": {"status": "awarded", "awarded_at": "2026-04-22T10:30:00Z"}
    }
    assert b.streaks == {"daily_lesson": {"count": 7, "last_milestone": None}}
    assert b.equipped_item_ids == ["item_cape", "item_hat"]
    assert b.owned_item_ids is None
    assert b.appearance is not None and b.appearance["status"] == "ready"
    assert b.progression == {"xp": 340, "next_stage_at": 500}
    assert b.created_at == datetime(2026, 4, 1, 9, tzinfo=UTC)
    assert b.updated_at == datetime(2026, 4, 22, 10, 31, tzinfo=UTC)
    assert b.raw == REST_BUDDY
    assert b.raw is not REST_BUDDY


def test_under_data_is_the_same_buddy() -> None:
    assert RemoteBuddy.from_json({"data": REST_BUDDY}) == RemoteBuddy.from_json(REST_BUDDY)


def test_camel_case_maps_like_snake_case() -> None:
    camel_buddy = {camel(k): v for k, v in REST_BUDDY.items()}
    camel_buddy["appearance"] = {camel(k): v for k, v in REST_BUDDY["appearance"].items()}
    camel_buddy["badges"] = [{"badgeId": "badge_week_warrior", "awardedAt": "2026-04-22T10:30Z"}]
    mapped = RemoteBuddy.from_json({"data": camel_buddy})
    snake = RemoteBuddy.from_json(REST_BUDDY)
    assert mapped.buddy_id == "buddy_1"
    assert mapped.raw == camel_buddy
    for name in ("user_id", "config_version_id", "evolution_stage", "thumb_url", "coins"):
        assert getattr(mapped, name) == getattr(snake, name), name
    assert mapped.appearance == snake.appearance
    assert mapped.badges == snake.badges
    assert mapped.equipped_item_ids == snake.equipped_item_ids


def test_missing_fields_are_none_or_empty() -> None:
    b = RemoteBuddy.from_json({"buddy_id": "buddy_min"})
    assert b.user_id is None and b.coins is None and b.evolution_stage is None
    assert b.created_at is None and b.updated_at is None
    assert (b.tokens, b.skills, b.badges, b.streaks) == ({}, {}, {}, {})
    assert b.equipped_item_ids == [] and b.owned_item_ids is None
    assert b.appearance is None and b.progression is None


def test_id_alias_and_numeric_id() -> None:
    assert RemoteBuddy.from_json({"id": 42}).buddy_id == "42"


@pytest.mark.parametrize("obj", [{}, {"data": {}}, {"name": "Pip"}, [], "buddy_1", None])
def test_no_buddy_id_is_a_value_error(obj: Any) -> None:
    with pytest.raises(ValueError):
        RemoteBuddy.from_json(obj)


def test_badges_in_dict_form_and_ready_status() -> None:
    b = RemoteBuddy.from_json(
        {
            "buddy_id": "b",
            "badges": {
                "a": {"status": "awarded", "awarded_at": "2026-04-22T10:30:00Z"},
                "r": {"status": "ready"},
                "s": "2026-04-20T08:00:00+02:00",
                "t": True,
            },
        }
    )
    assert b.badges == {
        "a": {"status": "awarded", "awarded_at": "2026-04-22T10:30:00Z"},
        "r": {"status": "ready", "awarded_at": None},
        "s": {"status": "awarded", "awarded_at": "2026-04-20T06:00:00Z"},
        "t": {"status": "awarded", "awarded_at": None},
    }


def test_badge_list_of_plain_ids() -> None:
    b = RemoteBuddy.from_json({"buddy_id": "b", "badges": ["x", {"id": "y"}]})
    assert b.badges == {
        "x": {"status": "awarded", "awarded_at": None},
        "y": {"status": "awarded", "awarded_at": None},
    }


def test_collections_in_list_and_scalar_forms() -> None:
    b = RemoteBuddy.from_json(
        {
            "buddyId": "b",
            "tokens": [{"tokenType": "gem", "balance": 4}, {"key": "star", "amount": "2"}],
            "skills": [{"skillKey": "reading", "value": 12.5, "level": 2}, {"key": "math"}],
            "streaks": {"daily": 3, "weekly": {"count": 2, "milestone": 2}},
            "coins": {"balance": 55},
        }
    )
    assert b.tokens == {"gem": 4, "star": 2}
    assert b.skills == {
        "reading": {"value": 12.5, "level": 2},
        "math": {"value": None, "level": None},
    }
    assert b.streaks == {
        "daily": {"count": 3, "last_milestone": None},
        "weekly": {"count": 2, "last_milestone": 2},
    }
    assert b.coins == 55


def test_user_defined_keys_keep_their_spelling() -> None:
    b = RemoteBuddy.from_json(
        {"buddy_id": "b", "tokens": {"goldStar": 1}, "skills": {"readingSpeed": {"value": 1}}}
    )
    assert b.tokens == {"goldStar": 1}
    assert list(b.skills) == ["readingSpeed"]


def test_items_block_and_owned_ids() -> None:
    b = RemoteBuddy.from_json(
        {
            "buddy_id": "b",
            "items": {"owned": ["i2", "i1"], "equipped": [{"item_id": "i1"}]},
        }
    )
    assert b.owned_item_ids == ["i1", "i2"]
    assert b.equipped_item_ids == ["i1"]
    assert RemoteBuddy.from_json({"buddy_id": "b", "owned_item_ids": []}).owned_item_ids == []


def test_v1_style_image_and_stage() -> None:
    b = RemoteBuddy.from_json({"buddy_id": "b", "image": {"url": "u", "stage": 3}})
    assert (b.image_url, b.evolution_stage) == ("u", 3)


def test_wrong_types_are_dropped_not_fatal() -> None:
    b = RemoteBuddy.from_json(
        {
            "buddy_id": "b",
            "coins": True,
            "evolution_stage": "two",
            "tokens": "gem",
            "badges": 7,
            "appearance": ["x"],
            "updated_at": "yesterday",
        }
    )
    assert b.coins is None and b.evolution_stage is None and b.tokens == {}
    assert b.badges == {} and b.appearance is None and b.updated_at is None


# --- errors ---------------------------------------------------------------------------------


def response(status: int, body: Any = None, **headers: str) -> httpx.Response:
    request = httpx.Request("GET", "https://api.example/buddies/x")
    if isinstance(body, str):
        return httpx.Response(status, text=body, headers=headers, request=request)
    return httpx.Response(status, json=body, headers=headers, request=request)


def test_error_envelope_is_parsed() -> None:
    err = error_from_response(
        response(
            409,
            {
                "error": {
                    "code": "no_published_config",
                    "message": "publish first",
                    "details": {"publish_url": "https://app/publish"},
                    "requestId": "req_1",
                }
            },
        )
    )
    assert type(err) is HatchedAPIError
    assert (err.status, err.code, err.message, err.request_id) == (
        409,
        "no_published_config",
        "publish first",
        "req_1",
    )
    assert err.details == {"publish_url": "https://app/publish"}
    assert "409" in str(err) and "no_published_config" in str(err) and "req_1" in str(err)


def test_non_json_error_body_is_tolerated() -> None:
    err = error_from_response(response(502, "<html>Bad gateway</html>", **{"X-Request-Id": "r9"}))
    assert (err.status, err.code, err.request_id) == (502, "http_502", "r9")
    assert "Bad gateway" in err.message


def test_other_json_error_shapes() -> None:
    err = error_from_response(response(400, {"error": "invalid_cursor", "message": "bad cursor"}))
    assert (err.code, err.message) == ("invalid_cursor", "bad cursor")
    err = error_from_response(response(404, {"detail": "Not Found"}))
    assert (err.code, err.message) == ("http_404", "Not Found")
    err = error_from_response(response(500, []))
    assert err.code == "http_500" and err.details is None


def test_429_becomes_rate_limited_with_retry_after() -> None:
    err = error_from_response(
        response(429, {"error": {"code": "rate_limited"}}, **{"Retry-After": "7"})
    )
    assert isinstance(err, RateLimited) and err.retry_after_s == 7
    err = error_from_response(response(429, {"error": {"details": {"retryAfter": 3}}}))
    assert isinstance(err, RateLimited) and err.retry_after_s == 3 and err.code == "rate_limited"
    err = error_from_response(response(429, "slow down"))
    assert isinstance(err, RateLimited) and err.retry_after_s == 1.0


def test_errors_survive_pickling() -> None:
    err = RateLimited("slow", retry_after_s=4, status=429, code="rate_limited", request_id="r")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is RateLimited and str(back) == str(err)
    assert (back.retry_after_s, back.status, back.request_id) == (4, 429, "r")
    plain = pickle.loads(pickle.dumps(HatchedAPIError("x", status=409, details={"a": 1})))
    assert (plain.status, plain.details) == (409, {"a": 1})


def test_parse_retry_after() -> None:
    now = datetime(2026, 4, 22, 10, 30, tzinfo=UTC)
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("Wed, 22 Apr 2026 10:30:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 22 Apr 2026 10:29:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after(None) is None


# --- cursors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"data": [], "meta": {"next_cursor": "c2"}}, "c2"),
        ({"data": [], "meta": {"nextCursor": "c2"}}, "c2"),
        ({"data": [], "meta": {"cursor": "c2"}}, "c2"),
        ({"data": [], "meta": {"next": "c2"}}, "c2"),
        ({"data": [], "next_cursor": "c2"}, "c2"),
        ({"data": [], "meta": {"next_cursor": None}}, None),
        ({"data": [], "meta": {"next_cursor": "c2", "has_more": False}}, None),
        ({"data": [], "meta": {"cursor": "c1"}}, None),  # the cursor we sent, echoed
        ({"data": []}, None),
        ([], None),
    ],
)
def test_next_cursor_shapes(body: Any, expected: str | None) -> None:
    assert next_cursor(body, sent="c1") == expected


# --- the client over a mock transport ------------------------------------------------------

Script = list[httpx.Response | Exception]


def client(script: Script, seen: list[httpx.Request] | None = None, **options: Any) -> HatchedAPI:
    answers = iter(script)

    def handle(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    options.setdefault("backoff_s", 0.001)
    options.setdefault("backoff_max_s", 0.01)
    return HatchedAPI(
        "https://api.example/v1", "key_1", transport=httpx.MockTransport(handle), **options
    )


def ok(body: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


def fail(status: int, code: str = "boom", **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": "x"}}, headers=headers)


async def test_get_buddy_sends_auth_and_maps() -> None:
    seen: list[httpx.Request] = []
    async with client([ok({"data": REST_BUDDY})], seen) as api:
        buddy = await api.get_buddy("buddy/1?x")
    assert buddy is not None and buddy.buddy_id == "buddy_1"
    assert seen[0].headers["authorization"] == "Bearer key_1"
    assert seen[0].url.raw_path == b"/v1/buddies/buddy%2F1%3Fx"


async def test_get_buddy_404_is_none_and_not_retried() -> None:
    seen: list[httpx.Request] = []
    async with client([fail(404, "buddy_not_found")], seen) as api:
        assert await api.get_buddy("nope") is None
    assert len(seen) == 1


async def test_list_buddies_params_and_bad_items() -> None:
    seen: list[httpx.Request] = []
    body = {"data": [REST_BUDDY, {"name": "no id"}], "meta": {"next": "c9"}}
    async with client([ok(body)], seen) as api:
        page, cursor = await api.list_buddies(user_id="user_42", cursor="c8", limit=10)
    assert [b.buddy_id for b in page] == ["buddy_1"] and cursor == "c9"
    assert dict(seen[0].url.params) == {
        "user_id": "user_42",
        "status": "active",
        "cursor": "c8",
        "limit": "10",
    }


async def test_list_without_data_array_is_an_error() -> None:
    async with client([ok({"meta": {}})]) as api:
        with pytest.raises(HatchedAPIError) as caught:
            await api.list_buddies()
    assert caught.value.code == "invalid_response"


async def test_5xx_retried_then_success() -> None:
    seen: list[httpx.Request] = []
    async with client([fail(500), fail(503), ok(REST_BUDDY)], seen) as api:
        assert await api.get_buddy("buddy_1") is not None
    assert len(seen) == 3


async def test_5xx_gives_up_after_max_attempts() -> None:
    seen: list[httpx.Request] = []
    async with client([fail(500)] * 10, seen) as api:
        with pytest.raises(HatchedAPIError) as caught:
            await api.get_buddy("buddy_1")
    assert caught.value.status == 500 and len(seen) == 4


@pytest.mark.parametrize("status", [400, 401, 403, 409, 422])
async def test_4xx_is_final(status: int) -> None:
    seen: list[httpx.Request] = []
    async with client([fail(status, "nope"), ok(REST_BUDDY)], seen) as api:
        with pytest.raises(HatchedAPIError) as caught:
            await api.get_buddy("buddy_1")
    assert caught.value.status == status and caught.value.code == "nope" and len(seen) == 1


async def test_429_retried_after_retry_after() -> None:
    seen: list[httpx.Request] = []
    async with client([fail(429, **{"Retry-After": "0"}), ok(REST_BUDDY)], seen) as api:
        assert await api.get_buddy("buddy_1") is not None
    assert len(seen) == 2


async def test_429_longer_than_allowed_is_raised_at_once() -> None:
    seen: list[httpx.Request] = []
    script: Script = [fail(429, **{"Retry-After": "3600"}), ok(REST_BUDDY)]
    async with client(script, seen, max_retry_after_s=5) as api:
        with pytest.raises(RateLimited) as caught:
            await api.get_buddy("buddy_1")
    assert caught.value.retry_after_s == 3600 and len(seen) == 1


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (httpx.ReadTimeout("slow"), "timeout"),
        (httpx.ConnectError("refused"), "connection_error"),
    ],
)
async def test_transport_errors_retried_then_raised(exc: Exception, code: str) -> None:
    seen: list[httpx.Request] = []
    async with client([exc] * 4, seen) as api:
        with pytest.raises(HatchedUnavailable) as caught:
            await api.get_buddy("buddy_1")
    assert caught.value.code == code and caught.value.status is None and len(seen) == 4


async def test_hatch_not_retried_on_5xx_but_on_429() -> None:
    seen: list[httpx.Request] = []
    async with client([fail(500), ok({"operation_id": "op_1"})], seen) as api:
        with pytest.raises(HatchedAPIError):
            await api.hatch_egg("egg_1")
    assert len(seen) == 1
    seen.clear()
    script: Script = [fail(429, **{"Retry-After": "0"}), ok({"operationId": "op_1"}, 202)]
    async with client(script, seen) as api:
        assert (await api.hatch_egg("egg_1"))["operation_id"] == "op_1"
    assert len(seen) == 2


async def test_bootstrap_requests_and_answers() -> None:
    seen: list[httpx.Request] = []
    script: Script = [
        ok({"data": {"eggId": "egg_1", "status": "incubating", "buddyId": None}}, 201),
        ok({"egg_id": "egg_1", "status": "ready"}),
        ok({"data": {"status": "completed", "result": {"buddy_id": "b1"}}}),
        ok({"token": "t", "session_id": "s", "expires_at": "e", "scopes": ["read"]}, 201),
        ok({"token": "t2", "expires_at": "e2"}, 201),
    ]
    async with client(script, seen) as api:
        assert await api.ensure_egg("u1", "kids") == {
            "egg_id": "egg_1",
            "status": "incubating",
            "buddy_id": None,
        }
        assert (await api.mark_egg_ready("egg_1"))["status"] == "ready"
        assert (await api.get_operation("op_1"))["result"] == {"buddy_id": "b1"}
        assert (await api.create_widget_session("b1", "u1", ["read"], 600))["token"] == "t"
        assert (await api.create_embed_token("b1", "u1"))["token"] == "t2"
    requests = [(r.method, r.url.path, r.url.query.decode()) for r in seen]
    assert requests == [
        ("POST", "/v1/eggs", "ensure=true"),
        ("PATCH", "/v1/eggs/egg_1/status", ""),
        ("GET", "/v1/operations/op_1", ""),
        ("POST", "/v1/widget-sessions", ""),
        ("POST", "/v1/embed-tokens", ""),
    ]
    bodies = [json.loads(r.content) if r.content else None for r in seen]
    assert bodies[0] == {"user_id": "u1", "audience": "kids"}
    assert bodies[1] == {"status": "ready"}
    assert bodies[3] == {"buddy_id": "b1", "user_id": "u1", "scopes": ["read"], "ttl_seconds": 600}
    assert bodies[4] == {"buddy_id": "b1", "user_id": "u1"}


async def test_success_without_json_is_invalid_response() -> None:
    async with client([httpx.Response(200, text="<html>")]) as api:
        with pytest.raises(HatchedAPIError) as caught:
            await api.get_operation("op_1")
    assert caught.value.code == "invalid_response"


async def test_observer_sees_every_exchange() -> None:
    observed: list[tuple[str, int | None]] = []

    def observe(route: str, status: int | None, seconds: float) -> None:
        assert seconds >= 0
        observed.append((route, status))

    script: Script = [httpx.ConnectError("x"), fail(500), ok(REST_BUDDY)]
    async with client(script, on_request=observe) as api:
        await api.get_buddy("buddy_1")
    assert observed == [
        ("GET /buddies/{buddy_id}", None),
        ("GET /buddies/{buddy_id}", 500),
        ("GET /buddies/{buddy_id}", 200),
    ]


async def test_exhausted_budget_sends_nothing() -> None:
    class Empty(RedisTokenBucket):
        async def acquire(
            self, cost: int = 1, *, priority: bool = False, max_wait_s: float = 30
        ) -> bool:
            return False

    seen: list[httpx.Request] = []
    bucket = Empty(aioredis.Redis())
    async with client([ok(REST_BUDDY)], seen, bucket=bucket, budget_wait_s=0) as api:
        with pytest.raises(BudgetExhausted) as caught:
            await api.get_buddy("buddy_1")
    assert caught.value.code == "rate_budget_exhausted" and seen == []


def test_from_settings_needs_url_and_key() -> None:
    from tests.support.config import make_settings

    settings = make_settings("postgresql://x/y", "redis://x:1/0")
    with pytest.raises(ValueError):
        HatchedAPI.from_settings(settings)


# --- bucket sizing (no Redis needed: the script only runs on use) ---------------------------


@pytest.mark.parametrize(
    ("rate", "capacity", "reserve"),
    [(100, 16, 3.2), (60, 10, 2.0), (1000, 166, 33.2), (5, 1, 0.2)],
)
def test_bucket_sizing(rate: int, capacity: int, reserve: float) -> None:
    bucket = RedisTokenBucket(aioredis.Redis(), rate)
    assert bucket.capacity == capacity
    assert bucket.reserve == pytest.approx(reserve)
    # A full bucket plus one minute of refill is exactly the plan: never more in any minute.
    assert bucket.capacity + bucket.refill_per_s * 60 == pytest.approx(max(rate, capacity + 1))


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RedisTokenBucket(aioredis.Redis(), 0)
    with pytest.raises(ValueError):
        RedisTokenBucket(aioredis.Redis(), 60, reserve_ratio=1)


async def test_bucket_cost_bounds() -> None:
    bucket = RedisTokenBucket(aioredis.Redis(), 60)
    with pytest.raises(ValueError):
        await bucket.acquire(0)
    with pytest.raises(ValueError):
        await bucket.acquire(bucket.capacity + 1)
