"""Live updates: one LISTEN connection per process fans buddy changes out to SSE clients.

The apply transaction sends `NOTIFY hatched_mirror_buddies, '<buddy_id>:<version>'` at commit.
A client's queue holds at most one wake-up: it always re-reads the latest state, so a burst of
changes costs a slow client one read, never an unbounded backlog. An erasure notifies
`<buddy_id>:forgotten` instead: the buddy leaves the cache and its streams end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator

import asyncpg
import orjson
import structlog
from sse_starlette import ServerSentEvent

from service import store
from service.apply.projector import public_view
from service.problems import DATABASE_ERRORS
from service.read.cache import BuddyCache
from service.store.erasure import FORGOTTEN_SUFFIX

log = structlog.get_logger(__name__)


# Subscribers under this key are woken by every notification (the change-feed streams). A NUL
# cannot be in a buddy id (Postgres text), so no buddy stream shares it.
EVERY_CHANGE = "\x00every"


class TooManyClients(Exception):
    pass


class Broadcaster:
    def __init__(
        self,
        dsn: str,
        max_clients: int,
        timeout_s: float,
        cache: BuddyCache | None = None,
        channel: str = store.NOTIFY_CHANNEL,
    ) -> None:
        self._dsn = dsn
        self._channel = channel
        self.cache = cache if cache is not None else BuddyCache(0)
        self._max = max_clients
        self._timeout = timeout_s
        self._subscribers: dict[str, set[asyncio.Queue[None]]] = defaultdict(set)
        self._ended: set[asyncio.Queue[None]] = set()
        self._count = 0
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self.connected = asyncio.Event()

    @property
    def clients(self) -> int:
        return self._count

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        self._closing.set()
        # Wake every client so its stream ends now rather than at the next keep-alive.
        for queues in self._subscribers.values():
            for queue in queues:
                _poke(queue)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    async def _run(self) -> None:
        delay = 0.5
        while not self._closing.is_set():
            conn: asyncpg.Connection[asyncpg.Record] | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=self._timeout)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(self._channel, self._on_notify)
                # Whatever changed while nobody listened is unknown: start the cache empty.
                self.cache.clear()
                self.connected.set()
                delay = 0.5
                # Changes may have been missed while disconnected: everyone re-reads.
                self._poke_all()
                await lost.wait()
                log.warning("stream_listener_lost")
            except DATABASE_ERRORS as exc:
                log.warning("stream_listener_unavailable", error=repr(exc))
            finally:
                self.connected.clear()
                self.cache.clear()
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=1)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def key(self, payload: str) -> str:
        """Which subscribers a notification is for: the buddy of `buddy_id:version`."""
        return payload.rpartition(":")[0]

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        key = self.key(str(payload))
        if self.cache.enabled:
            self.cache.invalidate(key)
        forgotten = str(payload).endswith(FORGOTTEN_SUFFIX)
        for queue in self._subscribers.get(key, ()):
            if forgotten:
                self._ended.add(queue)
            _poke(queue)
        for queue in self._subscribers.get(EVERY_CHANGE, ()):
            _poke(queue)

    def ended(self, queue: asyncio.Queue[None]) -> bool:
        """The subscription's buddy was erased: its stream must end."""
        return queue in self._ended

    def _poke_all(self) -> None:
        for queues in self._subscribers.values():
            for queue in queues:
                _poke(queue)

    @contextlib.asynccontextmanager
    async def subscribe(self, buddy_id: str) -> AsyncIterator[asyncio.Queue[None]]:
        if self._count >= self._max:
            raise TooManyClients
        queue: asyncio.Queue[None] = asyncio.Queue(maxsize=1)
        self._count += 1
        self._subscribers[buddy_id].add(queue)
        try:
            yield queue
        finally:
            self._count -= 1
            self._subscribers[buddy_id].discard(queue)
            self._ended.discard(queue)
            if not self._subscribers[buddy_id]:
                del self._subscribers[buddy_id]


def _poke(queue: asyncio.Queue[None]) -> None:
    with contextlib.suppress(asyncio.QueueFull):
        queue.put_nowait(None)


async def buddy_events(
    broadcaster: Broadcaster, pool: store.Pool, buddy_id: str
) -> AsyncIterator[ServerSentEvent]:
    """The full buddy as an SSE `buddy` event now (once it exists), then each time its version
    changes, until the process closes its streams. The one loop behind every buddy stream."""
    async with broadcaster.subscribe(buddy_id) as changed:
        sent = None
        while not broadcaster.closing and not broadcaster.ended(changed):
            found = await store.get_buddy(pool, buddy_id)
            if found is not None and found[1] != sent:
                sent = found[1]
                yield ServerSentEvent(
                    data=orjson.dumps(public_view(*found)).decode(), event="buddy", id=str(sent)
                )
            await changed.get()
