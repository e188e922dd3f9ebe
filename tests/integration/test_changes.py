"""The change feed: entries written with the changes they describe, in commit order, read over
GET /v1/changes and /v1/changes/stream."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY

from service import store
from service.app import create_app
from service.apply.applier import ApplyLimits, drain_shards, rebuild_buddy
from service.apply.changes import FIELD_NAMES, Cause, diff, entry
from service.apply.projector import Buddy, public_view
from service.apply.worker import prune
from service.config import Settings
from service.dev.samples import build_delivery
from service.hatched.refresh import store_snapshot
from service.hatched.remote import RemoteBuddy
from service.ingest.signatures import signature_headers
from service.read.schemas import ChangePage
from tests.support.config import API_TOKEN, SECRET, make_settings
from tests.support.harness import run_command, service_env
from tests.support.running import running_worker, serving, wait_settled, wait_until
from tests.support.scenario import learning_day, signed

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
T0 = datetime(2026, 11, 1, tzinfo=UTC)
Delivery = tuple[dict[str, str], bytes]


@pytest.fixture
async def feed(db: store.Pool) -> store.Pool:
    await db.execute("TRUNCATE changes RESTART IDENTITY CASCADE")
    await db.execute("UPDATE changes_horizon SET txid = 0, id = 0")
    return db


@pytest.fixture
async def applier(feed: store.Pool, migrated: str) -> AsyncIterator[store.Pool]:
    """The worker's own connections (the shared test pool's prepared statements stay as other
    tests expect them)."""
    pool = await store.create_pool(migrated, size=2, timeout_s=10)
    yield pool
    await pool.close()


async def post(url: str, *deliveries: Delivery) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for headers, body in deliveries:
            r = await http.post("/webhooks/hatched", content=body, headers=headers)
            assert r.status_code in (200, 202), r.text


async def apply_all(pool: store.Pool, settings: Settings, batch_size: int = 500) -> None:
    """Apply what is stored, then wait until readers see its entries: a write transaction
    still open anywhere on the server (other databases included) holds newer ones back."""
    async with pool.acquire() as conn:
        await drain_shards(conn, list(range(settings.shards)), ApplyLimits(batch_size=batch_size))
    await visible(pool)


async def visible(pool: store.Pool) -> None:
    async def shown() -> bool:
        return not (await store.feed_bounds(pool)).held

    await wait_until(shown, within=20, interval=0.02)


async def changes(url: str, **params: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=AUTH) as http:
        r = await http.get("/v1/changes", params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    ChangePage.model_validate(body)
    return body


async def all_changes(url: str, **params: Any) -> list[dict[str, Any]]:
    return list((await changes(url, limit=1000, **params))["data"])


def delivery(kind: str, buddy_id: str, seconds: float, **data: Any) -> Delivery:
    return build_delivery(
        kind,
        "v2",
        secret=SECRET,
        buddy_id=buddy_id,
        occurred_at=T0 + timedelta(seconds=seconds),
        data={"occurred_at": (T0 + timedelta(seconds=seconds)).isoformat(), **data},
    )


def redelivered(original: Delivery, delivery_id: str) -> Delivery:
    """The same v1 event (same eventId) in another delivery."""
    headers, body = original
    envelope = {**orjson.loads(body), "deliveryId": delivery_id}
    raw = orjson.dumps(envelope)
    timestamp = int(headers["Hatched-Signature"].split(",")[0][2:])
    return {
        **headers,
        **signature_headers(raw, SECRET, timestamp, "v1"),
        "Hatched-Delivery-Id": delivery_id,
    }, raw


async def test_entries_for_real_changes_only_with_their_diffs(
    settings: Settings, server: str, feed: store.Pool, applier: store.Pool
) -> None:
    hatch = delivery("buddy.hatched", "buddy_f", 0, user_id="user_f", name="Pip")
    coins = delivery("coins.earned", "buddy_f", 10, amount=20, balance=20)
    skill = delivery("skill.leveled", "buddy_f", 20, skill_key="grammar", to_level=3, value=40)
    stale = delivery("skill.leveled", "buddy_f", 15, skill_key="grammar", to_level=2, value=10)
    for step in (hatch, coins, coins, skill, stale):  # `coins` twice: the receiver's duplicate
        await post(server, step)
        await apply_all(applier, settings)
    # v1: another delivery of an event already applied is a duplicate at apply time.
    v1 = build_delivery("badge.awarded", "v1", secret=SECRET, buddy_id="buddy_f", delivery_id="a")
    again = redelivered(v1, "b")
    for step in (v1, again):
        await post(server, step)
        await apply_all(applier, settings)

    entries = await all_changes(server)
    assert [e["version"] for e in entries] == [1, 2, 3, 4]
    found = await store.get_buddy(feed, "buddy_f")
    assert found is not None and found[1] == 4
    assert [e["cause"]["event_type"] for e in entries] == [
        "buddy.hatched",
        "coins.earned",
        "skill.leveled",
        "badge.awarded",
    ]
    assert all(e["cause"]["kind"] == "delivery" for e in entries)
    assert entries[0]["changed"]["name"] == {"from": None, "to": "Pip"}
    assert entries[0]["user_id"] == "user_f" and entries[0]["buddy_id"] == "buddy_f"
    assert entries[1]["changed"]["coins"] == {"from": None, "to": 20}
    assert set(entries[1]["changed"]) == {"coins", "last_event_at"}
    assert entries[2]["changed"]["skills"] == {
        "from": {},
        "to": {"grammar": {"value": 40, "level": 3}},
    }
    assert set(entries[3]["changed"]) >= {"badges"}
    for e in entries:
        assert not {"version", "updated_at"} & set(e["changed"])
        assert e["change_id"] == sorted(x["change_id"] for x in entries)[entries.index(e)]
    delivery_ids = await feed.fetch("SELECT delivery_id FROM deliveries ORDER BY seq")
    assert entries[3]["cause"]["delivery_id"] == "a"
    assert entries[0]["cause"]["delivery_id"] == delivery_ids[0]["delivery_id"]


async def test_refresh_rebuild_and_replay_are_causes(
    settings: Settings, server: str, feed: store.Pool, applier: store.Pool
) -> None:
    await post(server, delivery("buddy.hatched", "buddy_c", 0, name="Pip"))
    await apply_all(applier, settings)
    remote = RemoteBuddy.from_json({"id": "buddy_c", "name": "Pip", "coins": 55})
    await store_snapshot(feed, remote, shards=settings.shards)
    await apply_all(applier, settings)
    # Someone edits the mirror by hand; a rebuild from the stored deliveries undoes it.
    await feed.execute("UPDATE buddies SET name = 'Edited' WHERE buddy_id = 'buddy_c'")
    async with applier.acquire() as conn:
        assert await rebuild_buddy(conn, "buddy_c")
    await visible(feed)
    # A dead delivery, replayed once the cause is fixed (newer than the snapshot).
    later = (datetime.now(UTC) - T0).total_seconds() + 60
    await post(server, delivery("coins.earned", "buddy_c", later, amount=5, balance=60))
    await feed.execute("UPDATE delivery_states SET status = 'dead' WHERE status = 'accepted'")
    await store.requeue(feed, statuses=["dead"])
    await apply_all(applier, settings)

    entries = await all_changes(server, buddy_id="buddy_c")
    kinds = [e["cause"]["kind"] for e in entries]
    assert kinds == ["delivery", "refresh", "rebuild", "replay"]
    assert entries[1]["cause"]["event_type"] == "buddy.refreshed"
    assert entries[1]["changed"]["coins"] == {"from": None, "to": 55}
    assert entries[2]["cause"] == {"kind": "rebuild", "delivery_id": None, "event_type": None}
    assert entries[2]["changed"]["name"] == {"from": "Edited", "to": "Pip"}
    assert [e["version"] for e in entries] == [1, 2, 3, 4]


async def test_commit_order_not_allocation_order(
    settings: Settings, server: str, feed: store.Pool
) -> None:
    """Two transactions write entries; the one that allocated first commits last. A reader
    polling all the while never finds an entry sorted before one it has already passed."""
    seen: list[str] = []
    stop = asyncio.Event()

    async def poller() -> None:
        cursor = None
        async with httpx.AsyncClient(base_url=server, timeout=30, headers=AUTH) as http:
            while True:
                finishing = stop.is_set()
                params: dict[str, str] = {"after": cursor} if cursor else {}
                body = (await http.get("/v1/changes", params=params)).json()
                seen.extend(e["change_id"] for e in body["data"])
                cursor = body["next_cursor"]
                if finishing:
                    return
                await asyncio.sleep(0.005)

    def change(buddy_id: str) -> dict[str, Any]:
        buddy = Buddy(buddy_id=buddy_id, name=buddy_id)
        return entry(
            buddy, 1, Cause("delivery", f"d_{buddy_id}", "buddy.hatched"), diff(None, buddy)
        )

    task = asyncio.create_task(poller())
    async with feed.acquire() as first, feed.acquire() as second:
        t1 = first.transaction()
        await t1.start()
        await store.write_batch(first, feed=[change("buddy_early")])
        t2 = second.transaction()
        await t2.start()
        await store.write_batch(second, feed=[change("buddy_late")])
        await t2.commit()
        await asyncio.sleep(0.3)  # the poller reads while the older transaction is open
        assert seen == []
        await t1.commit()
    await visible(feed)
    await asyncio.sleep(0.1)
    stop.set()
    await task

    ids = await feed.fetch("SELECT buddy_id, id FROM changes ORDER BY id")
    assert [r["buddy_id"] for r in ids] == ["buddy_early", "buddy_late"]  # allocation order
    assert seen == sorted(seen) and len(seen) == len(set(seen)) == 2
    entries = await all_changes(server)
    assert [e["change_id"] for e in entries] == seen
    assert [e["buddy_id"] for e in entries] == ["buddy_early", "buddy_late"]


INSERT_BARE = (
    "INSERT INTO changes (buddy_id, version, cause_kind, changed) VALUES ($1, 1, 'delivery', '{}')"
)


async def test_a_change_is_timed_by_its_write_not_its_transaction_start(
    feed: store.Pool,
) -> None:
    """committed_at and the buddy's updated_at are one time, taken by the statement that writes
    them: the work before it in the transaction (claim, locks, projection) is not counted as
    part of the change's way to a reader."""
    buddy = Buddy(buddy_id="buddy_timed", name="Pip")
    change = entry(buddy, 1, Cause("delivery", "d_timed", "buddy.hatched"), diff(None, buddy))
    async with feed.acquire() as conn, conn.transaction():
        started = await conn.fetchval("SELECT now()")
        await asyncio.sleep(0.3)  # the apply's work before its write
        await store.write_batch(
            conn, buddies=[(buddy, 1)], changed=[("buddy_timed", 1)], feed=[change]
        )
        written = await conn.fetchval("SELECT clock_timestamp()")
    row = await feed.fetchrow(
        "SELECT c.committed_at, b.updated_at FROM changes AS c"
        " JOIN buddies AS b USING (buddy_id) WHERE buddy_id = 'buddy_timed'"
    )
    assert row is not None and row["committed_at"] == row["updated_at"]
    assert started + timedelta(seconds=0.3) <= row["committed_at"] <= written
    await feed.execute("DELETE FROM buddies WHERE buddy_id = 'buddy_timed'")


