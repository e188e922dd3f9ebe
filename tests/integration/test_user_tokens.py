"""User tokens: HS256 JWTs minted with a standard library, scoped to one user (and audience),
held to the contract on every route of the table; real Postgres, Redis and worker."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from starlette.routing import Route
from starlette.types import Message

from service import store
from service.app import create_app
from service.auth.user_tokens import UserTokens
from service.config import Settings
from service.dev.samples import build_delivery
from service.read.cached import FastBuddyReads
from service.read.schemas import BuddyOut, BuddyPage, ProblemOut, UserTokenOut
from tests.support.config import ADMIN_TOKEN, API_TOKEN, SECRET, make_settings
from tests.support.fake_hatched import DEFAULT_API_KEY, FakeHatched, buddy_json, serve_fake
from tests.support.harness import Process, free_port, serve, service_env, wait_for_http
from tests.support.running import running_worker, serving, wait_settled
from tests.support.scrape import sample

# 64 bytes: long enough for HS384 too, so PyJWT does not warn about the key when a test signs
# with the wrong algorithm on purpose.
KEY = "user-token-signing-key-" + "k" * 41
OLD_KEY = "user-token-retired-key-" + "o" * 41
OTHER_KEY = "a-key-the-mirror-never-had-" + "x" * 37
READ = {"Authorization": f"Bearer {API_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

# The contract's table, written out here so the test does not read it from the code it checks.
BUDDY_ROUTES = {
    "/v1/buddies/{buddy_id}",
    "/v1/buddies/{buddy_id}/ledger",
    "/v1/buddies/{buddy_id}/events",
    "/v1/buddies/{buddy_id}/stream",
}
USER_ROUTES = {
    ("GET", "/v1/users/{user_id}/buddy"),
    ("POST", "/v1/users/{user_id}/buddy"),
    ("GET", "/v1/users/{user_id}/buddy/stream"),
    ("POST", "/v1/users/{user_id}/widget-session"),
    ("POST", "/v1/users/{user_id}/embed-token"),
}


def token(sub: str | None = "user_a", *, key: str = KEY, alg: str = "HS256", **claims: Any) -> str:
    """A user token as any backend mints one; a claim given as None is left out."""
    now = int(time.time())
    payload = {"iss": "hatched-mirror", "sub": sub, "iat": now, "exp": now + 300, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm=alg)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def unsigned(sub: str = "user_a") -> str:
    """`alg: none`: a token anyone can write."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    claims = {"iss": "hatched-mirror", "sub": sub, "exp": int(time.time()) + 300}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.request.url, response.text)
    assert response.headers["content-type"] == "application/problem+json"
    assert ProblemOut.model_validate(response.json()).code == code
    body: dict[str, Any] = response.json()
    return body


def user_settings(migrated: str, redis_url: str, **overrides: Any) -> Settings:
    values = {"MIRROR_USER_TOKEN_SECRETS": KEY, "MIRROR_USER_TOKEN_MAX_TTL_S": "3600", **overrides}
    return make_settings(migrated, redis_url, **values)


@pytest.fixture
async def settings(db: store.Pool, migrated: str, redis_url: str, redis: Any) -> Settings:
    return user_settings(migrated, redis_url)


