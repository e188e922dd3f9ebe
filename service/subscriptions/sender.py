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
import heapq
import time
from collections import deque
from dataclasses import dataclass, field, replace

import aiohttp
import asyncpg
import structlog

from service import __version__, metrics
from service.config import Settings
from service.problems import DATABASE_ERRORS
from service.store import NOTIFY_CHANNEL, create_pool
from service.store import subscriptions as store
from service.store.erasure import FORGOTTEN_SUFFIX
from service.store.pool import Pool
from service.subscriptions.policy import backoff_s, error_text, signed_headers

log = structlog.get_logger(__name__)

# How often a sender looks for subscriptions nobody owns (a NOTIFY makes it look at once).
OWN_EVERY_S = 5.0
# Feed entries copied into the outbox per statement, and the most a dispatcher holds (in the
# outbox and in memory, with their JSON) before copying waits for acknowledgements: bounded
# memory and rows whatever the lag.
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
    entry: store.Pending
    ok: bool
    # delivered, rejected (a non-2xx answer), timeout, unreachable
    kind: str
    error: str | None = None


@dataclass(slots=True)
class _Queue:
    """One buddy's unacknowledged changes, oldest first; only the head is ever in flight."""

    entries: deque[store.Pending] = field(default_factory=deque)
    # When the head may go (time.monotonic); a failed head waits out its backoff.
    due: float = 0.0
    in_flight: bool = False


