"""The commands, run as a user runs them: as processes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from service import store
from service.apply.replay import requeue
from service.config import Settings
from service.ingest.events import PARSER
from tests.support.config import API_TOKEN, SECRET
from tests.support.databases import scratch_database
from tests.support.harness import run_command, service_env
from tests.support.running import running_worker, wait_settled

CLI = [sys.executable, "-m", "service"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HATCHED_", "MIRROR_"))}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize(
    ("command", "env", "named"),
    [
        ("serve", {}, "DATABASE_URL"),
        (
            "serve",
            {"DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://x"},
            "HATCHED_WEBHOOK_SECRETS",
        ),
        ("worker", {"REDIS_URL": "redis://x"}, "DATABASE_URL"),
        ("serve", {"HATCHED_SIGNATURE_TOLERANCE_S": "soon"}, "HATCHED_SIGNATURE_TOLERANCE_S"),
        ("worker", {"DATABASE_URL": "mysql://nope"}, "DATABASE_URL"),
    ],
)
def test_refuses_to_start_half_configured(
    command: str, env: dict[str, str], named: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [*CLI, command], env=_env(**env), cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert named in result.stderr


def sql_upto(root: Path, last: str) -> Path:
    """A copy of sql/ holding the migrations numbered up to `last`."""
    folder = root / f"sql_upto_{last}"
    folder.mkdir()
    for path in sorted(store.SQL_DIR.glob("*.sql")):
        if path.name[:4] <= last:
            (folder / path.name).write_text(path.read_text())
    return folder


async def test_migrate_is_idempotent_and_safe_in_parallel(
    database_url: str, tmp_path: Path
) -> None:
    async with scratch_database(database_url) as dsn:
        procs = [
            await asyncio.create_subprocess_exec(
                *CLI,
                "migrate",
                env=_env(DATABASE_URL=dsn),
                cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for _ in range(3)
        ]
        outputs = [await p.communicate() for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], outputs
        said = [out.decode() for out, _ in outputs]
        assert sum("0001_core" in s for s in said) == 1, said
        again = await asyncio.create_subprocess_exec(
            *CLI,
            "migrate",
            env=_env(DATABASE_URL=dsn),
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await again.communicate()
        assert again.returncode == 0 and b"up to date" in out
        check = await store.create_pool(dsn, size=1, timeout_s=10)
        try:
            assert await check.fetchval("SELECT count(*) FROM schema_migrations") >= 1
        finally:
            await check.close()


async def test_an_existing_inbox_keeps_every_outcome_across_the_state_table_migration(
    database_url: str, tmp_path: Path
) -> None:
    """sql/0008 moves outcomes out of `deliveries`: an install upgraded with deliveries in
    every state still knows what is pending, applied, retried and dead, and acts on it."""
    before = sql_upto(tmp_path, "0007")
    async with scratch_database(database_url) as dsn:
        pool = await store.create_pool(dsn, size=1, timeout_s=10)
        try:
            async with pool.acquire() as conn:
                await store.migrate(conn, before)
                await conn.execute(
                    """
                    INSERT INTO deliveries (delivery_id, format, event_type, event_id, buddy_id,
                                            shard, signed_at, headers, body, status, reason,
                                            attempts, next_attempt_at, applied_at)
                    VALUES ('d1', 'v1', 'coins.earned', 'evt_1', 'b1', 3, now(), '{}', '\\x00',
                            'applied', NULL, 1, NULL, now()),
                           ('d2', 'v2', 'coins.earned', NULL, 'b1', 3, now(), '{}', '\\x00',
                            'dead', 'apply_error: boom', 5, NULL, now()),
                           ('d3', 'v2', 'skill.updated', NULL, 'b2', 3, now(), '{}', '\\x00',
                            'accepted', 'apply_error: later', 2, now() + interval '1 hour',
                            NULL),
                           ('d4', 'v2', 'badge.awarded', NULL, 'b2', 3, now(), '{}', '\\x00',
                            'accepted', NULL, 0, NULL, NULL)
                    """
                )
                was = [dict(r) for r in await conn.fetch("SELECT * FROM deliveries ORDER BY seq")]
                # Later migrations follow; these two come first.
                assert (await store.migrate(conn))[:2] == [
                    "0008_delivery_states",
                    "0009_orphan_delivery_states",
                ]
                now = [dict(r) for r in await conn.fetch("SELECT * FROM inbox ORDER BY seq")]
                assert now == was
                # The worker's own queries see the same: the one due delivery, the applied
                # event, the dead count.
                async with conn.transaction():
                    claimed = await store.claim_batch(conn, [3], 10, PARSER)
                assert [r["delivery_id"] for r in claimed] == ["d4"]
                assert await store.seen_event_ids(conn, ["evt_1", "evt_2"]) == {"evt_1"}
                pending, _, dead = await store.inbox_stats(conn)
                assert (pending, dead) == (2, 1)
                assert "status" not in {
                    r["column_name"]
                    for r in await conn.fetch(
                        "SELECT column_name FROM information_schema.columns"
                        " WHERE table_name = 'deliveries'"
                    )
                }
        finally:
            await pool.close()


async def test_a_delivery_the_previous_release_stores_during_the_split_is_applied(
    database_url: str, tmp_path: Path
) -> None:
    """Upgrades migrate while the previous release still serves. sql/0008 copies the outcomes,
    then waits for its lock on `deliveries`; a delivery that an old receiver commits in between
    has no state row after 0008. sql/0009 gives it one, and the worker claims it."""
    async with scratch_database(database_url) as dsn:
        pool = await store.create_pool(dsn, size=3, timeout_s=10)
        try:
            async with pool.acquire() as conn:
                await store.migrate(conn, sql_upto(tmp_path, "0007"))
            async with pool.acquire() as old_receiver, pool.acquire() as migrator:
                receipt = old_receiver.transaction()
                await receipt.start()
                # The 0007 release's INSERT: outcome columns in `deliveries`.
                await old_receiver.execute(
                    "INSERT INTO deliveries (delivery_id, format, event_type, buddy_id, shard,"
                    " signed_at, headers, body, status)"
                    " VALUES ('late', 'v2', 'coins.earned', 'b1', 5, now(), '{}', '\\x00',"
                    " 'accepted')"
                )
                split = asyncio.create_task(store.migrate(migrator, sql_upto(tmp_path, "0008")))
                pid = migrator.get_server_pid()
                for _ in range(200):
                    waiting = await pool.fetchval(
                        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
                    )
                    if waiting:
                        break
                    await asyncio.sleep(0.05)
                assert waiting, "0008 never waited for the lock on deliveries"
                await receipt.commit()
                assert await split == ["0008_delivery_states"]
            stateless = (
                "SELECT d.delivery_id FROM deliveries AS d WHERE NOT EXISTS"
                " (SELECT 1 FROM delivery_states AS s WHERE s.seq = d.seq)"
            )
            assert [r["delivery_id"] for r in await pool.fetch(stateless)] == ["late"]
            async with pool.acquire() as conn:
                assert (await store.migrate(conn))[:1] == ["0009_orphan_delivery_states"]
                assert await pool.fetch(stateless) == []
                async with conn.transaction():
                    claimed = await store.claim_batch(conn, [5], 10, PARSER)
                assert [r["delivery_id"] for r in claimed] == ["late"]
        finally:
            await pool.close()


# The receiver's statement before sql/0018: one array per column.
_PREVIOUS_INSERT = """
SELECT delivery_id, seq
FROM store_deliveries($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[],
                      $7::timestamptz[], $8::timestamptz[], $9::text[], $10::bytea[],
                      $11::text[], $12::text[], $13::bytea[], $14::text[], $15::smallint[])
