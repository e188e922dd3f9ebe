"""Hostile and malformed reads: odd numerals, forged cursors, NUL and non-latin-1 ids, trailing
slashes. Every answer is a problem or a success; never a 500, never a redirect."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from service import store
from service.config import Settings
from tests.support.config import ADMIN_TOKEN, API_TOKEN

READ = {"Authorization": f"Bearer {API_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SNOW = "buddy_snow☃"


@pytest.fixture
async def http(settings: Settings, server: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server, timeout=10) as client:
        yield client


def _cursor(key: object) -> str:
    # json, not orjson: a forged cursor may hold integers orjson refuses to write.
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


def _problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code


@pytest.mark.parametrize("limit", ["%C2%B2", "%D9%A3", "1e1", "+5", "-1", "0", "201", "9" * 40])
async def test_limit_takes_only_ascii_integers(http: httpx.AsyncClient, limit: str) -> None:
    for path in ("/v1/buddies", "/v1/deliveries"):
        headers = ADMIN if path == "/v1/deliveries" else READ
        _problem(await http.get(f"{path}?limit={limit}", headers=headers), 400, "invalid_parameter")


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/v1/buddies/b/ledger", ["not-a-date", 1]),
        ("/v1/buddies/b/ledger", ["2026-01-01T00:00:00", 1]),
        ("/v1/buddies/b/ledger", ["2026-01-01T00:00:00+00:00", 2**70]),
        ("/v1/buddies/b/ledger", ["2026-01-01T00:00:00+00:00", -1]),
        ("/v1/buddies/b/events", [2**64]),
        ("/v1/buddies/b/events", [True]),
        ("/v1/buddies", ["a\x00b"]),
        ("/v1/buddies", ["x" * 300]),
        ("/v1/buddies", [{"a": 1}]),
        ("/v1/deliveries", [1.5]),
    ],
)
async def test_forged_cursors_are_invalid_cursor(
    http: httpx.AsyncClient, db: store.Pool, path: str, key: object
) -> None:
    await db.execute("INSERT INTO buddies (buddy_id) VALUES ('b')")
    headers = ADMIN if path == "/v1/deliveries" else READ
    response = await http.get(path, params={"cursor": _cursor(key)}, headers=headers)
    _problem(response, 400, "invalid_cursor")


async def test_an_over_long_cursor_is_refused_undecoded(http: httpx.AsyncClient) -> None:
    # Past the app's bound on a cursor (MAX_CURSOR_CHARS), within the server's on a request
    # head (16 KB by default; past it the server answers 431 before the app sees it).
    response = await http.get("/v1/buddies", params={"cursor": "A" * 10_000}, headers=READ)
    _problem(response, 400, "invalid_cursor")


async def test_a_ledger_cursor_this_api_issued_still_works(
    http: httpx.AsyncClient, db: store.Pool
) -> None:
    await db.execute("INSERT INTO buddies (buddy_id) VALUES ('b')")
    key = ["2026-01-01T00:00:00+00:00", 5]
    response = await http.get("/v1/buddies/b/ledger", params={"cursor": _cursor(key)}, headers=READ)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "path",
    [
        "/v1/buddies/a%00b",
        "/v1/buddies/a%00b/ledger",
        "/v1/buddies/a%00b/events",
        "/v1/buddies/a%00b/stream",
        "/v1/buddies/a%01b/stream",
        "/v1/buddies/a%0Ab",
        "/v1/users/u%00v/buddy",
        "/v1/buddies/" + "x" * 300,
    ],
)
async def test_ids_no_buddy_can_have_are_400_on_every_route(
    http: httpx.AsyncClient, db: store.Pool, path: str
) -> None:
    _problem(await http.get(path, headers=READ), 400, "invalid_parameter")


async def test_admin_routes_refuse_impossible_ids(http: httpx.AsyncClient, db: store.Pool) -> None:
    replay = await http.post("/v1/deliveries/a%00b/replay", headers=ADMIN)
    _problem(replay, 400, "invalid_parameter")
    refresh = await http.post("/v1/buddies/a%00b/refresh", headers=ADMIN)
    assert refresh.status_code in (400, 409), refresh.text


async def test_a_non_latin1_buddy_id_has_a_header_safe_etag(
    http: httpx.AsyncClient, db: store.Pool
) -> None:
    await db.execute("INSERT INTO buddies (buddy_id) VALUES ($1)", SNOW)
    path = "/v1/buddies/" + SNOW
    first = await http.get(path, headers=READ)
    assert first.status_code == 200, first.text
    assert first.json()["buddy_id"] == SNOW
    tag = first.headers["etag"]
    assert tag.isascii() and tag.startswith('"') and "☃" not in tag
    again = await http.get(path, headers=READ)  # from the read cache, if it is live
    assert again.status_code == 200 and again.headers["etag"] == tag
    assert (await http.get(path, headers={**READ, "If-None-Match": tag})).status_code == 304
    events = await http.get(path + "/events", headers=READ)
    assert events.status_code == 200
    async with http.stream("GET", path + "/stream", headers=READ) as stream:
        assert stream.status_code == 200
        async for line in stream.aiter_lines():
            if line.startswith("data:"):
                assert orjson.loads(line[5:])["buddy_id"] == SNOW
                break


async def test_plain_ids_keep_their_etag(http: httpx.AsyncClient, db: store.Pool) -> None:
    await db.execute("INSERT INTO buddies (buddy_id) VALUES ('buddy_01HXA7Q2M9K3')")
    response = await http.get("/v1/buddies/buddy_01HXA7Q2M9K3", headers=READ)
    assert response.headers["etag"] == '"buddy_01HXA7Q2M9K3.1"'


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/buddies/"),
        ("GET", "/v1/buddies/b/"),
        ("POST", "/webhooks/hatched/"),
        ("GET", "/healthz/"),
    ],
)
async def test_no_redirects_and_no_url_from_host(
    http: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await http.request(
        method, path, headers={**READ, "Host": "evil.example"}, follow_redirects=False
    )
    assert response.status_code == 404, response.text
    assert "location" not in response.headers
    assert "evil.example" not in response.text
    assert response.headers["content-type"] == "application/problem+json"


async def test_the_demo_page_is_locked_down(settings: Settings) -> None:
    from service.app import create_app
    from tests.support.running import serving

    async with serving(create_app(settings, demo=True)) as url, httpx.AsyncClient() as client:
        response = await client.get(f"{url}/demo")
    assert response.status_code == 200
    assert response.headers["x-frame-options"] == "DENY"
    policy = dict(
        part.strip().split(" ", 1)
        for part in response.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert "'unsafe-inline'" not in response.headers["content-security-policy"]
    # The inline script the page carries is the one the policy allows, by hash.
    script = response.text.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in policy["script-src"]
    # The token is read from the fragment only (a query string reaches logs and Referer).
    assert 'get("token")' in script and 'params.get("token")' not in script