async def test_a_sequence_alone_would_break_the_order(feed: store.Pool) -> None:
    """The control: by allocation order alone, the later commit shows first."""
    async with feed.acquire() as first, feed.acquire() as second:
        t1 = first.transaction()
        await t1.start()
        await first.execute(INSERT_BARE, "a")
        await second.execute(INSERT_BARE, "b")
        visible = await feed.fetch("SELECT id FROM changes ORDER BY id")
        bounds = await store.feed_bounds(feed)
        readable = await store.changes_page(feed, store.START, bounds.xmin, limit=10)
        await t1.commit()
    assert [r["id"] for r in visible] == [2]  # a reader of ids would now pass 1 forever
    assert readable == [] and bounds.held


async def _setup_feed(settings: Settings, url: str, pool: store.Pool, n: int) -> None:
    for i in range(n):
        await post(url, delivery("coins.earned", f"buddy_{i % 3}", i, amount=1, balance=i))
        await apply_all(pool, settings)


async def test_pull_resumes_with_next_cursor_or_change_id(
    settings: Settings, server: str, feed: store.Pool, applier: store.Pool
) -> None:
    await _setup_feed(settings, server, applier, 7)
    everything = await all_changes(server)
    assert len(everything) == 7
    collected, cursor = [], None
    while True:
        page = await changes(server, limit=2, **({"after": cursor} if cursor else {}))
        collected += page["data"]
        assert page["next_cursor"]
        if not page["data"]:
            break
        cursor = page["next_cursor"]
    assert collected == everything
    # A change_id is a cursor too, and an empty page keeps the poller's place.
    after_third = await all_changes(server, after=everything[2]["change_id"])
    assert after_third == everything[3:]
    empty = await changes(server, after=cursor)
    assert empty["data"] == [] and empty["next_cursor"] >= cursor
    await post(server, delivery("coins.earned", "buddy_0", 100, amount=1, balance=100))
    await apply_all(applier, settings)
    fresh = await changes(server, after=empty["next_cursor"])
    assert [e["version"] for e in fresh["data"]] == [4]


