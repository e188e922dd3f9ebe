"""The worker's sender: the change feed POSTed to each subscription's endpoint, at least once,
in order per buddy.

Ownership. Each worker process runs one Sender. It holds a session advisory lock per
subscription it owns, on a connection of its own: one process sends for a subscription at a
time, and if the process dies its locks go with its connection and another worker's sender
takes the subscription at its next look (at once, on the NOTIFY of a change, or within
OWN_EVERY_S). A process that loses its lock connection stops its dispatchers before it
connects again, so it never sends for a subscription it may no longer own.

Dispatching (one Dispatcher per owned subscription) is rounds of: copy the visible feed past
the cursor into the outbox (service/store/subscriptions.py, FILL); send the oldest outbox
entry of each buddy not already in flight, up to MIRROR_SUBSCRIPTION_MAX_IN_FLIGHT at once;
record every finished send in one statement (acknowledged entries leave the outbox, failed
ones back off). A buddy's next change is sent only once the previous one's row is gone, so
per-buddy order holds across retries, restarts and a change of owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import asyncpg
import httpx
import structlog

from service import __version__, metrics
from service.config import Settings
from service.problems import DATABASE_ERRORS
from service.store import NOTIFY_CHANNEL, Position, create_pool
from service.store import subscriptions as store
from service.store.pool import Pool
from service.subscriptions.policy import backoff_s, error_text, signed_headers

log = structlog.get_logger(__name__)

# How often a sender looks for subscriptions nobody owns (a NOTIFY makes it look at once).
OWN_EVERY_S = 5.0
# Feed entries copied into an outbox per round, and the most an outbox holds before copying
# waits for acknowledgements: bounded memory and bounded rows, whatever the lag.
FILL_BATCH = 1000
OUTBOX_LIMIT = 10_000
# The longest a dispatcher sleeps with nothing to do (a missed NOTIFY costs at most this).
IDLE_WAIT_S = 1.0
# Entries visible soon: committed but behind an older transaction still running.
HELD_WAIT_S = 0.02
# Of an endpoint's answer, at most this much is read (the status is what counts).
MAX_ANSWER_BYTES = 65_536


@dataclass(frozen=True, slots=True)
class Outcome:
    position: Position
    ok: bool
    # delivered, rejected (a non-2xx answer), timeout, unreachable
    kind: str
    error: str | None
    attempts: int
    committed_at_s: float


class Dispatcher:
    """Sends one subscription's changes while this process owns it."""

    def __init__(self, sub: store.Sendable, pool: Pool, settings: Settings) -> None:
        self.sub = sub
        self.cursor = sub.cursor
        self._pool = pool
        self._settings = settings
        self.wake = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[Outcome]] = {}
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.subscription_timeout_s),
            follow_redirects=False,
            limits=httpx.Limits(
                max_connections=settings.subscription_max_in_flight,
                max_keepalive_connections=settings.subscription_max_in_flight,
            ),
            headers={"user-agent": f"hatched-mirror/{__version__}"},
            trust_env=False,
        )
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop now: sends in flight are abandoned (their entries stay in the outbox and go
        out again, from whichever worker owns the subscription next)."""
        tasks = [t for t in (self.task, *self._in_flight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._in_flight.clear()
        await self._client.aclose()

    async def _run(self) -> None:
        sid = self.sub.subscription_id
        outbox = await store.outbox_size(self._pool, sid)
        while True:
            self.wake.clear()
            more = held = False
            if outbox >= OUTBOX_LIMIT:
                # Pruning and erasure remove outbox rows too: count again before waiting.
                outbox = await store.outbox_size(self._pool, sid)
            if outbox < OUTBOX_LIMIT:
                filled = await store.fill(self._pool, sid, self.cursor, self.sub.fields, FILL_BATCH)
                if filled.cursor is not None:
                    self.cursor = filled.cursor
                outbox += filled.queued
                more, held = filled.scanned == FILL_BATCH, filled.held
            slots = self._settings.subscription_max_in_flight - len(self._in_flight)
            if slots > 0:
                for entry in await store.due(self._pool, sid, list(self._in_flight), slots):
                    self._in_flight[entry.buddy_id] = asyncio.create_task(self._send(entry))
            await self._wait(more, held)
            finished = {b: t for b, t in self._in_flight.items() if t.done()}
            if not finished:
                continue
            for buddy_id in finished:
                del self._in_flight[buddy_id]
            outcomes = [t.result() for t in finished.values()]
            status = await self._settle(outcomes)
            outbox -= sum(o.ok for o in outcomes)
            if status is None or status == "disabled":
                log.warning("subscription_stopped", subscription_id=sid, status=status)
                return

    async def _wait(self, more: bool, held: bool) -> None:
        if more:
            return  # the feed has more to copy now
        if held:
            timeout = HELD_WAIT_S
        elif len(self._in_flight) < self._settings.subscription_max_in_flight:
            due_in = await store.next_due_in(
                self._pool, self.sub.subscription_id, list(self._in_flight)
            )
            timeout = IDLE_WAIT_S if due_in is None else min(max(due_in, 0.0), IDLE_WAIT_S)
        else:
            timeout = IDLE_WAIT_S
        if timeout <= 0:
            return
        woken = asyncio.ensure_future(self.wake.wait())
        try:
            await asyncio.wait(
                [woken, *self._in_flight.values()],
                timeout=timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            woken.cancel()

    async def _settle(self, outcomes: list[Outcome]) -> str | None:
        settings = self._settings
        sid = self.sub.subscription_id
        acked = [o.position for o in outcomes if o.ok]
        failed = [
            (
                o.position,
                backoff_s(
                    o.attempts + 1,
                    settings.subscription_backoff_s,
                    settings.subscription_backoff_max_s,
                ),
            )
            for o in outcomes
            if not o.ok
        ]
        errors = [o.error for o in outcomes if o.error is not None]
        status = await store.settle(
            self._pool,
            sid,
            acked,
            failed,
            errors[-1] if errors else None,
            settings.subscription_disable_after_s,
        )
        now = time.time()
        for o in outcomes:
            metrics.SUBSCRIPTION_DELIVERIES.labels(subscription_id=sid, outcome=o.kind).inc()
            if o.ok:
                metrics.SUBSCRIPTION_DELIVERY_LAG.observe(max(0.0, now - o.committed_at_s))
        if failed:
            log.warning(
                "subscription_delivery_failed",
                subscription_id=sid,
                failed=len(failed),
                delivered=len(acked),
                error=errors[-1] if errors else None,
            )
        return status

    async def _send(self, entry: store.Due) -> Outcome:
        headers = signed_headers(self.sub.secret, entry.change_id, entry.doc, time.time())
        committed = entry.committed_at.timestamp()

        def outcome(ok: bool, kind: str, error: str | None = None) -> Outcome:
            return Outcome(entry.position, ok, kind, error, entry.attempts, committed)

        try:
            async with self._client.stream(
                "POST", self.sub.url, content=entry.doc.encode(), headers=headers
            ) as answer:
                read = 0
                async for chunk in answer.aiter_raw():
                    read += len(chunk)
                    if read >= MAX_ANSWER_BYTES:
                        break
                status = answer.status_code
        except httpx.TimeoutException:
            return outcome(False, "timeout", "timed out")
        except (httpx.HTTPError, OSError) as exc:
            return outcome(False, "unreachable", error_text(f"{type(exc).__name__}: {exc}"))
        if 200 <= status < 300:
            return outcome(True, "delivered")
        note = " (redirects are not followed)" if 300 <= status < 400 else ""
        return outcome(False, "rejected", f"HTTP {status}{note}")


class Sender:
    """One per worker process: takes the subscriptions no other process owns, and sends."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._dispatchers: dict[str, Dispatcher] = {}
        self._look = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pool: Pool | None = None

    @property
    def owned(self) -> frozenset[str]:
        return frozenset(self._dispatchers)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._stop_all()
        if self._pool is not None:
            await self._pool.close()

    async def _stop_all(self) -> None:
        dispatchers = list(self._dispatchers.values())
        self._dispatchers.clear()
        await asyncio.gather(*(d.stop() for d in dispatchers), return_exceptions=True)

    async def _run(self) -> None:
        settings = self._settings
        # Its own two connections, so sending never takes one the apply jobs wait for.
        self._pool = await create_pool(
            settings.postgres_dsn, size=2, timeout_s=settings.db_timeout_s
        )
        delay = 0.5
        while True:
            conn: asyncpg.Connection[asyncpg.Record] | None = None
            try:
                conn = await asyncpg.connect(
                    settings.postgres_dsn,
                    timeout=settings.db_timeout_s,
                    command_timeout=max(settings.db_timeout_s, 5.0),
                )
                await self._own(conn)
            except DATABASE_ERRORS as exc:
                log.warning("subscription_sender_unavailable", error=repr(exc))
            finally:
                # Without the lock connection nothing is owned any more.
                await self._stop_all()
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=1)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _on_subscription(self, *_args: object) -> None:
        self._look.set()

    def _on_change(self, *_args: object) -> None:
        for dispatcher in self._dispatchers.values():
            dispatcher.wake.set()

    async def _own(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        assert self._pool is not None
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        await conn.add_listener(store.SUBSCRIPTIONS_CHANNEL, self._on_subscription)
        # Every applied change NOTIFYs its buddy (the read streams' channel): a wake-up.
        await conn.add_listener(NOTIFY_CHANNEL, self._on_change)
        while not lost.is_set():
            self._look.clear()
            wanted = {s.subscription_id: s for s in await store.sendable(conn)}
            for sid, dispatcher in list(self._dispatchers.items()):
                if sid not in wanted or (dispatcher.task is not None and dispatcher.task.done()):
                    del self._dispatchers[sid]
                    await dispatcher.stop()
                    await store.disown(conn, sid)
            for sid, sub in wanted.items():
                if sid not in self._dispatchers and await store.try_own(conn, sid):
                    dispatcher = Dispatcher(sub, self._pool, self._settings)
                    dispatcher.start()
                    assert dispatcher.task is not None
                    dispatcher.task.add_done_callback(self._ended)
                    self._dispatchers[sid] = dispatcher
                    log.info("subscription_owned", subscription_id=sid)
            waits = [asyncio.ensure_future(e.wait()) for e in (self._look, lost)]
            try:
                await asyncio.wait(waits, timeout=OWN_EVERY_S, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A dispatcher stopped by itself (disabled, deleted, or an error): look again now."""
        if not task.cancelled() and task.exception() is not None:
            log.warning("subscription_dispatcher_failed", error=repr(task.exception()))
        self._look.set()