class Dispatcher:
    """Sends one subscription's changes while this process owns it.

    The outbox in Postgres is the durable truth; the dispatcher holds the same entries in
    memory, per buddy. Three things run at once, so none waits for another: copying new feed
    entries into the outbox (one statement per look at the feed), sending (a finished send
    frees its slot for another buddy at once), and recording the answers that came in (one
    statement for all of them, while the next ones arrive). A buddy's next change is sent only
    after its predecessor's acknowledgement is committed.
    """

    def __init__(self, sub: store.Sendable, pool: Pool, settings: Settings) -> None:
        self.sub = sub
        self.cursor = sub.cursor
        self._pool = pool
        self._settings = settings
        self.wake = asyncio.Event()
        # Set when the feed may have more (a NOTIFY); cleared by a fill that found it all.
        self._feed_moved = True
        self._queues: dict[str, _Queue] = {}
        self._held = 0
        self._room = asyncio.Event()
        self._ready: deque[str] = deque()
        self._backoff: list[tuple[float, str]] = []
        # The backoff timer and when it fires (time.monotonic: a timer's when() is on the
        # loop's clock, which under uvloop is another one).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._sending: set[asyncio.Task[Outcome]] = set()
        # Answers not yet recorded, and what wakes the recorder.
        self._answers: list[Outcome] = []
        self._answered = asyncio.Event()
        self._failure: BaseException | None = None
        self._stopped = False
        # Created in start(): a session belongs to the running event loop.
        self._client: aiohttp.ClientSession | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        settings = self._settings
        self._client = aiohttp.ClientSession(
            # One connection per request in flight, kept alive between them; no proxy from
            # the environment, and the answer's body is never decompressed.
            connector=aiohttp.TCPConnector(limit=settings.subscription_max_in_flight),
            timeout=aiohttp.ClientTimeout(total=settings.subscription_timeout_s),
            headers={"user-agent": f"hatched-mirror/{__version__}"},
            auto_decompress=False,
            trust_env=False,
        )
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop now: sends in flight are abandoned (their entries stay in the outbox and go
        out again, from whichever worker owns the subscription next)."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        tasks = [t for t in (self.task, *self._sending) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sending.clear()
        if self._client is not None:
            await self._client.close()

    def forget(self, buddy_id: str) -> None:
        """An erased buddy: its changes are not sent (erasure deleted them from the outbox)."""
        queue = self._queues.get(buddy_id)
        if queue is not None and not queue.in_flight:
            self._held -= len(queue.entries)
            del self._queues[buddy_id]
            self._room.set()

    def on_change(self) -> None:
        self._feed_moved = True
        self.wake.set()

    async def _run(self) -> None:
        self._add(await store.load(self._pool, self.sub.subscription_id, OUTBOX_LIMIT))
        self._dispatch()
        parts = [asyncio.create_task(self._fill()), asyncio.create_task(self._record())]
        try:
            done, _ = await asyncio.wait(parts, return_when=asyncio.FIRST_COMPLETED)
            for part in done:
                part.result()  # an error ends the dispatcher (the sender starts a new one)
        finally:
            for part in parts:
                part.cancel()
            await asyncio.gather(*parts, return_exceptions=True)

    async def _fill(self) -> None:
        """Copy the visible feed past the cursor into the outbox, whenever it may have moved."""
        held = False
        while True:
            if self._held >= OUTBOX_LIMIT:
                self._room.clear()
                await self._room.wait()
                continue
            if not self._feed_moved:
                self.wake.clear()
                # Entries held behind an older transaction are visible soon; without a
                # NOTIFY, look anyway after a while (one may have been lost to a reconnect).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), HELD_WAIT_S if held else IDLE_WAIT_S)
            # Cleared before the read: a NOTIFY that comes while it runs sets it again.
            self._feed_moved = False
            limit = min(FILL_BATCH, OUTBOX_LIMIT - self._held)
            filled = await store.fill(
                self._pool, self.sub.subscription_id, self.cursor, self.sub.fields, limit
            )
            if filled.cursor is not None:
                self.cursor = filled.cursor
            self._add(filled.queued)
            self._dispatch()
            held = filled.held
            if filled.scanned >= limit:
                self._feed_moved = True  # a full page: there may be more at once

    async def _record(self) -> None:
        """Record the answers that came in, all in one statement, as long as they come."""
        while True:
            if self._failure is not None:
                raise self._failure
            if not self._answers:
                self._answered.clear()
                await self._answered.wait()
                continue
            answers, self._answers = self._answers, []
            status = await self._settle(answers)
            if status is None or status == "disabled":
                log.warning(
                    "subscription_stopped", subscription_id=self.sub.subscription_id, status=status
                )
                return

    def _add(self, entries: list[store.Pending]) -> None:
        now = time.monotonic()
        for entry in entries:
            queue = self._queues.get(entry.buddy_id)
            if queue is None:
                queue = self._queues[entry.buddy_id] = _Queue()
            queue.entries.append(entry)
            self._held += 1
            if len(queue.entries) == 1 and not queue.in_flight:
                self._schedule(entry.buddy_id, queue, now + max(0.0, entry.due_in_s))

    def _schedule(self, buddy_id: str, queue: _Queue, due: float) -> None:
        queue.due = due
        if due <= time.monotonic():
            self._ready.append(buddy_id)
        else:
            heapq.heappush(self._backoff, (due, buddy_id))

    def _dispatch(self) -> None:
        """Send the head of every buddy that may go, while slots are free."""
        if self._stopped:
            return
        now = time.monotonic()
        while self._backoff and self._backoff[0][0] <= now:
            _, buddy_id = heapq.heappop(self._backoff)
            queue = self._queues.get(buddy_id)
            if queue is not None and queue.entries and queue.due <= now and not queue.in_flight:
                self._ready.append(buddy_id)
        slots = self._settings.subscription_max_in_flight - len(self._sending)
        while slots > 0 and self._ready:
            buddy_id = self._ready.popleft()
            queue = self._queues.get(buddy_id)
            if queue is None or queue.in_flight or not queue.entries:
                continue
            queue.in_flight = True
            task = asyncio.create_task(self._send(queue.entries[0]))
            task.add_done_callback(self._sent)
            self._sending.add(task)
            slots -= 1
        self._arm_timer()

    def _arm_timer(self) -> None:
        """Wake dispatching when the earliest backoff ends."""
        if not self._backoff:
            return
        due = self._backoff[0][0]
        if self._timer is not None:
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, due - time.monotonic()), self._fire
        )

    def _fire(self) -> None:
        self._timer = None
        self._dispatch()

    def _sent(self, task: asyncio.Task[Outcome]) -> None:
        """A send finished: its slot serves another buddy now, its answer waits to be
        recorded (the buddy's next change waits for that)."""
        self._sending.discard(task)
        if task.cancelled() or self._stopped:
            return
        if (exc := task.exception()) is not None:
            self._failure = exc
        else:
            self._answers.append(task.result())
        self._answered.set()
        self._dispatch()

    async def _settle(self, outcomes: list[Outcome]) -> str | None:
        settings = self._settings
        sid = self.sub.subscription_id
        delays = {
            o.entry.position: backoff_s(
                o.entry.attempts + 1,
                settings.subscription_backoff_s,
                settings.subscription_backoff_max_s,
            )
            for o in outcomes
            if not o.ok
        }
        errors = [o.error for o in outcomes if o.error is not None]
        status = await store.settle(
            self._pool,
            sid,
            [o.entry.position for o in outcomes if o.ok],
            list(delays.items()),
            errors[-1] if errors else None,
            settings.subscription_disable_after_s,
        )
        # Committed: acknowledged heads leave their queues and the next change of each buddy
        # may go; failed heads wait out their backoff.
        now_wall, now = time.time(), time.monotonic()
        for o in outcomes:
            metrics.SUBSCRIPTION_DELIVERIES.labels(subscription_id=sid, outcome=o.kind).inc()
            queue = self._queues[o.entry.buddy_id]
            queue.in_flight = False
            if o.ok:
                metrics.SUBSCRIPTION_DELIVERY_LAG.observe(
                    max(0.0, now_wall - o.entry.committed_at.timestamp())
                )
                queue.entries.popleft()
                self._held -= 1
                if queue.entries:
                    self._schedule(o.entry.buddy_id, queue, now)
                else:
                    del self._queues[o.entry.buddy_id]
            else:
                failed = queue.entries[0]
                queue.entries[0] = replace(failed, attempts=failed.attempts + 1)
                self._schedule(o.entry.buddy_id, queue, now + delays[o.entry.position])
        if delays:
            log.warning(
                "subscription_delivery_failed",
                subscription_id=sid,
                failed=len(delays),
                delivered=len(outcomes) - len(delays),
                error=errors[-1] if errors else None,
            )
        self._room.set()
        self._dispatch()
        return status

    async def _send(self, entry: store.Pending) -> Outcome:
        assert self._client is not None
        headers = signed_headers(self.sub.secret, entry.change_id, entry.doc, time.time())
        try:
            async with self._client.post(
                self.sub.url, data=entry.doc.encode(), headers=headers, allow_redirects=False
            ) as answer:
                await answer.content.read(MAX_ANSWER_BYTES)
                status = answer.status
        except TimeoutError:
            return Outcome(entry, False, "timeout", "timed out")
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome(entry, False, "unreachable", error_text(f"{type(exc).__name__}: {exc}"))
        if 200 <= status < 300:
            return Outcome(entry, True, "delivered")
        note = " (redirects are not followed)" if 300 <= status < 400 else ""
        return Outcome(entry, False, "rejected", f"HTTP {status}{note}")


class Sender:
    """One per worker process: takes the subscriptions no other process owns, and sends."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._dispatchers: dict[str, Dispatcher] = {}
        self._look = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pool: Pool | None = None

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
        # Stateless: the ownership locks are on the lock connection (`_own`), and the
        # dispatchers' statements leave nothing in the session, so asyncpg's reset round trip
        # on every release (3% of the worker's CPU at 1,000 changes/s, and four statements for
        # Postgres) is skipped.
        self._pool = await create_pool(
            settings.postgres_dsn, size=2, timeout_s=settings.db_timeout_s, stateless=True
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

    def _on_change(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        buddy_id, _, version = str(payload).rpartition(":")
        for dispatcher in self._dispatchers.values():
            if ":" + version == FORGOTTEN_SUFFIX:
                dispatcher.forget(buddy_id)
            dispatcher.on_change()

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