async def test_filters(
    settings: Settings, server: str, feed: store.Pool, applier: store.Pool
) -> None:
    await post(server, delivery("buddy.hatched", "buddy_x", 0, user_id="user_x", name="X"))
    await post(server, delivery("buddy.hatched", "buddy_y", 0, user_id="user_y", name="Y"))
    await apply_all(applier, settings)
    await post(server, delivery("coins.earned", "buddy_x", 5, amount=3, balance=3))
    await post(server, delivery("buddy.evolved", "buddy_y", 6, new_stage=2))
    await apply_all(applier, settings)
    by_buddy = await all_changes(server, buddy_id="buddy_x")
    assert {e["buddy_id"] for e in by_buddy} == {"buddy_x"} and len(by_buddy) == 2
    assert {e["user_id"] for e in await all_changes(server, user_id="user_y")} == {"user_y"}
    coins = await all_changes(server, field="coins")
    assert [(e["buddy_id"], e["version"]) for e in coins] == [("buddy_x", 2)]
    either = await all_changes(server, field=["coins", "evolution_stage"])
    everything = await all_changes(server)
    assert either == [e for e in everything if {"coins", "evolution_stage"} & set(e["changed"])]
    assert ("buddy_y", 2) in [(e["buddy_id"], e["version"]) for e in either]
    # A filtered short page moves the cursor past what it scanned.
    page = await changes(server, field="coins")
    assert page["next_cursor"] > coins[-1]["change_id"]


