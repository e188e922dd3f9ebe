"""The read cache never stores a read that raced with a change, and stays bounded."""

from __future__ import annotations

from service.cache import BuddyCache


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
