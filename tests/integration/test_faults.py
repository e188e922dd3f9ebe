"""Nothing lost, nothing doubled: real processes, real faults, exact end states."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from service import store
from service.apply.projector import mirrored
from service.config import Settings
from service.dev.samples import build_delivery
from tests.support.config import SECRET, make_settings
from tests.support.harness import Process, Proxy, run_command, send_like_hatched, serve, service_env
from tests.support.running import service_running, wait_settled
from tests.support.scenario import expected_states, learning_day, mirrored_states, signed

pytestmark = pytest.mark.slow


def _via(url: str, proxy: Proxy) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


async def _assert_exact(db: store.Pool, deliveries: list[tuple[dict[str, str], bytes]]) -> None:
    expected = expected_states(deliveries)
    actual = await mirrored_states(db)
    assert actual.keys() == expected.keys()
    for buddy_id, buddy in expected.items():
        assert mirrored(actual[buddy_id]) == mirrored(buddy), buddy_id
    rows = await db.fetch("SELECT status, count(*) AS n FROM delivery_states GROUP BY status")
    statuses = {r["status"]: r["n"] for r in rows}
    assert statuses == {"applied": len(deliveries)}, statuses
    # One ledger row per coin/token delivery: none missing, none doubled.
    currency = sum(1 for h, _ in deliveries if any(t in str(h) for t in ("coin", "token")))
    assert await db.fetchval("SELECT count(*) FROM ledger") == currency


async def _started(log: Path, times: int) -> None:
    deadline = time.monotonic() + 30
    while log.read_text().count("Starting worker") < times:
        assert time.monotonic() < deadline, "the worker did not start"
        await asyncio.sleep(0.05)


def _burst(seed: int, buddies: int, per_buddy: int) -> list[tuple[dict[str, str], bytes]]:
    rng = random.Random(seed)
    deliveries = signed(learning_day(buddies, per_buddy, rng), "mixed", rng)
    rng.shuffle(deliveries)
    return deliveries


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
async def test_worker_stopped_mid_burst_applies_everything_exactly_once(
    migrated: str,
    redis_url: str,
    db: store.Pool,
    redis: object,
    tmp_path: Path,
    sig: signal.Signals,
) -> None:
    env = service_env(migrated, redis_url, MIRROR_APPLY_BATCH_SIZE="50")
    deliveries = _burst(7, buddies=40, per_buddy=40)
    log = tmp_path / "worker.log"
    with serve(env, tmp_path / "serve.log") as url:
        worker = Process(["worker"], env, log).start()
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            sending = asyncio.create_task(send_like_hatched(http, deliveries, concurrency=8))
            kills = 0
            while not sending.done() and kills < 4:
                await asyncio.sleep(0.6)
                if sig == signal.SIGTERM:
                    # A signal before the handlers exist just ends the process; wait until the
                    # worker runs, as an orchestrator's stop of a running pod would.
                    await _started(log, kills + 1)
                started = time.monotonic()
                code = await asyncio.to_thread(worker.kill, sig)
                if sig == signal.SIGTERM:
                    # Finishes the batch in hand and hands its shard on: a prompt, clean exit.
                    assert code == 0 and time.monotonic() - started < 10, code
                kills += 1
                worker = Process(["worker"], env, log).start()
            finals = await sending
        assert kills >= 3, "the burst ended before the worker was killed three times"
        assert finals == {202: len(deliveries)}
        await wait_settled(db, within=60)
        worker.stop()
    await _assert_exact(db, deliveries)


class _OutageOnCommand(Proxy):
    """A proxy that lets everything through until the client sends `trigger`, then drops that
    connection and refuses new ones for `outage_s`: an outage that begins at a chosen step."""

    def __init__(self, host: str, port: int, trigger: bytes, outage_s: float) -> None:
        super().__init__(host, port)
        self._trigger, self._outage_s = trigger, outage_s
        self.over = asyncio.Event()
        self._outage: asyncio.Task[None] | None = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._outage is not None:
            await super()._accept(reader, writer)
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        answers = asyncio.create_task(self._pipe(up_reader, writer))
        try:
            while data := await reader.read(65536):
                if self._outage is None and self._trigger in data:
                    assert self._server is not None
                    self._server.close()  # refuse new connections from now on
                    self._outage = asyncio.create_task(self._heal())
                    return
                up_writer.write(data)
                await up_writer.drain()
        finally:
            answers.cancel()
            up_writer.close()
            writer.close()

    async def _heal(self) -> None:
        self._server = None
        await asyncio.sleep(self._outage_s)
        await self.restore()
        self.over.set()


async def test_a_worker_rides_out_redis_going_away_while_it_starts(
    migrated: str, redis_url: str, redis: Any, tmp_path: Path
) -> None:
    """Redis answers the worker's first connection, then goes away at arq's first command on
    it (INFO, before the startup job): the worker waits for it instead of exiting."""
    proxy = _OutageOnCommand(*_host_port(redis_url), trigger=b"$4\r\nINFO\r\n", outage_s=2)
    await proxy.start()
    env = service_env(migrated, _via(redis_url, proxy))
    worker = Process(["worker"], env, tmp_path / "worker.log").start()
    try:
        await asyncio.wait_for(proxy.over.wait(), 30)
        deadline = time.monotonic() + 30
        # arq writes its health-check key once it polls, i.e. once startup went through.
        while not await redis.keys("*health-check*"):
            assert worker.proc is not None and worker.proc.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, "the worker did not start polling"
            await asyncio.sleep(0.1)
        assert "redis_unavailable_at_start" in (tmp_path / "worker.log").read_text()
    finally:
        worker.stop()
        await proxy.close()


async def test_redis_unreachable_during_a_burst_loses_nothing(
    migrated: str, redis_url: str, db: store.Pool, redis: object, tmp_path: Path
) -> None:
    proxy = await Proxy(*_host_port(redis_url)).start()
    env = service_env(migrated, _via(redis_url, proxy))
    deliveries = _burst(11, buddies=30, per_buddy=30)
    try:
        with serve(env, tmp_path / "serve.log") as url:
            worker = Process(["worker"], env, tmp_path / "worker.log").start()
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                sending = asyncio.create_task(send_like_hatched(http, deliveries))
                await asyncio.sleep(0.5)
                await proxy.cut()
                await asyncio.sleep(3)
                await proxy.restore()
                finals = await sending
            assert finals == {202: len(deliveries)}, "a Redis outage must not cost a 2xx"
            try:
                await wait_settled(db, within=60)
            finally:
                worker.stop()
    finally:
        await proxy.close()
    await _assert_exact(db, deliveries)


async def test_postgres_unreachable_for_the_receiver_answers_503_then_converges(
    migrated: str, redis_url: str, db: store.Pool, redis: object, tmp_path: Path
) -> None:
    proxy = await Proxy(*_host_port(migrated)).start()
    receiver_env = service_env(_via(migrated, proxy), redis_url)
    worker_env = service_env(migrated, redis_url)
    deliveries = _burst(13, buddies=30, per_buddy=30)
    statuses: list[int] = []
    try:
        with serve(receiver_env, tmp_path / "serve.log") as url:
            worker = Process(["worker"], worker_env, tmp_path / "worker.log").start()
            async with httpx.AsyncClient(
                base_url=url, timeout=10, event_hooks={"response": [_record(statuses)]}
            ) as http:
                sending = asyncio.create_task(send_like_hatched(http, deliveries))
                await asyncio.sleep(0.5)
                await proxy.cut()
                await asyncio.sleep(2)
                await proxy.restore()
                finals = await sending
            await wait_settled(db, within=60)
            worker.stop()
    finally:
        await proxy.close()
    assert 503 in statuses, "the outage was not seen by the sender"
    assert set(finals) <= {200, 202} and sum(finals.values()) == len(deliveries)
    await _assert_exact(db, deliveries)


def _record(into: list[int]):  # type: ignore[no-untyped-def]
    async def hook(response: httpx.Response) -> None:
        into.append(response.status_code)

    return hook


async def test_poison_delivery_ends_dead_while_later_ones_apply(
    migrated: str, redis_url: str, db: store.Pool, redis: object
) -> None:
    settings = make_settings(
        migrated, redis_url, MIRROR_APPLY_MAX_ATTEMPTS="3", MIRROR_APPLY_BACKOFF_S="0.05"
    )

    buddy = "buddy_poison"
    sequence = [
        build_delivery("buddy.hatched", "v2", secret=SECRET, buddy_id=buddy),
        # A balance no bigint holds (JSON carries it): the database refuses it, every time.
        build_delivery(
            "coins.earned",
            "v2",
            secret=SECRET,
            buddy_id=buddy,
            data={"amount": 1, "balance": 2**64 - 1, "occurred_at": "2026-01-01T00:00:01Z"},
        ),
        build_delivery(
            "coins.earned",
            "v2",
            secret=SECRET,
            buddy_id=buddy,
            data={"amount": 5, "balance": 5, "occurred_at": "2026-01-01T00:00:02Z"},
        ),
        build_delivery("skill.leveled", "v1", secret=SECRET, buddy_id=buddy),
    ]
    async with service_running(settings) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            for headers, body in sequence:
                assert (
                    await http.post("/webhooks/hatched", content=body, headers=headers)
                ).status_code == 202
        await wait_settled(db, within=30)
    rows = await db.fetch("SELECT status, reason, attempts FROM delivery_states ORDER BY seq")
    assert [r["status"] for r in rows] == ["applied", "dead", "applied", "applied"]
    assert rows[1]["attempts"] == 3 and "apply_error" in rows[1]["reason"]
    found = await store.get_buddy(db, buddy)
    assert found is not None
    assert found[0].coins == 5 and "pronunciation" in found[0].skills


async def test_rebuild_from_the_log_equals_the_live_state(
    settings: Settings, db: store.Pool, tmp_path: Path
) -> None:

    deliveries = _burst(17, buddies=20, per_buddy=25)
    async with service_running(settings) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            assert await send_like_hatched(http, deliveries) == {202: len(deliveries)}
        await wait_settled(db)
    live = {
        r["buddy_id"]: (r["version"], r["updated_at"])
        for r in await db.fetch("SELECT buddy_id, version, updated_at FROM buddies")
    }
    before = await mirrored_states(db)

    env = service_env(settings.database_url or "", settings.redis_url or "")
    rebuild = await run_command(env, "rebuild")
    assert rebuild.returncode == 0, rebuild.stderr
    assert "rebuilt 20 buddies, 0 changed" in rebuild.stdout
    after = {
        r["buddy_id"]: (r["version"], r["updated_at"])
        for r in await db.fetch("SELECT buddy_id, version, updated_at FROM buddies")
    }
    assert after == live, "a rebuild of an up-to-date mirror changes nothing"

    # Damage one buddy behind the service's back; a rebuild of it restores the live state.
    victim = sorted(before)[0]
    await db.execute("UPDATE buddies SET coins = -1, tokens = '{}' WHERE buddy_id = $1", victim)
    rebuild = await run_command(env, "rebuild", "--buddy-id", victim)
    assert "1 changed" in rebuild.stdout
    restored = await mirrored_states(db)
    assert {b: mirrored(s) for b, s in restored.items()} == {
        b: mirrored(s) for b, s in before.items()
    }
    await _assert_exact(db, deliveries)