async def test_bad_parameters_are_problems(server: str, feed: store.Pool) -> None:
    async with httpx.AsyncClient(base_url=server, timeout=30, headers=AUTH) as http:
        for params, code in [
            ({"after": "nope"}, "invalid_cursor"),
            ({"after": "G" * 32}, "invalid_cursor"),
            ({"after": "0" * 32}, "invalid_cursor"),  # too short
            ({"after": "f" * 48}, "invalid_cursor"),  # beyond a bigint
            ({"limit": "0"}, "invalid_parameter"),
            ({"limit": "1001"}, "invalid_parameter"),
            ({"field": "version"}, "invalid_parameter"),
        ]:
            r = await http.get("/v1/changes", params=params)
            assert r.status_code == 400, params
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["code"] == code
        r = await http.get("/v1/changes/stream", headers={"Last-Event-ID": "x"})
        assert r.status_code == 400 and r.json()["code"] == "invalid_cursor"
        ok = await http.get("/v1/changes", params={"limit": "1000"})
        assert ok.status_code == 200 and ok.json()["next_cursor"]
    async with httpx.AsyncClient(base_url=server, timeout=30) as http:
        assert (await http.get("/v1/changes")).status_code == 401


async def test_a_cursor_older_than_retention_is_gone(
    settings: Settings, server: str, feed: store.Pool, applier: store.Pool
) -> None:
    await _setup_feed(settings, server, applier, 6)
    entries = await all_changes(server)
    old = [e["change_id"] for e in entries[:4]]
    await feed.execute(
        "UPDATE changes SET committed_at = now() - interval '8 days'"
        " WHERE (txid, id) <= (SELECT txid, id FROM changes ORDER BY txid, id OFFSET 3 LIMIT 1)"
    )
    assert await prune({"settings": settings, "pool": feed}) == 4
    assert [e["change_id"] for e in await all_changes(server)] == [
        e["change_id"] for e in entries[4:]
    ]
    async with httpx.AsyncClient(base_url=server, timeout=30, headers=AUTH) as http:
        for cursor in old[:3]:
            r = await http.get("/v1/changes", params={"after": cursor})
            assert r.status_code == 410 and r.json()["code"] == "cursor_expired"
            r = await http.get("/v1/changes/stream", params={"after": cursor})
            assert r.status_code == 410 and r.json()["code"] == "cursor_expired"
    # Past the last pruned entry nothing was missed.
    assert len(await all_changes(server, after=old[3])) == 2
    # Without a cursor, pull and stream start at the oldest retained entry.
    assert len(await all_changes(server)) == 2
    async with (
        httpx.AsyncClient(base_url=server, timeout=30, headers=AUTH) as http,
        http.stream("GET", "/v1/changes/stream") as r,
    ):
        assert r.status_code == 200
        streamed = await asyncio.wait_for(_read_events(r, 2), 10)
    assert [ident for ident, _ in streamed] == [e["change_id"] for e in entries[4:]]