"""


async def test_the_previous_release_stores_deliveries_like_this_one_after_the_upgrade(
    database_url: str,
) -> None:
    """sql/0018 gives the receiver a statement taking one array of rows; a receiver of the
    previous release, still serving during a rolling upgrade, calls the old one. Both store
    the same rows, and both refuse a repeated delivery id or signature."""
    now = datetime.now(UTC)

    def delivery(delivery_id: str, signature: bytes) -> store.NewDelivery:
        return store.NewDelivery(
            delivery_id=delivery_id,
            format="v1",
            event_type="coins.earned",
            event_id=f"evt_{delivery_id}",
            buddy_id="b1",
            shard=7,
            occurred_at=now,
            signed_at=now,
            headers={"x-hatched-event": "coins.earned"},
            body=b'{"x": "\\u00e9"}',
            status="accepted",
            reason=None,
            signature=signature,
            event_data='{"amount": 5}',
            event_parser=PARSER,
        )

    async with scratch_database(database_url) as dsn:
        pool = await store.create_pool(dsn, size=1, timeout_s=10)
        try:
            async with pool.acquire() as conn:
                await store.migrate(conn)
                old, new = delivery("old", b"s" * 32), delivery("new", b"t" * 32)
                columns = [list(c) for c in zip(old.row(), strict=True)]
                stored_old = await conn.fetch(_PREVIOUS_INSERT, *columns)
                assert [r["delivery_id"] for r in stored_old] == ["old"]
                assert [
                    r["delivery_id"] for r in await conn.fetch(_PREVIOUS_INSERT, *columns)
                ] == []
                assert await store.insert_deliveries(conn, [new]) == [stored_old[0]["seq"] + 1]
                # Its signature again under a new id: a replay, not stored.
                replay = dataclasses.replace(new, delivery_id="replay")
                assert await store.insert_deliveries(conn, [new, replay]) == [None, None]
                # Alone, so that the database's signature check, not the batch's, refuses it.
                assert await store.insert_deliveries(conn, [replay]) == [None]
                rows = [
                    dict(r)
                    for r in await conn.fetch(
                        "SELECT d.*, s.status, s.reason, s.attempts, s.applied_at"
                        " FROM deliveries AS d JOIN delivery_states AS s USING (seq) ORDER BY seq"
                    )
                ]
        finally:
            await pool.close()
    assert len(rows) == 2
    different = {"seq", "delivery_id", "event_id", "received_at"}
    assert {k: v for k, v in rows[0].items() if k not in different} == {
        k: v for k, v in rows[1].items() if k not in different
    }
    assert rows[1]["headers"] == {"x-hatched-event": "coins.earned"}
    assert rows[1]["event_data"] == '{"amount": 5}'  # json, kept as the text given
    assert rows[1]["body"] == new.body
    assert (rows[1]["shard"], rows[1]["status"], rows[1]["event_parser"]) == (7, "accepted", PARSER)


async def test_a_migration_may_run_longer_than_the_command_timeout(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migrations on a large install take minutes; the service's statement limit must not cut
    them off (it would roll each attempt back)."""
    monkeypatch.setattr(store.pool, "COMMAND_TIMEOUT_S", 0.2)
    slow = sql_upto(tmp_path, "9999")
    (slow / "9000_slow.sql").write_text("SELECT pg_sleep(0.6);")
    async with scratch_database(database_url) as dsn:
        bounded = await store.create_pool(dsn, size=1, timeout_s=10)
        try:
            with pytest.raises(TimeoutError):
                await bounded.execute("SELECT pg_sleep(0.6)")
        finally:
            await bounded.close()
        assert (await store.migrate_database(dsn, slow))[-1] == "9000_slow"


