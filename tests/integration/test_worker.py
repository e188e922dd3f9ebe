"""The worker applies what the receiver stored, in any arrival order, exactly once."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from typing import Literal

import httpx
import orjson
import pytest

from service import store
from service.app import create_app
from service.apply.applier import ApplyLimits
from service.apply.projector import mirrored
from service.apply.worker import apply_idle_shards
from service.config import Settings
from service.dev.samples import build_delivery
from service.ingest.events import PARSER
from service.ingest.signatures import signature_headers
from tests.support.config import SECRET, make_settings
from tests.support.running import running_worker, serving, wait_settled
from tests.support.scenario import expected_states, learning_day, mirrored_states, signed

CLOSED_PORT_REDIS = "redis://127.0.0.1:1/0"


async def post_all(url: str, deliveries: list[tuple[dict[str, str], bytes]]) -> list[int]:
    limits = asyncio.Semaphore(32)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:

        async def post(headers: dict[str, str], body: bytes) -> int:
            async with limits:
                r = await http.post("/webhooks/hatched", content=body, headers=headers)
                return r.status_code

        return list(await asyncio.gather(*(post(h, b) for h, b in deliveries)))


async def test_delivery_is_stored_without_worker_and_applied_when_one_starts(
    settings: Settings, server: str, db: store.Pool
) -> None:
    headers, body = build_delivery("buddy.hatched", "v2", secret=SECRET, buddy_id="buddy_late")
    assert await post_all(server, [(headers, body)]) == [202]
    await asyncio.sleep(0.3)
    assert await db.fetchval("SELECT status FROM delivery_states") == "accepted"
    assert await db.fetchval("SELECT count(*) FROM buddies") == 0
    async with running_worker(settings):
        await wait_settled(db)
    assert await db.fetchval("SELECT status FROM delivery_states") == "applied"
    found = await store.get_buddy(db, "buddy_late")
    assert found is not None and found[0].name == "Pip"


async def test_the_event_stored_at_receipt_is_applied_and_other_versions_are_parsed_again(
    settings: Settings, server: str, db: store.Pool
) -> None:
    """Parsed once: the worker applies the event data the receiver stored, not the body; a row
    written by another version of the normaliser is read from its raw body again."""
    once = build_delivery("coins.earned", "v2", secret=SECRET, buddy_id="buddy_parsed_once")
    again = build_delivery("coins.earned", "v1", secret=SECRET, buddy_id="buddy_parsed_again")
    assert await post_all(server, [once, again]) == [202, 202]
    rows = {
        r["buddy_id"]: r
        for r in await db.fetch(
            "SELECT seq, buddy_id, event_data::text AS data, event_parser FROM deliveries"
        )
    }
    assert {r["event_parser"] for r in rows.values()} == {PARSER}
    data = orjson.loads(rows["buddy_parsed_once"]["data"])
    body_balance = orjson.loads(rows["buddy_parsed_again"]["data"])["balance"]
    await db.execute(
        "UPDATE deliveries SET event_data = $1::json WHERE seq = $2",
        orjson.dumps({**data, "balance": 999}).decode(),
        rows["buddy_parsed_once"]["seq"],
    )
    await db.execute(
        "UPDATE deliveries SET event_data = '{}', event_parser = $1 WHERE seq = $2",
        PARSER + 1,
        rows["buddy_parsed_again"]["seq"],
    )
    async with running_worker(settings):
        await wait_settled(db)
    applied_once = await store.get_buddy(db, "buddy_parsed_once")
    applied_again = await store.get_buddy(db, "buddy_parsed_again")
    assert applied_once is not None and applied_once[0].coins == 999
    assert applied_again is not None and applied_again[0].coins == body_balance


async def test_redis_down_at_receipt_is_recovered_by_the_sweeper(
    settings: Settings, migrated: str, db: store.Pool
) -> None:
    blind = make_settings(migrated, CLOSED_PORT_REDIS)
    async with serving(create_app(blind)) as url:
        headers, body = build_delivery("coins.earned", "v1", secret=SECRET, buddy_id="buddy_swept")
        assert await post_all(url, [(headers, body)]) == [202]
    # No wake-up was ever queued: only the sweeper can find this row.
    async with running_worker(settings):
        await wait_settled(db, within=20)
    found = await store.get_buddy(db, "buddy_swept")
    assert found is not None and found[0].coins == 120


async def test_a_running_job_applies_the_shards_no_job_holds(
    migrated: str, server: str, db: store.Pool
) -> None:
    """After its own shard, a wake-up job applies a batch of the due deliveries of the shards
    whose lock is free, and leaves alone a shard another job is draining."""
    deliveries = [
        build_delivery("buddy.hatched", "v2", secret=SECRET, buddy_id=f"buddy_idle_{i}")
        for i in range(12)
    ]
    assert await post_all(server, deliveries) == [202] * 12
    shards = {r["shard"] for r in await db.fetch("SELECT shard FROM delivery_states")}
    assert len(shards) > 2
    busy = min(shards)
    async with db.acquire() as holder, db.acquire() as conn:
        await store.lock_shard(holder, busy)
        result = await apply_idle_shards(conn, ApplyLimits())
        await store.unlock_shards(holder, [busy])
    left = await db.fetch("SELECT shard FROM delivery_states WHERE status = 'accepted'")
    assert left and {r["shard"] for r in left} == {busy}
    assert result.applied == 12 - len(left)
    assert sorted(await store.due_shards(db)) == [busy]


async def test_a_shard_is_stalled_when_its_oldest_due_delivery_is_late(
    server: str, db: store.Pool
) -> None:
    """The sweeper's question: due deliveries only (not one backing off), oldest first."""
    for i in range(40):
        headers, body = build_delivery("coins.earned", "v2", secret=SECRET, buddy_id=f"b_st_{i}")
        assert await post_all(server, [(headers, body)]) == [202]
    by_shard: dict[int, list[int]] = {}
    for r in await db.fetch("SELECT shard, seq FROM delivery_states ORDER BY seq"):
        by_shard.setdefault(r["shard"], []).append(r["seq"])
    late, backing_off, newer_first = [s for s, seqs in by_shard.items() if len(seqs) >= 2][:3]
    # late: its oldest delivery is old. backing_off: its two oldest are old, but a failed
    # attempt put both off. newer_first: only its second delivery is old, its oldest is not.
    old = [by_shard[late][0], *by_shard[backing_off][:2], by_shard[newer_first][1]]
    await db.execute(
        "UPDATE deliveries SET received_at = now() - interval '1 hour' WHERE seq = ANY($1)", old
    )
    await db.execute(
        "UPDATE delivery_states SET next_attempt_at = now() + interval '1 hour'"
        " WHERE seq = ANY($1)",
        by_shard[backing_off][:2],
    )
    assert await store.stalled_shards(db, 60) == [late]
    assert await store.stalled_shards(db, 7200) == []


