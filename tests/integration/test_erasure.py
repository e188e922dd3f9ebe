"""Erasure of an end user (DELETE /v1/users/{user_id}, `hatched-mirror forget`): nothing of the
user is left in any column of any table, and nothing brings the erased buddies back."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from arq.connections import create_pool

from service import store
from service.app import create_app
from service.apply.context import WorkerContext
from service.apply.worker import reconcile
from service.config import Settings
from service.dev.samples import build_delivery
from service.hatched import refresh
from service.hatched.remote import RemoteBuddy
from service.ingest.signatures import signature_headers
from service.ingest.wakeups import redis_settings
from tests.support.config import ADMIN_TOKEN, API_TOKEN, SECRET, make_settings
from tests.support.fake_hatched import FakeHatched, buddy_json
from tests.support.harness import Process, run_command, serve, service_env
from tests.support.running import running_worker, serving, wait_settled

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
READ = {"Authorization": f"Bearer {API_TOKEN}"}
GET_BUDDY = "GET /buddies/{buddy_id}"

Delivery = tuple[dict[str, str], bytes]


@dataclass
class User:
    """An end user with buddies, every identifying value unique to the test run."""

    user_id: str
    buddy_ids: list[str]
    names: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)

    @property
    def needles(self) -> list[str]:
        return [self.user_id, *self.buddy_ids, *self.names, *self.images]


def make_user(label: str, buddies: int = 2) -> User:
    tag = uuid.uuid4().hex[:10]
    user = User(f"user_{label}_{tag}", [f"buddy_{label}_{tag}_{i}" for i in range(buddies)])
    user.names = [f"Name{label}{tag}{i}" for i in range(buddies)]
    user.images = [f"https://cdn.example/{label}/{tag}/{i}.png" for i in range(buddies)]
    return user


def history(user: User, timestamp: int | None = None) -> list[Delivery]:
    """Hatch (v2 and v1 alternately), earn coins and a token, evolve: the user's past, signed
    at `timestamp` (now by default)."""
    out = []
    for i, buddy_id in enumerate(user.buddy_ids):
        fmt: Any = "v2" if i % 2 == 0 else "v1"
        data = {"user_id": user.user_id, "name": user.names[i], "image_url": user.images[i]}
        out.append(
            build_delivery(
                "buddy.hatched",
                fmt,
                secret=SECRET,
                timestamp=timestamp,
                buddy_id=buddy_id,
                data=data,
            )
        )
        out.append(
            build_delivery(
                "coins.earned",
                fmt,
                secret=SECRET,
                timestamp=timestamp,
                buddy_id=buddy_id,
                data={"amount": 7},
            )
        )
        out.append(
            build_delivery(
                "token.earned", fmt, secret=SECRET, timestamp=timestamp, buddy_id=buddy_id
            )
        )
        out.append(
            build_delivery(
                "buddy.evolved",
                fmt,
                secret=SECRET,
                timestamp=timestamp,
                buddy_id=buddy_id,
                data={"new_stage": 2},
            )
        )
    return out


def resigned(delivery: Delivery) -> Delivery:
    """The same delivery as Hatched retries it: same body and id, a fresh signature."""
    headers, body = delivery
    fmt: Any = "v1" if "Hatched-Signature" in headers else "v2"
    fresh = {
        k: v
        for k, v in headers.items()
        if k not in ("Hatched-Signature", "X-Hatched-Signature", "X-Hatched-Timestamp")
    }
    fresh.update(signature_headers(body, SECRET, int(time.time()), fmt))
    return fresh, body


def unmapped(buddy_id: str, user_id: str) -> Delivery:
    """A v2 delivery of a type the mirror does not know: stored as `unmapped` at receipt, so
    no worker ever claims it (only the erasure's inbox lock keeps a racing one out)."""
    # A body of its own: Hatched never sends the same signed bytes twice (a retry is re-signed),
    # and the receiver answers a repeated signature as a replay.
    body = orjson.dumps(
        {"buddy_id": buddy_id, "user_id": user_id, "note": "new event type", "n": uuid.uuid4().hex}
    )
    headers = {
        "Content-Type": "application/json",
        "X-Hatched-Event": "buddy.befriended",
        "X-Hatched-Delivery": str(uuid.uuid4()),
        **signature_headers(body, SECRET, int(time.time()), "v2"),
    }
    return headers, body


async def post_all(http: httpx.AsyncClient, deliveries: list[Delivery]) -> list[httpx.Response]:
    return [await http.post("/webhooks/hatched", content=b, headers=h) for h, b in deliveries]


# --- what the database holds ---------------------------------------------------------------

# Every column of every table of the schema that can hold text: walked from the catalog, so a
# table added later is searched too. Arrays and enums are searched through their text form.
SEARCHABLE_COLUMNS = """
SELECT c.relname AS table_name, a.attname AS column_name, t.typname AS type_name
FROM pg_attribute AS a
JOIN pg_class AS c ON c.oid = a.attrelid
JOIN pg_namespace AS n ON n.oid = c.relnamespace
JOIN pg_type AS t ON t.oid = a.atttypid
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'm')
  AND a.attnum > 0 AND NOT a.attisdropped
  AND (t.typname IN ('text', 'varchar', 'bpchar', 'name', 'json', 'jsonb', 'bytea')
       OR t.typcategory IN ('A', 'E'))
ORDER BY 1, 2
"""


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def columns(db: store.Pool) -> list[tuple[str, str, str]]:
    rows = await db.fetch(SEARCHABLE_COLUMNS)
    return [(r["table_name"], r["column_name"], r["type_name"]) for r in rows]


async def find_anywhere(db: store.Pool, needles: list[str]) -> list[tuple[str, str, str]]:
    """(table, column, needle) for every column of the schema holding one of the needles."""
    found = []
    cols = await columns(db)
    assert {("deliveries", "body"), ("buddies", "name"), ("ledger", "buddy_id")} <= {
        (t, c) for t, c, _ in cols
    }
    for table, column, type_name in cols:
        if type_name == "bytea":
            where = f"position(convert_to($1::text, 'UTF8') IN {_quote(column)}) > 0"
        else:
            where = f"strpos({_quote(column)}::text, $1::text) > 0"
        sql = f"SELECT EXISTS (SELECT 1 FROM {_quote(table)} WHERE {where})"
        for needle in needles:
            if await db.fetchval(sql, needle):
                found.append((table, column, needle))
    return found


async def all_rows(db: store.Pool) -> dict[str, set[str]]:
    """Every row of every table, as its text form (bytea in hex): a byte-for-byte picture."""
    tables = await db.fetch(
        "SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
        " WHERE n.nspname = current_schema() AND c.relkind = 'r'"
    )
    out = {}
    for (table,) in tables:
        rows = await db.fetch(f"SELECT t::text AS r FROM {_quote(table)} AS t")
        out[table] = {r["r"] for r in rows}
    return out


async def redis_mentions(redis: aioredis.Redis, needles: list[str]) -> list[str]:
    """Redis keys, and members of sorted sets (arq queues), that name one of the needles."""
    hits = []
    async for key in redis.scan_iter():
        names = [key]
        if await redis.type(key) == b"zset":
            names += await redis.zrange(key, 0, -1)
        for name in names:
            text = name.decode(errors="replace")
            hits += [f"{key!r}: {text}" for n in needles if n in text]
    return hits


def tombstone_of(ipad: bytes, buddy_id: str) -> bytes:
    key = bytes(b ^ 0x36 for b in ipad).rstrip(b"\0")
    return hmac.new(key, buddy_id.encode(), hashlib.sha256).digest()


# --- fixtures --------------------------------------------------------------------------------


async def seed(http: httpx.AsyncClient, db: store.Pool, *users: User) -> None:
    for user in users:
        assert {r.status_code for r in await post_all(http, history(user))} == {202}
    await wait_settled(db)
    for user in users:
        for buddy_id in user.buddy_ids:
            assert (await http.get(f"/v1/buddies/{buddy_id}", headers=READ)).status_code == 200


async def forget(http: httpx.AsyncClient, user_id: str) -> dict[str, Any]:
    response = await http.delete(f"/v1/users/{user_id}", headers=ADMIN)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


# --- tests -----------------------------------------------------------------------------------


async def test_erasure_leaves_nothing_and_nothing_brings_it_back(
    settings: Settings, http: httpx.AsyncClient, db: store.Pool, redis: aioredis.Redis
) -> None:
    user, other = make_user("gone"), make_user("kept")
    async with running_worker(settings):
        await seed(http, db, user, other)
    # Recorded for the late retries below: as Hatched retries, re-signed (a later timestamp; the
    # very same signed bytes again would be answered as a replay) and with fresh delivery ids.
    past = history(user, timestamp=int(time.time()) + 2)
    old_delivery = past[0]
    assert (
        await http.post("/webhooks/hatched", content=old_delivery[1], headers=old_delivery[0])
    ).status_code == 202
    await db.execute(
        "INSERT INTO bootstraps (user_id, audience_key, status, buddy_id)"
        " VALUES ($1, '', 'completed', $2), ($3, '', 'completed', $4)",
        user.user_id,
        user.buddy_ids[0],
        other.user_id,
        other.buddy_ids[0],
    )
    # A delivery about no buddy that names the user, and a backfill checkpoint of the user.
    await db.execute(
        "INSERT INTO deliveries (delivery_id, format, signed_at, headers, body)"
        " VALUES ('nobuddy-1', 'v2', now(), '{}', convert_to($1, 'UTF8'))",
        f'{{"user_id": "{user.user_id}"}}',
    )
    await db.execute(
        "INSERT INTO delivery_states (seq, shard, status) SELECT seq, 0, 'unmapped'"
        " FROM deliveries WHERE delivery_id = 'nobuddy-1'"
    )
    await store.save_checkpoint(db, "user:" + _digest(user.user_id), "1", 1, True)
    await redis.set(f"{settings.queue_name}:refresh-due:{user.buddy_ids[0]}", "1")
    await redis.zadd(settings.queue_name, {f"refresh:{user.buddy_ids[1]}": 1})
    assert set(await find_anywhere(db, user.needles)) >= {
        ("buddies", "user_id", user.user_id),
        ("deliveries", "body", user.names[0]),
        ("ledger", "buddy_id", user.buddy_ids[1]),
        ("bootstraps", "user_id", user.user_id),
    }
    before = await all_rows(db)

    answer = await forget(http, user.user_id)

    assert answer == {"user_id": user.user_id, "status": "forgotten", "buddies": 2}
    assert await find_anywhere(db, user.needles) == []
    assert await redis_mentions(redis, user.buddy_ids) == []
    assert await store.get_checkpoint(db, "user:" + _digest(user.user_id)) is None
    after = await all_rows(db)
    # Nothing of anyone else changed, byte for byte: every row left was there before, as it was,
    # and every row of the other user is still there.
    for table, rows in after.items():
        if table != "tombstones":
            assert rows <= before[table], table
    for table, rows in before.items():
        theirs = {r for r in rows if any(n in r for n in other.needles)}
        assert theirs <= after[table], table
    assert any(other.user_id in r for r in after["buddies"])
    # The tombstones: the keyed hash of each buddy id, nothing in clear.
    ipad = await db.fetchval("SELECT inner_pad FROM erasure_key")
    assert after["tombstones"] and len(after["tombstones"]) == 2
    hashes = {bytes(r["buddy_hash"]) for r in await db.fetch("SELECT buddy_hash FROM tombstones")}
    assert hashes == {tombstone_of(ipad, b) for b in user.buddy_ids}
    for buddy_id in user.buddy_ids:
        response = await http.get(f"/v1/buddies/{buddy_id}", headers=READ)
        assert response.status_code == 404  # also not from any process's read cache
    assert (await http.get(f"/v1/users/{user.user_id}/buddy", headers=READ)).status_code == 404

    async with running_worker(settings):
        # A late Hatched retry of an old delivery, and fresh deliveries of both buddies.
        fresh = [
            build_delivery(
                "coins.earned", "v2", secret=SECRET, buddy_id=user.buddy_ids[0], data={"amount": 1}
            ),
            build_delivery(
                "buddy.hatched",
                "v1",
                secret=SECRET,
                buddy_id=user.buddy_ids[1],
                data={"user_id": user.user_id, "name": user.names[1]},
            ),
        ]
        for response in await post_all(http, [resigned(old_delivery), *fresh]):
            assert response.status_code == 202
            assert response.json()["status"] == "forgotten"
        await wait_settled(db)
    assert await find_anywhere(db, user.needles) == []
    assert await db.fetchval("SELECT sum(hits) FROM tombstones") == 3
    for buddy_id in user.buddy_ids:
        assert (await http.get(f"/v1/buddies/{buddy_id}", headers=READ)).status_code == 404
    metrics = (await http.get("/metrics")).text
    assert 'hatched_tombstone_hits_total{path="receiver"}' in metrics
    # Erasing again finds nothing more; the other user is still served.
    assert (await forget(http, user.user_id))["buddies"] == 0
    assert (await http.get(f"/v1/buddies/{other.buddy_ids[0]}", headers=READ)).status_code == 200


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


async def test_a_connection_that_stored_before_the_erasure_turns_the_buddy_away(
    settings: Settings, http: httpx.AsyncClient, db: store.Pool
) -> None:
    """The inbox's statement is planned once per connection (sql/0017_store_deliveries.sql):
    a connection that has stored many batches while no buddy was erased still sees a
    tombstone made afterwards, on its next batch."""
    user, other = make_user("planned", buddies=2), make_user("planned_other", buddies=1)

    def delivery(buddy_id: str) -> store.NewDelivery:
        return store.NewDelivery(
            delivery_id=str(uuid.uuid4()),
            format="v2",
            event_type="coins.earned",
            event_id=None,
            buddy_id=buddy_id,
            shard=0,
            occurred_at=datetime.now(UTC),
            signed_at=datetime.now(UTC),
            headers={},
            body=orjson.dumps({"buddy_id": buddy_id}),
            status="unmapped",  # final already: nothing for a worker to apply
            reason="test",
            signature=uuid.uuid4().bytes,
        )

    async with running_worker(settings):
        await seed(http, db, user, other)
    buddies = [*user.buddy_ids, *other.buddy_ids]
    async with db.acquire() as conn:
        assert not await conn.fetchval("SELECT EXISTS (SELECT FROM tombstones)")
        # More executions than the five after which Postgres may settle on a cached plan.
        for _ in range(8):
            stored = await store.insert_deliveries(conn, [delivery(b) for b in buddies])
            assert all(isinstance(seq, int) for seq in stored)
        await forget(http, user.user_id)
        batch = [delivery(b) for b in buddies] + [delivery(user.buddy_ids[0])]
        stored = await store.insert_deliveries(conn, batch)
        hits = await conn.fetchval("SELECT sum(hits) FROM tombstones")
    assert stored[:2] == [store.FORGOTTEN, store.FORGOTTEN] and stored[3] == store.FORGOTTEN
    assert isinstance(stored[2], int)
    assert hits == 3
    assert await find_anywhere(db, user.needles) == []


async def test_a_delivery_that_raced_into_the_inbox_is_deleted_not_applied(
    settings: Settings, http: httpx.AsyncClient, db: store.Pool
) -> None:
    user = make_user("raced", buddies=1)
    async with running_worker(settings):
        await seed(http, db, user)
    await forget(http, user.user_id)
    # As if a receiver had stored it just before the tombstone existed (which the inbox lock
    # prevents): the apply transaction still checks the tombstone.
    _, body = history(user)[0]
    await db.execute(
        "WITH d AS (INSERT INTO deliveries (delivery_id, format, event_type, buddy_id, shard,"
        " signed_at, headers, body) VALUES ('raced-1', 'v2', 'buddy.hatched', $1, $2, now(),"
        ' \'{"x-hatched-event": "buddy.hatched"}\', $3) RETURNING seq, shard)'
        " INSERT INTO delivery_states (seq, shard) SELECT seq, shard FROM d",
        user.buddy_ids[0],
        _shard(user.buddy_ids[0], settings.shards),
        body,
    )
    async with running_worker(settings):
        await wait_settled(db)
    assert await find_anywhere(db, user.needles) == []
    assert (await http.get(f"/v1/buddies/{user.buddy_ids[0]}", headers=READ)).status_code == 404
    assert await db.fetchval("SELECT hits FROM tombstones") == 1


def _shard(buddy_id: str, shards: int) -> int:
    from service.ingest.wakeups import shard_of

    return shard_of(buddy_id, shards)


async def test_refresh_reconcile_and_backfill_of_an_erased_buddy_change_nothing(
    migrated: str,
    redis_url: str,
    db: store.Pool,
    redis: aioredis.Redis,
    fake: FakeHatched,
    fake_url: str,
) -> None:
    world, url = fake, fake_url
    settings = make_settings(
        migrated,
        redis_url,
        HATCHED_API_URL=url,
        HATCHED_API_KEY=world.api_key,
        MIRROR_REFRESH_SETTLE_S="0",
    )
    user, other = make_user("remote"), make_user("remote_kept", buddies=1)
    for u in (user, other):
        for i, buddy_id in enumerate(u.buddy_ids):
            world.set_buddy(
                buddy_json(buddy_id, user_id=u.user_id, name=u.names[i], image_url=u.images[i])
            )
    async with (
        serving(create_app(settings)) as server,
        httpx.AsyncClient(base_url=server, timeout=15) as http,
        running_worker(settings),
    ):
        await seed(http, db, user, other)
        await forget(http, user.user_id)
        # An operator's refresh: queued, then turned away without a call to Hatched.
        response = await http.post(f"/v1/buddies/{user.buddy_ids[0]}/refresh", headers=ADMIN)
        assert response.status_code == 202
        deadline = time.monotonic() + 10
        while not await db.fetchval("SELECT sum(hits) FROM tombstones"):
            assert time.monotonic() < deadline, "the refresh job never ran"
            await asyncio.sleep(0.05)
        assert world.calls[GET_BUDDY] == 0
        # A refresh whose call was made before the erasure and whose snapshot arrives after.
        remote = RemoteBuddy.from_json(world.buddies[user.buddy_ids[1]])
        assert await refresh.store_snapshot(db, remote, shards=settings.shards) is None
        # Reconciliation only ever picks mirrored buddies.
        settings_rec = settings.model_copy(update={"reconcile_after_s": 0.001})
        arq = await create_pool(
            redis_settings(redis_url, 1), default_queue_name=settings.queue_name
        )
        try:
            # Any client object: reconciliation must not call Hatched for an erased buddy.
            ctx = cast(
                WorkerContext,
                {"settings": settings_rec, "pool": db, "redis": arq, "hatched": object()},
            )
            assert await reconcile(ctx) == 1  # the other user's buddy alone
        finally:
            await arq.aclose()
        # Backfills, by buddy and by user, load the erased buddies from Hatched: stored nowhere.
        env = service_env(migrated, redis_url, HATCHED_API_URL=url, HATCHED_API_KEY=world.api_key)
        for args in (
            ("--buddy-id", user.buddy_ids[0], "--buddy-id", user.buddy_ids[1]),
            ("--user-id", user.user_id),
        ):
            done = await run_command(env, "backfill", *args)
            assert done.returncode == 0, done.stderr
            assert "backfill loaded 0 buddies" in done.stdout
        await wait_settled(db)
        await asyncio.sleep(0.5)
        await wait_settled(db)
        for buddy_id in user.buddy_ids:
            assert (await http.get(f"/v1/buddies/{buddy_id}", headers=READ)).status_code == 404
        assert (
            await http.get(f"/v1/buddies/{other.buddy_ids[0]}", headers=READ)
        ).status_code == 200
    assert await find_anywhere(db, user.needles) == []
    assert await db.fetchval("SELECT sum(hits) FROM tombstones") >= 5


async def test_a_later_bootstrap_of_the_user_is_a_new_sign_up(
    migrated: str,
    redis_url: str,
    db: store.Pool,
    redis: aioredis.Redis,
    fake: FakeHatched,
    fake_url: str,
) -> None:
    world, url = fake, fake_url
    world.hatch_delay_s = 0.1
    settings = make_settings(
        migrated, redis_url, HATCHED_API_URL=url, HATCHED_API_KEY=world.api_key
    )
    user = make_user("signup", buddies=1)
    world.set_buddy(buddy_json(user.buddy_ids[0], user_id=user.user_id, name=user.names[0]))
    bootstrap = f"/v1/users/{user.user_id}/buddy"
    async with (
        serving(create_app(settings)) as server,
        httpx.AsyncClient(base_url=server, timeout=30) as http,
        running_worker(settings),
    ):
        first = await http.post(bootstrap, json={}, headers=READ)
        assert first.status_code == 200 and first.json()["buddy_id"] == user.buddy_ids[0]
        await forget(http, user.user_id)
        assert await find_anywhere(db, user.needles) == []
        # Hatched still has the buddy: the mirror does not take it back.
        refused = await http.post(bootstrap, json={}, headers=READ)
        assert refused.status_code == 409 and refused.json()["code"] == "buddy_forgotten"
        assert await find_anywhere(db, user.needles[1:]) == []  # only the new row's user id
        # Erased at Hatched too: the next bootstrap hatches a new buddy for the same user id.
        del world.buddies[user.buddy_ids[0]]
        hatching = await http.post(bootstrap, json={}, headers=READ)
        assert hatching.status_code == 202, hatching.text
        deadline = time.monotonic() + 10
        while not world.outbox:
            assert time.monotonic() < deadline, "the fake never hatched"
            await asyncio.sleep(0.05)
        event = world.outbox[-1]
        headers, body = build_delivery(
            event.type,
            "v2",
            secret=SECRET,
            buddy_id=event.buddy_id,
            delivery_id=event.delivery_id,
            data=event.data,
        )
        assert (await http.post("/webhooks/hatched", content=body, headers=headers)).json()[
            "status"
        ] == "accepted"
        await wait_settled(db)
        mirrored = await http.get(bootstrap, headers=READ)
        assert mirrored.status_code == 200
        assert mirrored.json()["buddy_id"] == event.buddy_id != user.buddy_ids[0]
        assert mirrored.json()["user_id"] == user.user_id
        old = await http.get(f"/v1/buddies/{user.buddy_ids[0]}", headers=READ)
        assert old.status_code == 404


@pytest.mark.parametrize("run", range(4))
async def test_erasure_racing_a_burst_of_deliveries_leaves_nothing(
    settings: Settings, http: httpx.AsyncClient, db: store.Pool, run: int
) -> None:
    rng = random.Random()
    user, other = make_user(f"race{run}", buddies=2), make_user(f"calm{run}", buddies=1)
    async with running_worker(settings):
        await seed(http, db, user, other)
        # A third buddy whose hatch is stored but perhaps not applied when the erasure starts.
        late = f"{user.buddy_ids[0]}_late"
        user.buddy_ids.append(late)
        hatch = build_delivery(
            "buddy.hatched", "v2", secret=SECRET, buddy_id=late, data={"user_id": user.user_id}
        )
        assert (await post_all(http, [hatch]))[0].status_code == 202
        burst = [
            build_delivery(
                rng.choice(["coins.earned", "token.earned", "buddy.evolved"]),
                rng.choice(["v1", "v2"]),
                secret=SECRET,
                buddy_id=rng.choice(user.buddy_ids),
                data={"amount": 1, "user_id": user.user_id, "sequence": n},
            )
            for n in range(60)
        ]
        burst += [unmapped(rng.choice(user.buddy_ids), user.user_id) for _ in range(40)]
        rng.shuffle(burst)
        statuses: list[str] = []

        async def send(chunk: list[Delivery]) -> None:
            for headers, body in chunk:
                response = await http.post("/webhooks/hatched", content=body, headers=headers)
                assert response.status_code == 202, response.text
                statuses.append(response.json()["status"])
                await asyncio.sleep(rng.uniform(0, 0.01))

        async def erase() -> dict[str, Any]:
            await asyncio.sleep(rng.uniform(0, 0.25))
            return await forget(http, user.user_id)

        erasing = asyncio.create_task(erase())
        await asyncio.gather(*(send(burst[i::4]) for i in range(4)))
        assert (await erasing)["buddies"] == 3
        await wait_settled(db)
    assert await find_anywhere(db, user.needles) == []
    for buddy_id in user.buddy_ids:
        assert (await http.get(f"/v1/buddies/{buddy_id}", headers=READ)).status_code == 404
    assert (await http.get(f"/v1/buddies/{other.buddy_ids[0]}", headers=READ)).status_code == 200
    assert set(statuses) <= {"accepted", "unmapped", "forgotten"}
    assert "forgotten" in statuses


async def test_an_open_stream_of_an_erased_buddy_ends(
    settings: Settings, http: httpx.AsyncClient, db: store.Pool
) -> None:
    user = make_user("streamed", buddies=1)
    async with running_worker(settings):
        await seed(http, db, user)
    received: list[str] = []

    async def listen() -> None:
        path = f"/v1/buddies/{user.buddy_ids[0]}/stream"
        async with http.stream("GET", path, headers=READ) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    received.append(line)

    listener = asyncio.create_task(listen())
    deadline = time.monotonic() + 5
    while not received:
        assert time.monotonic() < deadline, "the stream sent nothing"
        await asyncio.sleep(0.05)
    await forget(http, user.user_id)
    await asyncio.wait_for(listener, 5)  # ends by itself
    assert len(received) == 1


async def test_forget_command_erases_each_user_and_says_what_went(
    settings: Settings, http: httpx.AsyncClient, db: store.Pool, migrated: str, redis_url: str
) -> None:
    first, second, kept = make_user("cli1"), make_user("cli2", buddies=1), make_user("cli3", 1)
    async with running_worker(settings):
        await seed(http, db, first, second, kept)
    done = await run_command(
        service_env(migrated, redis_url),
        "forget",
        "--user-id",
        first.user_id,
        "--user-id",
        second.user_id,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"forgot user {first.user_id!r}: 2 buddies; removed ledger 4,")
    assert "deliveries 8" in lines[0] and "buddies 2" in lines[0]
    assert lines[1].startswith(f"forgot user {second.user_id!r}: 1 buddies;")
    assert await find_anywhere(db, first.needles + second.needles) == []
    assert (await http.get(f"/v1/buddies/{kept.buddy_ids[0]}", headers=READ)).status_code == 200
    # Nothing to do without --user-id; a read token is not enough for the route.
    assert (await run_command(service_env(migrated, redis_url), "forget")).returncode == 2
    response = await http.delete(f"/v1/users/{kept.user_id}", headers=READ)
    assert response.status_code == 401


def test_no_body_reaches_the_logs(
    migrated: str, redis_url: str, db: store.Pool, tmp_path: Path
) -> None:
    """Through receipt, apply, a failed apply, erasure and a late delivery: the logs of `serve`
    and `worker` hold ids at most, never a value only the body had."""
    user = make_user("logged")
    env = service_env(migrated, redis_url)
    serve_log, worker_log = tmp_path / "serve.log", tmp_path / "worker.log"
    worker = Process(["worker"], env, worker_log).start()
    try:
        with serve(env, serve_log) as url, httpx.Client(base_url=url, timeout=15) as http:
            deliveries = history(user)
            # One the database refuses to apply (an amount out of bigint's range): its error
            # message would quote the value.
            deliveries.append(
                build_delivery(
                    "coins.earned",
                    "v2",
                    secret=SECRET,
                    buddy_id=user.buddy_ids[0],
                    data={"amount": 2**63 + 1, "balance": 2**63 + 1, "reason": user.names[1]},
                )
            )
            for headers, body in deliveries:
                assert http.post("/webhooks/hatched", content=body, headers=headers).is_success
            deadline = time.monotonic() + 30
            while any(
                http.get(f"/v1/buddies/{b}", headers=READ).status_code != 200
                for b in user.buddy_ids
            ):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            time.sleep(1.0)
            assert http.delete(f"/v1/users/{user.user_id}", headers=ADMIN).status_code == 200
            late = history(user)[0]
            assert http.post("/webhooks/hatched", content=late[1], headers=late[0]).is_success
    finally:
        worker.stop()
    text = serve_log.read_text() + worker_log.read_text()
    assert "user_forgotten" in text and "delivery_stored" in text
    for value in (*user.names, *user.images, str(2**63 + 1)):
        assert value not in text