async def _store_dead(server: str, db: store.Pool, delivery_id: str) -> None:
    """A delivery the receiver stores as dead: a signed body that is not JSON."""
    from service.ingest.signatures import signature_headers

    body = b"not json"
    headers = {
        "X-Hatched-Delivery": delivery_id,
        **signature_headers(body, SECRET, int(time.time()), "v2"),
    }
    async with httpx.AsyncClient(base_url=server) as http:
        response = await http.post("/webhooks/hatched", content=body, headers=headers)
    assert response.status_code == 202, response.text
    assert await db.fetchval("SELECT status FROM inbox WHERE delivery_id = $1", delivery_id) == (
        "dead"
    )


async def test_replay_requeues_dead_deliveries_and_the_worker_applies_them_again(
    settings: Settings, server: str, db: store.Pool
) -> None:
    await _store_dead(server, db, "dead-cli-1")
    result = await run_command(
        service_env(settings.database_url or "", settings.redis_url or ""), "replay"
    )
    assert result.returncode == 0, result.stderr
    assert "requeued 1 deliveries" in result.stdout
    assert await db.fetchval("SELECT status FROM delivery_states") == "accepted"
    async with running_worker(settings):
        await wait_settled(db)
    # Applied once more: the body is still not JSON, so it is dead again, after one attempt.
    row = await db.fetchrow("SELECT status, reason, attempts FROM inbox")
    assert row is not None and dict(row) == {
        "status": "dead",
        "reason": "body_not_json",
        "attempts": 1,
    }