@pytest.mark.parametrize("fmt", ["v1", "v2"])
async def test_shuffled_burst_ends_in_the_in_order_state(
    settings: Settings, server: str, db: store.Pool, fmt: Literal["v1", "v2"]
) -> None:
    rng = random.Random(20261123)
    stream = learning_day(buddies=50, per_buddy=20, rng=rng)
    deliveries = signed(stream, fmt, rng)
    rng.shuffle(deliveries)
    # A few of Hatched's retries, re-sent after the originals.
    deliveries += deliveries[:25]
    async with running_worker(settings):
        statuses = await post_all(server, deliveries)
        await wait_settled(db)
    assert statuses.count(202) == 1000 and statuses.count(200) == 25

    expected = expected_states(deliveries[:1000])
    actual = await mirrored_states(db)
    assert actual.keys() == expected.keys()
    for buddy_id, buddy in expected.items():
        assert mirrored(actual[buddy_id]) == mirrored(buddy), buddy_id
    currency_events = sum(1 for s in stream if s["type"].split(".")[0] in ("coins", "token"))
    assert await db.fetchval("SELECT count(*) FROM ledger") == currency_events
    assert await db.fetchval("SELECT count(*) FROM delivery_states WHERE status <> 'applied'") == 0


async def test_same_v1_event_under_two_delivery_ids_counts_once(
    settings: Settings, server: str, db: store.Pool
) -> None:
    first = build_delivery("coin.earned", "v1", secret=SECRET, buddy_id="buddy_twice")
    body = first[1].replace(b'"deliveryId":"', b'"deliveryId":"again_')
    second_headers = {k: v for k, v in first[0].items() if k != "Hatched-Signature"}
    second_headers.pop("Hatched-Delivery-Id", None)
    second_headers.update(signature_headers(body, SECRET, int(datetime.now(UTC).timestamp()), "v1"))
    async with running_worker(settings):
        assert await post_all(server, [first]) == [202]
        await wait_settled(db)
        assert await post_all(server, [(second_headers, body)]) == [202]
        await wait_settled(db)
    statuses = [
        r["status"] for r in await db.fetch("SELECT status FROM delivery_states ORDER BY seq")
    ]
    assert statuses == ["applied", "duplicate"]
    assert await db.fetchval("SELECT count(*) FROM ledger") == 1