async def _read_events(response: httpx.Response, n: int) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    event, ident, data = None, None, None
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("id:"):
            ident = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data = line.split(":", 1)[1].strip()
        elif line == "" and event == "change":
            assert ident is not None and data is not None
            out.append((ident, orjson.loads(data)))
            event = None
            if len(out) == n:
                return out
    raise AssertionError("stream ended")


@pytest.fixture
async def stream_client(server: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server, timeout=30, headers=AUTH) as http:
        yield http


async def test_stream_resumes_by_last_event_id_or_after(
    settings: Settings,
    server: str,
    feed: store.Pool,
    stream_client: httpx.AsyncClient,
    applier: store.Pool,
) -> None:
    await _setup_feed(settings, server, applier, 4)
    everything = await all_changes(server)

    async with stream_client.stream("GET", "/v1/changes/stream") as r:
        assert r.status_code == 200
        first = await asyncio.wait_for(_read_events(r, 2), 10)
    assert [ident for ident, _ in first] == [e["change_id"] for e in everything[:2]]
    assert [body for _, body in first] == everything[:2]

    last = first[-1][0]

    async def resumed(**kw: Any) -> list[str]:
        async with stream_client.stream("GET", "/v1/changes/stream", **kw) as r:
            assert r.status_code == 200
            return [ident for ident, _ in await asyncio.wait_for(_read_events(r, 2), 10)]

    expected = [e["change_id"] for e in everything[2:4]]
    assert await resumed(headers={"Last-Event-ID": last}) == expected
    assert await resumed(params={"after": last}) == expected
    # Last-Event-ID (the reconnect) wins over the ?after= the stream was first opened with.
    assert (
        await resumed(params={"after": everything[0]["change_id"]}, headers={"Last-Event-ID": last})
        == expected
    )

    # Live: a change committed while the stream is open arrives, nothing before it again.
    async with stream_client.stream(
        "GET", "/v1/changes/stream", params={"after": everything[-1]["change_id"]}
    ) as r:
        reading = asyncio.create_task(_read_events(r, 1))
        await asyncio.sleep(0.2)
        await post(server, delivery("coins.earned", "buddy_9", 50, amount=1, balance=1))
        await apply_all(applier, settings)
        [(ident, body)] = await asyncio.wait_for(reading, 10)
    assert ident > everything[-1]["change_id"] and body["buddy_id"] == "buddy_9"


