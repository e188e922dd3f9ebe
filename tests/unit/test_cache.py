"""The read cache never stores a read that raced with a change, and stays bounded."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from starlette.types import Message, Receive, Scope, Send

from service.read.cache import BuddyCache
from service.read.cached import CachedBuddyReads


def test_hit_after_put() -> None:
    cache = BuddyCache(10)
    token = cache.token("b1")
    cache.put("b1", token, '"b1.1"', b"{}")
    assert cache.get("b1") == ('"b1.1"', b"{}")


def test_a_change_during_the_read_is_not_cached() -> None:
    cache = BuddyCache(10)
    token = cache.token("b1")  # read starts
    cache.invalidate("b1")  # NOTIFY of a newer version arrives meanwhile
    cache.put("b1", token, '"b1.1"', b"old")
    assert cache.get("b1") is None


def test_reconnect_clears_and_refuses_reads_in_flight() -> None:
    cache = BuddyCache(10)
    cache.put("b1", cache.token("b1"), '"b1.1"', b"x")
    token = cache.token("b2")
    cache.clear()
    cache.put("b2", token, '"b2.1"', b"y")
    assert cache.get("b1") is None and cache.get("b2") is None


def test_invalidate_drops_the_entry_and_others_stay() -> None:
    cache = BuddyCache(10)
    for b in ("b1", "b2"):
        cache.put(b, cache.token(b), f'"{b}.1"', b"x")
    cache.invalidate("b1")
    assert cache.get("b1") is None and cache.get("b2") is not None


def test_bounded_lru() -> None:
    cache = BuddyCache(2)
    for b in ("b1", "b2", "b3"):
        cache.put(b, cache.token(b), b, b"x")
    assert cache.get("b1") is None and cache.get("b3") is not None


def test_disabled_cache_stores_nothing() -> None:
    cache = BuddyCache(0)
    cache.put("b1", cache.token("b1"), "t", b"x")
    assert not cache.enabled and cache.get("b1") is None


# The read fast path in front of the router (service/read/cached.py).

TOKEN = "read-token"


def _app_with(cache: BuddyCache, connected: bool = True) -> SimpleNamespace:
    listening = asyncio.Event()
    if connected:
        listening.set()
    broadcaster = SimpleNamespace(cache=cache, connected=listening)
    mirror = SimpleNamespace(broadcaster=broadcaster, settings=SimpleNamespace(api_tokens=[TOKEN]))
    return SimpleNamespace(state=SimpleNamespace(mirror=mirror))


async def _call(
    app: SimpleNamespace, path: str, headers: dict[str, str], method: str = "GET"
) -> tuple[list[Message], bool]:
    """What the fast path sends, and whether it handed the request on to the router."""
    sent: list[Message] = []
    routed = False

    async def router(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal routed
        routed = True

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "app": app,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    await CachedBuddyReads(router)(scope, receive, send)
    return sent, routed


def _warm() -> BuddyCache:
    cache = BuddyCache(10)
    cache.put("b1", cache.token("b1"), '"b1.3"', b'{"buddy_id":"b1"}')
    return cache


async def test_a_cached_buddy_is_answered_without_routing() -> None:
    sent, routed = await _call(
        _app_with(_warm()), "/v1/buddies/b1", {"Authorization": "Bearer " + TOKEN}
    )
    assert not routed
    assert sent[0] == {
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"etag", b'"b1.3"'),
            (b"cache-control", b"no-cache"),
            (b"content-length", b"17"),
            (b"content-type", b"application/json"),
        ],
    }
    assert sent[1] == {"type": "http.response.body", "body": b'{"buddy_id":"b1"}'}


async def test_a_matching_etag_is_304_without_routing() -> None:
    headers = {"Authorization": "Bearer " + TOKEN, "If-None-Match": 'W/"x", "b1.3"'}
    sent, routed = await _call(_app_with(_warm()), "/v1/buddies/b1", headers)
    assert not routed and sent[0]["status"] == 304 and sent[1]["body"] == b""


@pytest.mark.parametrize(
    ("path", "headers", "method", "connected"),
    [
        ("/v1/buddies/b1", {}, "GET", True),  # no token: the router's 401
        ("/v1/buddies/b1", {"Authorization": "Bearer wrong"}, "GET", True),
        ("/v1/buddies/b2", {"Authorization": "Bearer " + TOKEN}, "GET", True),  # a miss
        ("/v1/buddies/b1/ledger", {"Authorization": "Bearer " + TOKEN}, "GET", True),
        ("/v1/buddies/", {"Authorization": "Bearer " + TOKEN}, "GET", True),
        ("/v1/buddies/b1", {"Authorization": "Bearer " + TOKEN}, "POST", True),
        # Not listening for changes: the cache may be stale, so it is not used.
        ("/v1/buddies/b1", {"Authorization": "Bearer " + TOKEN}, "GET", False),
    ],
)
async def test_anything_else_goes_to_the_router(
    path: str, headers: dict[str, str], method: str, connected: bool
) -> None:
    sent, routed = await _call(_app_with(_warm(), connected), path, headers, method)
    assert routed and sent == []