async def test_version_and_updated_at_move_only_on_change(
    settings: Settings, server: str, db: store.Pool
) -> None:
    hatch = build_delivery("buddy.hatched", "v2", secret=SECRET, buddy_id="buddy_v")
    async with running_worker(settings):
        await post_all(server, [hatch])
        await wait_settled(db)
        v1 = await store.get_version(db, "buddy_v")
        # The same facts again under a new delivery id and an older time change nothing.
        older = build_delivery(
            "buddy.hatched",
            "v2",
            secret=SECRET,
            buddy_id="buddy_v",
            data={"occurred_at": "2026-01-01T00:00:00Z"},
        )
        await post_all(server, [older])
        await wait_settled(db)
        assert await store.get_version(db, "buddy_v") == v1
        earned = build_delivery("coins.earned", "v2", secret=SECRET, buddy_id="buddy_v")
        await post_all(server, [earned])
        await wait_settled(db)
    assert v1 == 1
    assert await store.get_version(db, "buddy_v") == 2


async def test_lookups_are_planned_for_the_table_as_it_is_now(db: store.Pool) -> None:
    """A generic plan cached while `buddies` was empty is a sequential scan that a pooled
    connection would keep as the table grows; the pools plan every execution instead."""
    async with db.acquire() as conn:
        for _ in range(10):  # Postgres considers a generic plan from the sixth execution on
            async with conn.transaction():
                assert await store.lock_buddies(conn, ["nobody"]) == {}
        plans = await conn.fetchrow(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1",
            store.LOCK_BUDDIES,
        )
    assert plans is not None
    assert (plans["generic_plans"], plans["custom_plans"]) == (0, 10)


async def test_duplicate_lookup_probes_the_unique_index(db: store.Pool) -> None:
    """However many deliveries a new (unanalysed) inbox holds, a batch of v1 event ids is
    looked up by index, never by scanning the inbox."""
    await db.execute(
        """
        INSERT INTO delivery_states (seq, shard, event_id, status, applied_at)
        SELECT i, i % 32, 'evt_' || i, 'applied', now() FROM generate_series(1, 100000) AS i
        """
    )
    ids = [f"evt_{i}" for i in range(0, 60000, 300)]
    async with db.acquire() as conn:
        plan = await conn.fetchval(
            "EXPLAIN (FORMAT JSON) " + store.SEEN_EVENT_IDS.replace("$1::text[]", "$1"), ids
        )
        found = await store.seen_event_ids(conn, ids)
    assert "delivery_states_applied_event_idx" in plan and "Seq Scan" not in plan
    assert found == {f"evt_{i}" for i in range(300, 60000, 300)}