async def test_replay_may_run_longer_than_the_command_timeout(
    settings: Settings, server: str, db: store.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`replay --status all` on a large inbox is one long UPDATE; here a row lock held for
    longer than the (lowered) statement limit makes it long."""
    await _store_dead(server, db, "dead-cli-2")
    monkeypatch.setattr(store.pool, "COMMAND_TIMEOUT_S", 0.2)
    async with db.acquire() as holder:
        lock = holder.transaction()
        await lock.start()
        await holder.execute("SELECT 1 FROM delivery_states FOR UPDATE")

        async def release() -> None:
            await asyncio.sleep(0.6)
            await lock.rollback()

        releasing = asyncio.create_task(release())
        assert await requeue(settings, None, None, None) == 1
        await releasing
    assert await db.fetchval("SELECT status FROM delivery_states") == "accepted"


async def test_changed_migration_is_refused(
    database_url: str, migrated: str, tmp_path: Path
) -> None:
    pool = await store.create_pool(migrated, size=1, timeout_s=10)
    try:
        for path in sorted(store.SQL_DIR.glob("*.sql")):
            (tmp_path / path.name).write_text(path.read_text() + "\n-- edited after release\n")
        async with pool.acquire() as conn:
            with pytest.raises(store.MigrationError, match="changed after it was applied"):
                await store.migrate(conn, tmp_path)
    finally:
        await pool.close()


@pytest.fixture
def dev_process(tmp_path: Path) -> Iterator[str]:
    """`hatched-mirror dev` with nothing configured: embedded Postgres and Redis."""
    port = _free_port()
    proc = subprocess.Popen(
        [*CLI, "dev", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        env=_env(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        else:
            pytest.fail("dev did not come up")
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        yield url
    finally:
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    assert "webhook secret" in output
    # A stopped `dev` leaves nothing running: the embedded Postgres removed its pid file.
    assert proc.returncode == 0, output[-2000:]
    assert not list((tmp_path / "data").rglob("postmaster.pid"))


def test_dev_then_send_test_event_shows_the_buddy(dev_process: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *CLI,
            "send-test-event",
            "buddy.hatched",
            "--buddy-id",
            "buddy_dev_1",
            "--url",
            f"{dev_process}/webhooks/hatched",
        ],
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("202")
    deadline = time.monotonic() + 10
    headers = {"Authorization": "Bearer dev-api-token-local"}
    while True:
        response = httpx.get(f"{dev_process}/v1/buddies/buddy_dev_1", headers=headers)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert response.status_code == 200
    assert response.json()["name"] == "Pip"


def test_send_test_event_rejects_unknown_types(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "send-test-event", "no.such", "--url", "http://127.0.0.1:1/x", "--secret", SECRET],
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "buddy.hatched" in result.stderr  # the message lists what is known


def test_send_test_event_reports_an_unreachable_url(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *CLI,
            "send-test-event",
            "coins.earned",
            "--url",
            "http://127.0.0.1:1/webhooks/hatched",
            "--secret",
            SECRET,
            "--format",
            "v1",
        ],
        env=_env(MIRROR_API_TOKENS=API_TOKEN),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "could not POST" in result.stderr