@pytest.mark.parametrize("seed", [1, 2])
async def test_replaying_the_feed_rebuilds_the_mirror(
    settings: Settings, server: str, feed: store.Pool, seed: int, applier: store.Pool
) -> None:
    """A day of deliveries, shuffled and partly duplicated, applied in batches of random size
    as they arrive: folding each buddy's `changed` from nothing gives the mirrored buddy."""
    rng = random.Random(seed)
    deliveries = signed(learning_day(4, 25, rng), "mixed", rng)
    stream = deliveries + rng.sample(deliveries, len(deliveries) // 3)
    rng.shuffle(stream)
    while stream:
        size = rng.randint(1, 20)
        chunk, stream = stream[:size], stream[size:]
        await post(server, *chunk)
        await apply_all(applier, settings, batch_size=rng.randint(1, 30))

    rebuilt: dict[str, dict[str, Any]] = {}
    versions: dict[str, list[int]] = {}
    for e in await all_changes(server):
        state = rebuilt.setdefault(e["buddy_id"], dict.fromkeys(FIELD_NAMES))
        for name, change in e["changed"].items():
            # (last_event_at may have moved alone in between, without an entry)
            assert name == "last_event_at" or state[name] == change["from"]
            state[name] = change["to"]
        versions.setdefault(e["buddy_id"], []).append(e["version"])
    for buddy_id in [r["buddy_id"] for r in await feed.fetch("SELECT buddy_id FROM buddies")]:
        found = await store.get_buddy(feed, buddy_id)
        assert found is not None
        view = public_view(*found)
        assert versions[buddy_id] == list(range(1, found[1] + 1))
        state = rebuilt[buddy_id]
        last_seen = state.pop("last_event_at")
        expected = {k: v for k, v in view.items() if k in FIELD_NAMES and k != "last_event_at"}
        assert state == expected
        assert last_seen <= view["last_event_at"]


async def test_change_streams_are_bounded(migrated: str, redis_url: str, feed: store.Pool) -> None:
    limits = {"MIRROR_STREAM_MAX_CLIENTS": "1", "MIRROR_STREAM_PING_S": "0.2"}
    one = make_settings(migrated, redis_url, **limits)
    async with (
        serving(create_app(one)) as url,
        httpx.AsyncClient(base_url=url, timeout=30, headers=AUTH) as http,
        http.stream("GET", "/v1/changes/stream") as first,
    ):
        assert first.status_code == 200
        second = await http.get("/v1/changes/stream")
        assert second.status_code == 503 and second.json()["code"] == "too_many_streams"
        # Keep-alives flow while nothing changes.
        lines = first.aiter_lines()
        assert (await asyncio.wait_for(anext(lines), 5)).startswith(":")


async def test_tail_changes_prints_the_feed(
    settings: Settings,
    server: str,
    migrated: str,
    redis_url: str,
    feed: store.Pool,
    applier: store.Pool,
) -> None:
    await post(server, delivery("buddy.hatched", "buddy_t", 0, name="Pip"))
    await apply_all(applier, settings)
    await post(server, delivery("coins.earned", "buddy_t", 5, amount=7, balance=7))
    await apply_all(applier, settings)
    first, second = await all_changes(server)
    env = service_env(migrated, redis_url)
    done = await run_command(env, "tail-changes", "--no-follow")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert "buddy_t v1" in lines[0] and 'name null -> "Pip"' in lines[0]
    assert "[delivery coins.earned]" in lines[1] and "coins null -> 7" in lines[1]
    assert lines[1].endswith(f"({second['change_id']})")
    resumed = await run_command(
        env, "tail-changes", "--no-follow", "--after", first["change_id"], "--field", "coins"
    )
    assert resumed.stdout.splitlines() == lines[1:]
    bad = await run_command(env, "tail-changes", "--no-follow", "--after", "nope")
    assert bad.returncode == 2 and "change_id" in bad.stderr


async def test_the_worker_counts_the_entries_it_writes(
    settings: Settings, server: str, feed: store.Pool
) -> None:
    def written() -> float:
        return REGISTRY.get_sample_value("hatched_changes_written_total") or 0.0

    before = written()
    await post(server, delivery("buddy.hatched", "buddy_m", 0, name="Pip"))
    async with running_worker(settings):
        await wait_settled(feed)
    await post(server, delivery("buddy.hatched", "buddy_m", 0, name="Pip"))  # a duplicate
    await post(server, delivery("coins.earned", "buddy_m", 5, amount=2, balance=2))
    async with running_worker(settings):
        await wait_settled(feed)
    await visible(feed)
    assert len(await all_changes(server)) == 2
    assert written() - before == 2


async def test_the_feed_bounds_read_the_index_not_the_feed(feed: store.Pool) -> None:
    """Every page and every stream poll asks where the feed ends: a probe of the primary key,
    however long the feed (unanalysed, as a feed just filled is), never a scan of it."""
    await feed.execute(
        """
        INSERT INTO changes (buddy_id, version, cause_kind, changed)
        SELECT 'buddy_' || i, 1, 'delivery', '{}' FROM generate_series(1, 50000) AS i
        """
    )
    async with feed.acquire() as conn:
        plan = orjson.loads(await conn.fetchval("EXPLAIN (FORMAT JSON) " + store.FEED_BOUNDS))

    def scans(node: dict[str, Any]) -> list[tuple[str, str]]:
        own = [(node["Node Type"], node.get("Index Name", ""))] if "Relation Name" in node else []
        if node.get("Relation Name", "changes") != "changes":
            own = []
        return own + [s for child in node.get("Plans", []) for s in scans(child)]

    assert scans(plan[0]["Plan"]) == [("Index Only Scan", "changes_pkey")]
    await visible(feed)
    assert not (await store.feed_bounds(feed)).held


@pytest.mark.parametrize("enabled", [None, "false"])
async def test_with_the_feed_off_the_worker_writes_no_entries(
    enabled: str | None, migrated: str, redis_url: str, feed: store.Pool
) -> None:
    """MIRROR_CHANGES_ENABLED=false: the buddy and its version move exactly as with the feed
    (unset: on), the feed stays empty and its route still answers."""
    overrides = {} if enabled is None else {"MIRROR_CHANGES_ENABLED": enabled}
    configured = make_settings(migrated, redis_url, **overrides)
    steps = [
        delivery("buddy.hatched", "buddy_off", 0, name="Pip"),
        delivery("coins.earned", "buddy_off", 5, amount=3, balance=3),
        # Newer, and it sets what is there: `last_event_at` alone moves, no version grows.
        delivery("coins.earned", "buddy_off", 9, amount=0, balance=3),
    ]
    async with serving(create_app(configured)) as url:
        for step in steps:
            await post(url, step)
            async with running_worker(configured):
                await wait_settled(feed)
        await visible(feed)
        page = await changes(url, limit=1000)
    found = await store.get_buddy(feed, "buddy_off")
    assert found is not None and (found[0].name, found[0].coins, found[1]) == ("Pip", 3, 2)
    assert found[0].last_event_at == T0 + timedelta(seconds=9)
    rows = await feed.fetch("SELECT version FROM changes WHERE buddy_id = 'buddy_off'")
    if enabled is None:
        assert [r["version"] for r in rows] == [1, 2]
        assert [e["version"] for e in page["data"]] == [1, 2]
    else:
        assert rows == [] and page["data"] == [] and page["next_cursor"]


async def test_a_stream_waits_for_an_older_transaction_then_delivers(
    server: str, feed: store.Pool, stream_client: httpx.AsyncClient
) -> None:
    """An entry committed while an older transaction (one that writes no change, so its end
    notifies nobody) is still open reaches the stream once that transaction ends."""
    buddy = Buddy(buddy_id="buddy_held", name="Held")
    change = entry(buddy, 1, Cause("delivery", "d_held", "buddy.hatched"), diff(None, buddy))
    async with (
        feed.acquire() as older,
        feed.acquire() as writer,
        stream_client.stream("GET", "/v1/changes/stream") as r,
    ):
        reading = asyncio.create_task(_read_events(r, 1))
        t0 = older.transaction()
        await t0.start()
        await older.fetchval("SELECT pg_current_xact_id()")  # takes a transaction id
        await store.write_batch(writer, changed=[("buddy_held", 1)], feed=[change])
        await asyncio.sleep(0.5)
        assert not reading.done()
        await t0.commit()
        [(_, body)] = await asyncio.wait_for(reading, 5)
    assert body["buddy_id"] == "buddy_held"


async def test_a_cursor_older_than_the_retention_expires_before_any_pruning(
    migrated: str, redis_url: str, feed: store.Pool, applier: store.Pool
) -> None:
    """The retention applies to cursors as given: one older than it answers 410 even while
    the pruner has not run yet; a poller that keeps polling always holds a fresh one."""
    short = make_settings(migrated, redis_url, MIRROR_CHANGES_RETENTION_DAYS=str(6 / 86400))
    async with serving(create_app(short)) as url:
        await post(url, delivery("buddy.hatched", "buddy_r", 0, name="Pip"))
        await apply_all(applier, short)
        [change] = await all_changes(url)
        # A retention of 6 s and polls 3.5 s apart: wide margins for a loaded machine.
        polled = (await changes(url, after=change["change_id"]))["next_cursor"]
        await asyncio.sleep(3.5)
        # Kept fresh: each poll of the quiet feed hands out a cursor as of now.
        polled = (await changes(url, after=polled))["next_cursor"]
        await asyncio.sleep(3.5)
        assert (await changes(url, after=polled))["data"] == []
        async with httpx.AsyncClient(base_url=url, timeout=30, headers=AUTH) as http:
            r = await http.get("/v1/changes", params={"after": change["change_id"]})
            assert r.status_code == 410 and r.json()["code"] == "cursor_expired"
            r = await http.get("/v1/changes/stream", headers={"Last-Event-ID": change["change_id"]})
            assert r.status_code == 410 and r.json()["code"] == "cursor_expired"
    assert await feed.fetchval("SELECT count(*) FROM changes") == 1  # nothing was pruned
