"""Real processes for fault tests: the service as users run it, a TCP proxy that can cut a
connection path, and a sender that retries like Hatched does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx

from service.ingest.signatures import signature_headers
from tests.support.config import ADMIN_TOKEN, API_TOKEN, SECRET


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def service_env(database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HATCHED_", "MIRROR_"))}
    env.update(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "HATCHED_WEBHOOK_SECRETS": SECRET,
            "MIRROR_API_TOKENS": API_TOKEN,
            "MIRROR_ADMIN_TOKENS": ADMIN_TOKEN,
            "MIRROR_LOG_FORMAT": "json",
            "MIRROR_SHARDS": "8",
            "MIRROR_SWEEP_AFTER_S": "1",
            "MIRROR_WORKER_METRICS_PORT": "0",
            "MIRROR_DB_TIMEOUT_S": "1",
        }
    )
    env.update(extra)
    return env


class Process:
    """One `hatched-mirror` command as a child process, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log = args, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def kill(self, sig: signal.Signals = signal.SIGKILL, timeout: float = 40) -> int:
        """kill -9 by default: no cleanup of any kind. Returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 40) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


async def run_command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`hatched-mirror <args>` as a user runs it, to completion (off the event loop)."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_for_http(
    url: str,
    *,
    within: float = 30.0,
    gone: Callable[[], bool] = lambda: False,
    why: Callable[[], str] = lambda: "",
) -> None:
    """Until `url` answers 200; fails after `within` seconds, or as soon as `gone()` says the
    process behind it ended, with `why()` (a log tail) in the message."""
    deadline = time.monotonic() + within
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if gone() or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200:\n{why()}")
        time.sleep(0.1)


def log_lines(log: Path) -> list[dict[str, Any]]:
    """The JSON lines of a process's log (MIRROR_LOG_FORMAT=json), skipping anything else."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


@contextlib.contextmanager
def serve(env: dict[str, str], log: Path) -> Iterator[str]:
    port = free_port()
    process = Process(["serve", "--host", "127.0.0.1", "--port", str(port)], env, log).start()
    url = f"http://127.0.0.1:{port}"
    assert process.proc is not None
    proc = process.proc
    wait_for_http(
        f"{url}/healthz", gone=lambda: proc.poll() is not None, why=lambda: log.read_text()[-3000:]
    )
    try:
        yield url
    finally:
        process.stop()


class Proxy:
    """A TCP proxy on a local port; `cut()` makes the target unreachable, `restore()` heals it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers = [writer]
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            writers.append(up_writer)
            tasks = [
                asyncio.create_task(self._pipe(reader, up_writer)),
                asyncio.create_task(self._pipe(up_reader, writer)),
            ]
            self._pipes.update(tasks)
            await asyncio.gather(*tasks, return_exceptions=True)
            self._pipes.difference_update(tasks)
        except OSError:
            pass
        finally:
            for w in writers:
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def restore(self) -> None:
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        await self.cut()


async def send_like_hatched(
    http: httpx.AsyncClient,
    deliveries: list[tuple[dict[str, str], bytes]],
    *,
    concurrency: int = 16,
    backoffs: tuple[float, ...] = (0.5, 1.5, 3.0, 6.0),
) -> dict[int, int]:
    """POST every delivery; on a non-2xx or a timeout retry with a fresh signature, as Hatched
    does (its real schedule is 5 s, 30 s, 5 min; scaled down here). Returns final statuses."""
    gate = asyncio.Semaphore(concurrency)
    finals: dict[int, int] = {}

    async def one(headers: dict[str, str], body: bytes) -> int:
        fmt: Literal["v1", "v2"] = "v1" if "Hatched-Signature" in headers else "v2"
        for attempt, wait in enumerate((0.0, *backoffs)):
            await asyncio.sleep(wait)
            fresh = {
                k: v
                for k, v in headers.items()
                if k not in ("Hatched-Signature", "X-Hatched-Signature", "X-Hatched-Timestamp")
            }
            fresh.update(signature_headers(body, SECRET, int(time.time()), fmt))
            try:
                async with gate:
                    response = await http.post("/webhooks/hatched", content=body, headers=fresh)
            except httpx.HTTPError:
                continue
            if response.status_code < 300 or attempt == len(backoffs):
                return response.status_code
        return 0

    results = await asyncio.gather(*(one(h, b) for h, b in deliveries))
    for status in results:
        finals[status] = finals.get(status, 0) + 1
    return finals
