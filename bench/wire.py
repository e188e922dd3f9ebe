"""A minimal HTTP/1.1 keep-alive client and the closed- and open-loop drivers built on it.

Why not httpx: on a 2-core machine the load generator competes with the servers for CPU, and
httpx spends several times more CPU per request than this (no header objects, no URL parsing,
requests pre-encoded as bytes). Responses are read by Content-Length; chunked bodies are
supported just enough for error pages.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

Response = tuple[int, bytes, bytes]  # status, head as received, body


def raw_request(
    method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    """HTTP/1.1 bytes ready to write: the load process sends without building anything."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ConnectionLost(Exception):
    pass


class Conn(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        self._transport: asyncio.WriteTransport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[Response] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they do have write().
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionLost(repr(exc)))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._waiter is not None and not self._waiter.done():
            response = self._parse()
            if response is not None:
                self._waiter.set_result(response)

    def _parse(self) -> Response | None:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        raw_head = bytes(self._buf[:end])
        head = raw_head.lower()
        status = int(head[9:12])
        start = end + 4
        length = 0
        cl = head.find(b"\r\ncontent-length:")
        if cl >= 0:
            stop = head.find(b"\r\n", cl + 2)
            length = int(head[cl + 17 : stop if stop >= 0 else None])
        elif b"transfer-encoding: chunked" in head:
            term = self._buf.find(b"0\r\n\r\n", start)
            if term < 0:
                return None
            body = bytes(self._buf[start:term])
            del self._buf[: term + 5]
            return status, raw_head, body
        if len(self._buf) < start + length:
            return None
        body = bytes(self._buf[start : start + length])
        del self._buf[: start + length]
        if b"\r\nconnection: close" in head:
            self.close()
        return status, raw_head, body

    async def request(self, raw: bytes) -> Response:
        if self.closed or self._transport is None:
            raise ConnectionLost("closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(raw)
        return await self._waiter

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    expect: tuple[int, ...]

    async def connect(self) -> Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(Conn, self.host, self.port)
        return conn


def header(head: bytes, name: bytes) -> bytes | None:
    """The value of header `name` (lower-case) in a response head, as sent."""
    at = head.lower().find(b"\r\n" + name + b":")
    if at < 0:
        return None
    stop = head.find(b"\r\n", at + 2)
    return head[at + len(name) + 3 : stop if stop >= 0 else None].strip()


def percentiles(values_s: Sequence[float]) -> dict[str, float]:
    """Milliseconds, nearest-rank: a p99 is a latency that 1% of requests really exceeded."""
    if not values_s:
        return {}
    ordered = sorted(values_s)
    n = len(ordered)

    def at(q: float) -> float:
        return round(ordered[min(n - 1, max(0, int(q * n + 0.999999) - 1))] * 1000, 2)

    return {
        "n": n,
        "p50": at(0.50),
        "p90": at(0.90),
        "p95": at(0.95),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": round(ordered[-1] * 1000, 2),
        "mean": round(sum(ordered) / n * 1000, 2),
    }


class Recorder:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.latencies: list[float] = []
        self.service: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()

    def add(self, status: int, latency: float, service: float | None = None) -> None:
        self.statuses[status] += 1
        self.latencies.append(latency)
        if service is not None:
            self.service.append(service)

    def summary(self, seconds: float) -> dict[str, Any]:
        ok = sum(n for s, n in self.statuses.items() if s in self.target.expect)
        return {
            "seconds": round(seconds, 3),
            "completed": len(self.latencies),
            "ok": ok,
            "rps": round(ok / seconds, 1) if seconds else 0.0,
            "statuses": {str(s): n for s, n in sorted(self.statuses.items())},
            "bad_status": sum(n for s, n in self.statuses.items() if s not in self.target.expect),
            "errors": dict(self.errors),
            "latency_ms": percentiles(self.latencies),
            "service_ms": percentiles(self.service),
        }


async def closed_loop(
    target: Target,
    requests: Sequence[bytes],
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    cycle: bool,
) -> dict[str, Any]:
    """`concurrency` connections, each sending its next request as soon as the last answered."""
    rec = Recorder(target)
    clock = time.perf_counter
    start = clock()
    measure_from = start + warmup
    stop = measure_from + duration
    next_index = 0
    exhausted = False

    async def worker() -> None:
        nonlocal next_index, exhausted
        conn = await target.connect()
        try:
            while (now := clock()) < stop:
                if next_index >= len(requests):
                    if not cycle:
                        exhausted = True
                        return
                    next_index = 0
                raw = requests[next_index]
                next_index += 1
                try:
                    status, _, _ = await conn.request(raw)
                except (ConnectionLost, OSError) as exc:
                    rec.errors[type(exc).__name__] += 1
                    conn = await target.connect()
                    continue
                if now >= measure_from:
                    rec.add(status, clock() - now)
        finally:
            conn.close()

    window = asyncio.create_task(_cpu_window(warmup, duration))
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = min(clock(), stop) - measure_from
    result = rec.summary(elapsed)
    result["exhausted"] = exhausted
    result["concurrency"] = concurrency
    result["cpu"] = await window
    return result


async def _cpu_window(warmup: float, duration: float) -> dict[str, float]:
    """CPU seconds over the measured window: the whole machine's (busy, total, summed over
    its cores) and this load generator's own, which shares the machine with what it loads."""
    await asyncio.sleep(warmup)
    busy0, total0, own0 = *machine_cpu(), time.process_time()
    await asyncio.sleep(duration)
    busy1, total1, own1 = *machine_cpu(), time.process_time()
    return {"machine_busy_s": busy1 - busy0, "machine_s": total1 - total0, "load_s": own1 - own0}


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, summed over its cores."""
    # /proc/stat's first line: ticks by kind (idle and iowait are not busy; guest time is
    # already inside user).
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    total = sum(ticks[:8])
    return (total - ticks[3] - ticks[4]) / _TICK, total / _TICK


_TICK = os.sysconf("SC_CLK_TCK")


class Pool:
    """Idle keep-alive connections; opens more on demand up to `limit`, then makes callers wait.

    First in, first out: every connection keeps being used, so none sits idle long enough for
    the server's keep-alive timeout (uvicorn: 5 s) to close it just as a request goes out.
    """

    def __init__(self, target: Target, limit: int) -> None:
        self.target = target
        self._idle: deque[Conn] = deque()
        self._limit = limit
        self._open = 0
        self._freed = asyncio.Condition()
        self.peak = 0

    async def fill(self, n: int) -> None:
        for _ in range(n):
            self._idle.append(await self.target.connect())
            self._open += 1
        self.peak = max(self.peak, self._open)

    async def acquire(self) -> Conn:
        while True:
            while self._idle:
                conn = self._idle.popleft()
                if not conn.closed:
                    return conn
                self._open -= 1
            if self._open < self._limit:
                self._open += 1
                self.peak = max(self.peak, self._open)
                try:
                    return await self.target.connect()
                except OSError:
                    self._open -= 1
                    raise
            async with self._freed:
                await self._freed.wait()

    async def release(self, conn: Conn) -> None:
        if conn.closed:
            self._open -= 1
        else:
            self._idle.append(conn)
        async with self._freed:
            self._freed.notify()

    async def request(self, raw: bytes) -> Response:
        conn = await self.acquire()
        try:
            return await conn.request(raw)
        finally:
            await self.release(conn)

    def close(self) -> None:
        for conn in self._idle:
            conn.close()


Probe = Callable[[Pool, float], Coroutine[Any, Any, None]]


async def open_loop(
    target: Target,
    requests: Sequence[bytes],
    *,
    rate: float,
    duration: float,
    warmup: float,
    max_conns: int,
    pre_open: int,
    probe: Probe | None = None,
    probe_every: int = 0,
) -> dict[str, Any]:
    """Request i is due at start + i/rate whatever happened to earlier ones (no coordinated
    omission): latency counts from the due time, so a stalled server shows up as queueing."""
    rec = Recorder(target)
    pool = Pool(target, max_conns)
    await pool.fill(min(pre_open, max_conns))
    clock = time.perf_counter
    total = min(len(requests), int(rate * (warmup + duration)))
    warm = int(rate * warmup)
    lag: list[float] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(raw: bytes, due: float, measured: bool) -> None:
        try:
            conn = await pool.acquire()
        except OSError as exc:
            rec.errors[type(exc).__name__] += 1
            return
        # "Service" time starts at the write, after any wait for a free connection.
        sent = clock()
        try:
            status, _, _ = await conn.request(raw)
        except (ConnectionLost, OSError) as exc:
            rec.errors[type(exc).__name__] += 1
            return
        finally:
            await pool.release(conn)
        if measured:
            done = clock()
            rec.add(status, done - due, done - sent)

    start = clock()
    i = 0
    while i < total:
        now = clock()
        due = start + i / rate
        if due > now:
            await asyncio.sleep(due - now)
            continue
        # Everything already due goes out now: a late wake-up must not thin the rate.
        while i < total and (due := start + i / rate) <= now:
            if i >= warm:
                lag.append(now - due)
            if probe is not None and probe_every and i >= warm and i % probe_every == 0:
                task = asyncio.create_task(probe(pool, due))
            else:
                task = asyncio.create_task(one(requests[i], due, i >= warm))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
    sent_for = clock() - start - warmup
    await asyncio.gather(*list(tasks))
    pool.close()
    result = rec.summary(duration)
    result["offered_rate"] = rate
    result["sent_rate"] = round((total - warm) / sent_for, 1) if sent_for > 0 else 0.0
    result["scheduler_lag_ms"] = percentiles(lag)
    result["peak_connections"] = pool.peak
    result["short_of_requests"] = len(requests) < int(rate * (warmup + duration))
    return result