@pytest.fixture
async def http(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as client:
        yield client


async def post(http: httpx.AsyncClient, event_type: str, buddy_id: str, **data: Any) -> None:
    headers, body = build_delivery(event_type, "v2", secret=SECRET, buddy_id=buddy_id, data=data)
    response = await http.post("/webhooks/hatched", content=body, headers=headers)
    assert response.status_code == 202, response.text


@pytest.fixture
async def seeded(settings: Settings, http: httpx.AsyncClient, db: store.Pool) -> None:
    """user_a: buddy_a1, buddy_a2 (audience kids); user_b: buddy_b1, buddy_b2 (kids)."""
    async with running_worker(settings):
        for buddy_id, user_id, audience, day in (
            ("buddy_a1", "user_a", None, 1),
            ("buddy_a2", "user_a", "kids", 2),
            ("buddy_b1", "user_b", None, 3),
            ("buddy_b2", "user_b", "kids", 4),
        ):
            occurred = f"2026-05-0{day}T00:00:00Z"
            await post(
                http,
                "buddy.hatched",
                buddy_id,
                user_id=user_id,
                audience=audience,
                occurred_at=occurred,
            )
        await post(http, "coins.earned", "buddy_b1", amount=5, balance=5)
        await wait_settled(db)


def concrete(path: str, buddy_id: str, user_id: str) -> str:
    path = path.replace("{buddy_id}", buddy_id).replace("{user_id}", user_id)
    return re.sub(r"\{[^}]+\}", "x", path)


async def status_of(http: httpx.AsyncClient, method: str, url: str, **kw: Any) -> httpx.Response:
    """The answer's head only: a stream's body never ends."""
    async with http.stream(method, url, **kw) as response:
        if response.headers.get("content-type", "").startswith("application/"):
            await response.aread()
        return response


async def missing_buddy_answer(http: httpx.AsyncClient, sub: str, buddy_id: str) -> Any:
    """What an API token gets for a buddy that does not exist, for `buddy_id`."""
    missing = await http.get(f"/v1/buddies/nobody{sub}", headers=READ)
    body = problem(missing, 404, "buddy_not_found")
    return json.loads(json.dumps(body).replace("nobody", buddy_id))


async def test_a_token_never_reaches_another_user_on_any_route(
    settings: Settings, http: httpx.AsyncClient, seeded: None
) -> None:
    """Walk the whole route table with user_a's token, at user_b's buddies and user id: another
    user's buddy is a missing one, another user's path is 403, every other route is 403."""
    mine = bearer(token("user_a"))
    routes = [r for r in create_app(settings).routes if isinstance(r, Route)]
    assert len(routes) >= 15
    seen_user_routes = set()
    for route in routes:
        for method in sorted((route.methods or set()) - {"HEAD"}):
            theirs = concrete(route.path, "buddy_b1", "user_b")
            own = concrete(route.path, "buddy_a1", "user_a")
            if route.path in BUDDY_ROUTES:
                for url, kw in ((theirs, {"headers": mine}), (theirs, {})):
                    if not kw:  # the same through the query, on a stream
                        if not route.path.endswith("/stream"):
                            continue
                        url = f"{url}?access_token={token('user_a')}"
                    answer = await status_of(http, method, url, **kw)
                    body = problem(answer, 404, "buddy_not_found")
                    assert body == await missing_buddy_answer(http, "", "buddy_b1")
                answer = await status_of(http, method, own, headers=mine)
                assert answer.status_code == 200, (own, answer.status_code)
            elif (method, route.path) in USER_ROUTES:
                seen_user_routes.add((method, route.path))
                problem(await status_of(http, method, theirs, headers=mine), 403, "forbidden")
                # Its own user: as with an API token (no Hatched API here: 409 for bootstrap).
                as_token = await status_of(http, method, own, headers=mine)
                as_api = await status_of(http, method, own, headers=READ)
                assert as_token.status_code == as_api.status_code != 403, (method, own)
            elif route.path == "/v1/buddies":
                listed = await http.get("/v1/buddies", params={"user_id": "user_b"}, headers=mine)
                problem(listed, 403, "forbidden")
            else:
                # Admin, /v1/user-tokens, operations: whatever the ids, a user token may not.
                for url in (theirs, own):
                    problem(await status_of(http, method, url, headers=mine), 403, "forbidden")
    assert seen_user_routes == USER_ROUTES


async def test_api_and_admin_tokens_keep_working(http: httpx.AsyncClient, seeded: None) -> None:
    page = BuddyPage.model_validate((await http.get("/v1/buddies", headers=READ)).json())
    assert len(page.data) == 4
    assert (await http.get("/v1/buddies/buddy_b1", headers=READ)).status_code == 200
    assert (await http.get("/v1/deliveries", headers=ADMIN)).status_code == 200
    problem(await http.get("/v1/deliveries", headers=READ), 401, "unauthorized")


async def test_the_listing_holds_only_the_token_users_buddies(
    http: httpx.AsyncClient, seeded: None
) -> None:
    mine = bearer(token("user_a"))
    page = BuddyPage.model_validate((await http.get("/v1/buddies", headers=mine)).json())
    assert [b.buddy_id for b in page.data] == ["buddy_a1", "buddy_a2"]
    first = await http.get("/v1/buddies", params={"limit": 1}, headers=mine)
    cursor = first.json()["next_cursor"]
    rest = await http.get("/v1/buddies", params={"limit": 1, "cursor": cursor}, headers=mine)
    assert [b["buddy_id"] for b in rest.json()["data"]] == ["buddy_a2"]
    assert rest.json()["next_cursor"] is None
    same = await http.get("/v1/buddies", params={"user_id": "user_a"}, headers=mine)
    assert [b["buddy_id"] for b in same.json()["data"]] == ["buddy_a1", "buddy_a2"]
    kids = await http.get("/v1/buddies", params={"audience": "kids"}, headers=mine)
    assert [b["buddy_id"] for b in kids.json()["data"]] == ["buddy_a2"]
    # A repeated user_id cannot smuggle another user past the check.
    twice = await http.get("/v1/buddies?user_id=user_a&user_id=user_b", headers=mine)
    problem(twice, 403, "forbidden")


async def test_an_audience_token_sees_only_that_audience(
    http: httpx.AsyncClient, seeded: None
) -> None:
    kids = bearer(token("user_a", audience="kids"))
    assert (await http.get("/v1/buddies/buddy_a2", headers=kids)).status_code == 200
    body = problem(await http.get("/v1/buddies/buddy_a1", headers=kids), 404, "buddy_not_found")
    assert body == await missing_buddy_answer(http, "", "buddy_a1")
    problem(await http.get("/v1/buddies/buddy_b2", headers=kids), 404, "buddy_not_found")
    for sub in ("ledger", "events"):
        answer = await http.get(f"/v1/buddies/buddy_a1/{sub}", headers=kids)
        problem(answer, 404, "buddy_not_found")
    page = (await http.get("/v1/buddies", headers=kids)).json()
    assert [b["buddy_id"] for b in page["data"]] == ["buddy_a2"]
    problem(
        await http.get("/v1/buddies", params={"audience": "adults"}, headers=kids), 403, "forbidden"
    )
    # The user's buddy for the token's audience, not the most recent of any.
    own = await http.get("/v1/users/user_a/buddy", headers=kids)
    assert BuddyOut.model_validate(own.json()).buddy_id == "buddy_a2"
    other = await http.get("/v1/users/user_a/buddy", params={"audience": "x"}, headers=kids)
    problem(other, 403, "forbidden")
    # Without an audience, every buddy of the user.
    anyone = bearer(token("user_a"))
    assert (await http.get("/v1/buddies/buddy_a1", headers=anyone)).status_code == 200
    assert (await http.get("/v1/buddies/buddy_a2", headers=anyone)).status_code == 200


async def test_cached_buddies_keep_to_their_user(http: httpx.AsyncClient, seeded: None) -> None:
    """The fast path in front of the router holds buddy_b1 after the first reads; user_a's
    token still gets exactly the answer for a buddy that does not exist, every time."""
    for _ in range(2):  # the second API read is answered from the cache
        assert (await http.get("/v1/buddies/buddy_b1", headers=READ)).status_code == 200
    theirs = bearer(token("user_b"))
    routed = await http.get("/v1/buddies/buddy_b1", headers=theirs)
    cached = await http.get("/v1/buddies/buddy_b1", headers=theirs)
    assert routed.status_code == cached.status_code == 200
    assert routed.content == cached.content and routed.headers["etag"] == cached.headers["etag"]
    conditional = {**theirs, "If-None-Match": cached.headers["etag"]}
    assert (await http.get("/v1/buddies/buddy_b1", headers=conditional)).status_code == 304
    expected = await missing_buddy_answer(http, "", "buddy_b1")
    for mine in (
        token("user_a"),
        token("user_a", audience="kids"),
        token("user_b", audience="kids"),
    ):
        for _ in range(3):
            answer = await http.get("/v1/buddies/buddy_b1", headers=bearer(mine))
            assert problem(answer, 404, "buddy_not_found") == expected
            assert "etag" not in answer.headers


def without_transport(r: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """An answer less what differs between any two answers (date, server, request id)."""
    skip = {"date", "server", "x-request-id"}
    return r.status_code, [h for h in r.headers.multi_items() if h[0] not in skip], r.content


async def test_a_remembered_token_on_a_cached_buddy_is_answered_as_the_stack_does(
    http: httpx.AsyncClient, seeded: None
) -> None:
    """The second read of a cached buddy with the same user token is answered in front of
    every middleware (service/read/cached.py, FastBuddyReads): the same bytes and headers, a
    request id, the same 304, counted in the same HTTP metrics; another user's token still
    gets the missing buddy's answer."""
    assert (await http.get("/v1/buddies/buddy_a1", headers=READ)).status_code == 200  # cached
    mine = bearer(token("user_a"))
    first = await http.get("/v1/buddies/buddy_a1", headers=mine)  # verified by the guard
    before = (await http.get("/metrics")).text
    again = await http.get("/v1/buddies/buddy_a1", headers={**mine, "X-Request-ID": "r-9"})
    assert first.status_code == 200 and without_transport(again) == without_transport(first)
    assert again.headers["x-request-id"] == "r-9"
    generated = await http.get("/v1/buddies/buddy_a1", headers={**mine, "X-Request-ID": "a b"})
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
    conditional = {**mine, "If-None-Match": first.headers["etag"]}
    unchanged = await http.get("/v1/buddies/buddy_a1", headers=conditional)
    assert unchanged.status_code == 304 and unchanged.content == b""
    assert (
        unchanged.headers["etag"] == first.headers["etag"] and "x-request-id" in unchanged.headers
    )
    assert (await http.get("/v1/buddies/buddy_a1", headers=READ)).status_code == 200
    after = (await http.get("/metrics")).text

    def counted(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    route = "/v1/buddies/{buddy_id}"
    total = "hatched_mirror_http_requests_total"
    assert counted(total, method="GET", route=route, status="200") == 3
    assert counted(total, method="GET", route=route, status="304") == 1
    assert counted("hatched_mirror_http_request_seconds_count", route=route, status="200") == 3
    # user_b's token, remembered too, at user_a's cached buddy: the answer for a missing one.
    theirs = bearer(token("user_b"))
    assert (await http.get("/v1/buddies/buddy_b1", headers=theirs)).status_code == 200
    expected = await missing_buddy_answer(http, "", "buddy_a1")
    for _ in range(2):
        answer = await http.get("/v1/buddies/buddy_a1", headers=theirs)
        assert problem(answer, 404, "buddy_not_found") == expected


async def test_a_remembered_token_that_expired_is_token_expired(
    http: httpx.AsyncClient, seeded: None
) -> None:
    assert (await http.get("/v1/buddies/buddy_a1", headers=READ)).status_code == 200
    brief = bearer(token("user_a", exp=int(time.time()) + 2))
    for _ in range(2):  # verified, then answered from the remembered verdict
        assert (await http.get("/v1/buddies/buddy_a1", headers=brief)).status_code == 200
    await asyncio.sleep(max(0.0, int(time.time()) + 2.1 - time.time()) + 1)
    for _ in range(2):
        answer = await http.get("/v1/buddies/buddy_a1", headers=brief)
        problem(answer, 401, "token_expired")


async def test_cached_reads_carry_the_cors_headers_of_the_stack(
    migrated: str, redis_url: str, db: store.Pool, seeded: None
) -> None:
    settings = user_settings(migrated, redis_url, MIRROR_CORS_ORIGINS="https://app.example")
    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/v1/buddies/buddy_a1", headers=READ)).status_code == 200
        mine = bearer(token("user_a"))
        for origin in ({"Origin": "https://app.example"}, {"Origin": "https://evil.example"}, {}):
            for credentials in (mine, READ):
                headers = {**credentials, **origin}
                # With a new token the stack answers first; the same read again, in front.
                first = await client.get("/v1/buddies/buddy_a1", headers=headers)
                again = await client.get("/v1/buddies/buddy_a1", headers=headers)
                assert first.status_code == 200
                assert without_transport(again) == without_transport(first), origin
            mine = bearer(token("user_a", n=len(origin)))
        allowed = {**READ, "Origin": "https://app.example"}
        answer = await client.get("/v1/buddies/buddy_a1", headers=allowed)
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        assert answer.headers["access-control-expose-headers"] == "ETag"


async def test_only_good_tokens_on_cached_buddies_skip_the_stack(
    settings: Settings, seeded: None
) -> None:
    """In process, on the real app's cache (filled from Postgres): what FastBuddyReads answers
    itself, and what it leaves to the middleware stack behind it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        state = app.state.mirror
        await asyncio.wait_for(state.broadcaster.connected.wait(), 10)
        tokens = UserTokens(settings.user_token_secrets, settings.user_token_max_ttl_s)
        mine, theirs, fresh = token("user_a"), token("user_b"), token("user_a", n=1)
        tokens.verify(mine)
        tokens.verify(theirs)

        async def through(path: str, *headers: tuple[bytes, bytes], query: bytes = b"") -> Any:
            sent: list[Message] = []
            reached: list[str] = []

            async def stack(scope: Any, receive: Any, send: Any) -> None:
                reached.append(scope["path"])
                await app(scope, receive, send)

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b""}

            async def send(message: Message) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "method": "GET",
                "path": path,
                "root_path": "",
                "query_string": query,
                "headers": [(b"host", b"mirror"), *headers],
                "app": app,
            }
            await FastBuddyReads(stack, tokens=tokens)(scope, receive, send)
            return ("stack" if reached else "fast"), sent[0]["status"]

        def auth(value: str) -> tuple[bytes, bytes]:
            return (b"authorization", f"Bearer {value}".encode())

        assert await through("/v1/buddies/buddy_a1", auth(API_TOKEN)) == ("stack", 200)  # miss
        assert await through("/v1/buddies/buddy_a1", auth(API_TOKEN)) == ("fast", 200)
        assert await through("/v1/buddies/buddy_a1", auth(mine)) == ("fast", 200)
        tag = (b"if-none-match", b'"buddy_a1.1"')
        assert await through("/v1/buddies/buddy_a1", auth(mine), tag) == ("fast", 304)
        for left, status in (
            (through("/v1/buddies/buddy_a1", auth(theirs)), 404),
            (through("/v1/buddies/buddy_a1", auth(fresh)), 200),  # never verified here
            (through("/v1/buddies/buddy_a1", auth(ADMIN_TOKEN)), 401),
            (through("/v1/buddies/buddy_a1"), 401),
            (through("/v1/buddies/buddy_a1", auth(mine), auth(API_TOKEN)), 200),
            (through("/v1/buddies/buddy_a1", auth(mine), tag, tag), 304),
            (through("/v1/buddies/buddy_a1", auth(mine), query=b"x=1"), 200),
            (through("/v1/buddies/buddy_nope", auth(API_TOKEN)), 404),
        ):
            assert await left == ("stack", status)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("wrong issuer", lambda: token(iss="someone-else")),
        ("no issuer", lambda: token(iss=None)),
        ("no exp", lambda: token(exp=None)),
        ("no sub", lambda: token(None)),
        ("a number for sub", lambda: token(7)),  # type: ignore[arg-type]
        ("alg none", unsigned),
        ("HS384", lambda: token(alg="HS384")),
        ("HS512", lambda: token(alg="HS512")),
        ("wrong key", lambda: token(key=OTHER_KEY)),
        ("exp beyond the max TTL after iat", lambda: token(exp=int(time.time()) + 3601)),
        (
            "exp beyond the max TTL after now",
            lambda: token(iat=None, exp=int(time.time()) + 3700),
        ),
        ("a number for audience", lambda: token(audience=3)),
        ("not a JWT", lambda: "not.a.jwt"),
        ("garbage", lambda: "x" * 5000),
    ],
)
async def test_bad_tokens_are_unauthorized(
    http: httpx.AsyncClient, seeded: None, name: str, bad: Any
) -> None:
    value = bad()
    problem(await http.get("/v1/buddies/buddy_a1", headers=bearer(value)), 401, "unauthorized")
    stream = await status_of(http, "GET", f"/v1/buddies/buddy_a1/stream?access_token={value}")
    problem(stream, 401, "unauthorized")


async def test_expired_tokens_are_token_expired(http: httpx.AsyncClient, seeded: None) -> None:
    now = int(time.time())
    expired = token(iat=now - 100, exp=now - 1)
    for _ in range(2):
        answer = await http.get("/v1/buddies/buddy_a1", headers=bearer(expired))
        problem(answer, 401, "token_expired")
    # Verified once, remembered until exp: then expired, not served from the memory of it.
    short = token(iat=now, exp=now + 2)
    assert (await http.get("/v1/buddies/buddy_a1", headers=bearer(short))).status_code == 200
    await asyncio.sleep(max(0.0, now + 2 - time.time()) + 0.05)
    problem(await http.get("/v1/buddies/buddy_a1", headers=bearer(short)), 401, "token_expired")


async def test_a_rotated_key_still_verifies_and_the_first_signs(
    migrated: str, redis_url: str, db: store.Pool, seeded: None
) -> None:
    settings = user_settings(migrated, redis_url, MIRROR_USER_TOKEN_SECRETS=f"{KEY},{OLD_KEY}")
    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
        for key in (KEY, OLD_KEY):
            answer = await http.get("/v1/buddies/buddy_a1", headers=bearer(token(key=key)))
            assert answer.status_code == 200
        problem(
            await http.get("/v1/buddies/buddy_a1", headers=bearer(token(key=OTHER_KEY))),
            401,
            "unauthorized",
        )
        minted = await http.post("/v1/user-tokens", json={"user_id": "user_a"}, headers=READ)
        claims = jwt.decode(minted.json()["token"], KEY, algorithms=["HS256"])
        assert claims["sub"] == "user_a"
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(minted.json()["token"], OLD_KEY, algorithms=["HS256"])


async def test_access_token_is_for_user_tokens_on_streams_only(
    http: httpx.AsyncClient, seeded: None
) -> None:
    own = token("user_a")
    stream = await status_of(http, "GET", f"/v1/buddies/buddy_a1/stream?access_token={own}")
    assert stream.status_code == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    for service_token in (API_TOKEN, ADMIN_TOKEN):
        url = f"/v1/buddies/buddy_a1/stream?access_token={service_token}"
        problem(await status_of(http, "GET", url), 401, "unauthorized")
        problem(await status_of(http, "GET", url, headers=READ), 401, "unauthorized")
    for url in (
        "/v1/buddies/buddy_a1",
        "/v1/buddies/buddy_a1/ledger",
        "/v1/buddies",
        "/v1/users/user_a/buddy",
        "/v1/deliveries",
    ):
        problem(await http.get(f"{url}?access_token={own}"), 401, "unauthorized")
        # Not even beside a good header.
        answer = await http.get(f"{url}?access_token={own}", headers=bearer(own))
        problem(answer, 401, "unauthorized")
    user_stream = await status_of(
        http, "GET", f"/v1/users/user_b/buddy/stream?access_token={token('user_b')}"
    )
    problem(user_stream, 409, "hatched_api_not_configured")  # admitted: it is user_b's own


async def test_a_stream_with_a_query_token_sees_the_buddy_change(
    settings: Settings, http: httpx.AsyncClient, seeded: None, db: store.Pool
) -> None:
    url = f"/v1/buddies/buddy_a1/stream?access_token={token('user_a')}"
    async with running_worker(settings), http.stream("GET", url, timeout=10) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        seen: list[dict[str, Any]] = []

        async def next_buddy() -> dict[str, Any]:
            async for line in lines:
                if line.startswith("data:"):
                    buddy: dict[str, Any] = json.loads(line[5:])
                    return buddy
            raise AssertionError("the stream ended")

        seen.append(await next_buddy())
        await post(http, "coins.earned", "buddy_a1", amount=7, balance=7)
        seen.append(await next_buddy())
    assert seen[0]["buddy_id"] == "buddy_a1"
    assert seen[1]["coins"] == 7 and seen[1]["version"] == seen[0]["version"] + 1


async def test_mint_route(http: httpx.AsyncClient, seeded: None) -> None:
    before = int(time.time())
    minted = await http.post(
        "/v1/user-tokens", json={"user_id": "user_a", "audience": "kids"}, headers=READ
    )
    assert minted.status_code == 201, minted.text
    answer = UserTokenOut.model_validate(minted.json())
    assert (answer.user_id, answer.audience) == ("user_a", "kids")
    claims = jwt.decode(answer.token, KEY, algorithms=["HS256"], issuer="hatched-mirror")
    assert claims["sub"] == "user_a" and claims["audience"] == "kids"
    assert before <= claims["iat"] and claims["exp"] - claims["iat"] == 900
    expires = datetime.fromisoformat(answer.expires_at.replace("Z", "+00:00"))
    assert expires.timestamp() == claims["exp"]
    assert (await http.get("/v1/buddies/buddy_a2", headers=bearer(answer.token))).status_code == 200
    problem(
        await http.get("/v1/buddies/buddy_a1", headers=bearer(answer.token)), 404, "buddy_not_found"
    )

    plain = await http.post(
        "/v1/user-tokens", json={"user_id": "user_b", "ttl_seconds": 3600}, headers=READ
    )
    assert plain.status_code == 201 and plain.json()["audience"] is None
    claims = jwt.decode(plain.json()["token"], KEY, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 3600 and "audience" not in claims

    for body, name in (
        ({"user_id": "user_a", "ttl_seconds": 3601}, "ttl_seconds"),
        ({"user_id": "user_a", "ttl_seconds": 0}, "ttl_seconds"),
        ({"user_id": "user_a", "ttl_seconds": "60"}, "ttl_seconds"),
        ({"user_id": "user_a", "audience": 5}, "audience"),
        ({"user_id": ""}, "user_id"),
        ({}, "user_id"),
    ):
        refused = await http.post("/v1/user-tokens", json=body, headers=READ)
        assert name in problem(refused, 400, "invalid_parameter")["detail"]
    problem(
        await http.post("/v1/user-tokens", content=b"[1]", headers=READ), 400, "invalid_parameter"
    )
    problem(await http.post("/v1/user-tokens", json={"user_id": "u"}), 401, "unauthorized")
    problem(
        await http.post("/v1/user-tokens", json={"user_id": "u"}, headers=bearer(token())),
        403,
        "forbidden",
    )


async def test_mint_route_without_secrets_is_409(
    migrated: str, redis_url: str, db: store.Pool
) -> None:
    settings = make_settings(migrated, redis_url)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
        refused = await http.post("/v1/user-tokens", json={"user_id": "u"}, headers=READ)
        problem(refused, 409, "user_tokens_not_configured")
        # And no token is a user token then.
        problem(await http.get("/v1/buddies/x", headers=bearer(token())), 401, "unauthorized")
        spec = (await http.get("/openapi.json")).json()
        mint = spec["paths"]["/v1/user-tokens"]["post"]
        assert {"201", "400", "401", "409"} <= mint["responses"].keys()
        assert {"user": []} not in mint["security"]
        stream = spec["paths"]["/v1/buddies/{buddy_id}/stream"]["get"]
        assert {"user": []} in stream["security"]
        assert "access_token" in [p["name"] for p in stream["parameters"]]
        read = spec["paths"]["/v1/buddies/{buddy_id}"]["get"]
        assert {"user": []} in read["security"]
        assert "access_token" not in [p["name"] for p in read["parameters"]]
        assert spec["components"]["securitySchemes"]["user"]["bearerFormat"] == "JWT"


async def test_cors_preflight_allows_the_authorization_header(
    migrated: str, redis_url: str, db: store.Pool
) -> None:
    settings = user_settings(migrated, redis_url, MIRROR_CORS_ORIGINS="https://app.example")
    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
        preflight = await http.options(
            "/v1/buddies/x",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert preflight.status_code == 200
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        # A refusal still carries CORS headers, so the page can read why.
        refused = await http.get(
            "/v1/deliveries", headers={"Origin": "https://app.example", **bearer(token())}
        )
        problem(refused, 403, "forbidden")
        assert refused.headers["access-control-allow-origin"] == "https://app.example"


# --- bootstrap routes, against the fake Hatched API -------------------------------------------


@pytest.fixture
async def hatched(
    migrated: str, redis_url: str, db: store.Pool, redis: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, FakeHatched, Settings]]:
    fake = FakeHatched(hatch_delay_s=0.2)
    async with serve_fake(fake) as fake_url:
        settings = user_settings(
            migrated, redis_url, HATCHED_API_URL=fake_url, HATCHED_API_KEY=DEFAULT_API_KEY
        )
        async with (
            serving(create_app(settings)) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as http,
        ):
            yield http, fake, settings


async def test_bootstrap_and_minting_only_for_the_token_user(
    hatched: tuple[httpx.AsyncClient, FakeHatched, Settings], db: store.Pool
) -> None:
    http, fake, settings = hatched
    fake.set_buddy(buddy_json("buddy_w", "user_w"))
    async with running_worker(settings):
        await post(http, "buddy.hatched", "buddy_w", user_id="user_w")
        await wait_settled(db)
    own, other = bearer(token("user_w")), bearer(token("user_x"))
    found = await http.post("/v1/users/user_w/buddy", json={}, headers=own)
    assert found.status_code == 200 and found.json()["buddy_id"] == "buddy_w"
    session = await http.post("/v1/users/user_w/widget-session", headers=own)
    assert session.status_code == 200, session.text
    embed = await http.post("/v1/users/user_w/embed-token", headers=own)
    assert embed.status_code == 200, embed.text
    minted = (len(fake.widget_sessions), len(fake.embed_tokens))
    eggs = len(getattr(fake, "eggs", {}))
    for path in ("buddy", "widget-session", "embed-token"):
        problem(await http.post(f"/v1/users/user_w/{path}", headers=other), 403, "forbidden")
    problem(await http.post("/v1/users/user_y/buddy", json={}, headers=other), 403, "forbidden")
    assert (len(fake.widget_sessions), len(fake.embed_tokens)) == minted
    assert len(getattr(fake, "eggs", {})) == eggs

    # An audience-bound token mints for its audience only.
    kids = bearer(token("user_w", audience="kids"))
    adults = await http.post(
        "/v1/users/user_w/embed-token", json={"audience": "adults"}, headers=kids
    )
    problem(adults, 403, "forbidden")
    # Its own audience is imposed: user_w has no buddy for "kids".
    problem(await http.post("/v1/users/user_w/embed-token", headers=kids), 404, "buddy_not_found")
    assert (len(fake.widget_sessions), len(fake.embed_tokens)) == minted


# --- the service as users run it ------------------------------------------------------------


def test_tokens_in_urls_are_never_logged(
    migrated: str, redis_url: str, db: store.Pool, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    secret_token = token("user_a")
    env = service_env(migrated, redis_url, MIRROR_USER_TOKEN_SECRETS=KEY)
    with serve(env, log) as url:
        with httpx.stream(
            "GET", f"{url}/v1/buddies/nobody/stream?access_token={secret_token}"
        ) as response:
            assert response.status_code == 404
        refused = httpx.get(f"{url}/v1/buddies/nobody?access_token={secret_token}")
        assert refused.status_code == 401
        expired = token("user_a", iat=int(time.time()) - 60, exp=int(time.time()) - 1)
        answer = httpx.get(f"{url}/v1/buddies/x/stream", params={"access_token": expired})
        assert answer.status_code == 401 and answer.json()["code"] == "token_expired"
    text = log.read_text()
    assert secret_token not in text and expired not in text
    assert secret_token.split(".")[2] not in text


def test_serve_refuses_a_short_key_naming_the_variable(
    migrated: str, redis_url: str, tmp_path: Path
) -> None:
    env = service_env(migrated, redis_url, MIRROR_USER_TOKEN_SECRETS=f"{KEY},too-short")
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert b"MIRROR_USER_TOKEN_SECRETS" in done.stderr + done.stdout


def test_dev_prints_a_user_token_and_its_access_log_never_shows_one(
    migrated: str, redis_url: str, db: store.Pool, tmp_path: Path
) -> None:
    """`dev` writes uvicorn's access lines: a token in a stream's URL shows as [redacted]."""
    log = tmp_path / "dev.log"
    port = free_port()
    process = Process(["dev", "--port", str(port)], service_env(migrated, redis_url), log).start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while "bootstrap demo" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        printed = re.search(r"/demo#token=(\S+)", log.read_text())
        assert printed is not None
        demo_token = printed.group(1)
        assert jwt.decode(demo_token, options={"verify_signature": False})["sub"] == "demo_user_1"
        wait_for_http(
            f"{url}/healthz",
            within=max(0.0, deadline - time.monotonic()),
            why=lambda: log.read_text()[-3000:],
        )
        answer = httpx.get(f"{url}/v1/users/demo_user_1/buddy", headers=bearer(demo_token))
        assert answer.status_code == 404 and answer.json()["code"] == "buddy_not_found"
        with httpx.stream(
            "GET", f"{url}/v1/buddies/nobody/stream?access_token={demo_token}"
        ) as stream:
            assert stream.status_code == 404
        other = httpx.get(f"{url}/v1/users/someone_else/buddy", headers=bearer(demo_token))
        assert other.status_code == 403
    finally:
        process.stop()
    text = log.read_text()
    assert "access_token=[redacted]" in text
    # Printed twice at startup (the token line and the demo address), and nowhere else.
    assert text.count(demo_token) == 2
