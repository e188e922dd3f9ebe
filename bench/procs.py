"""Processes and databases: each scenario gets a fresh database and the real service started
as a user starts it (the `hatched-mirror` console script, configured by environment only)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import IO, Any

import asyncpg
import httpx
import orjson
import redis.asyncio as aioredis

from bench.wire import machine_cpu

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
ADMIN_DSN = os.environ.get("BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379")
# Redis databases that belong to the bench alone (the tests use 15): service, arq baseline.
SERVICE_REDIS_DB = 12
ARQ_BASELINE_REDIS_DB = 13
SECRET = "whsec_bench_secret_0123456789"
TOKEN = "bench-api-token-0001"
QUEUE = "hatched-mirror"
# Variables of the parent that must not leak into the service: only what we set configures it.
_OURS = ("DATABASE_URL", "REDIS_URL", "HATCHED_", "MIRROR_")


class BenchError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_url(db: int) -> str:
    return f"{REDIS_BASE}/{db}"


def service_env(dsn: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
    env.update(
        DATABASE_URL=dsn,
        REDIS_URL=redis_url(SERVICE_REDIS_DB),
        HATCHED_WEBHOOK_SECRETS=SECRET,
        MIRROR_API_TOKENS=TOKEN,
        MIRROR_LOG_FORMAT="json",
    )
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def fresh_database(tag: str) -> AsyncIterator[str]:
    """CREATE DATABASE hm_bench_<ts>_<tag>; dropped (WITH FORCE) whatever happens."""
    name = f"hm_bench_{time.strftime('%Y%m%d_%H%M%S')}_{tag}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    finally:
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def flush_redis(db: int) -> None:
    client = aioredis.Redis.from_url(redis_url(db))
    try:
        await client.flushdb()
    finally:
        await client.aclose()


class Proc:
    """A child process whose output goes to a log file; stopped with SIGTERM like a deploy."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            list(argv), env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=logs
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    async def stop(self, grace_s: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.popen.wait, grace_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                await asyncio.to_thread(self.popen.wait)
        self._log.close()
        return self.popen.returncode


async def wait_http(proc: Proc, port: int, path: str = "/healthz", within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=1.0) as client:
        while True:
            proc.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"http://127.0.0.1:{port}{path}")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise BenchError(f"{proc.name} did not answer {path} within {within}s")
            await asyncio.sleep(0.05)


async def migrate(dsn: str, logs: Path, **env: str) -> None:
    proc = Proc("migrate", [str(BIN / "hatched-mirror"), "migrate"], service_env(dsn, **env), logs)
    code = await asyncio.to_thread(proc.popen.wait)
    await proc.stop()
    if code != 0:
        raise BenchError(f"migrate failed, see {proc.log_path}")


async def _start_http(
    name: str, argv: list[str], env: dict[str, str], logs: Path, port: int
) -> tuple[Proc, int]:
    """Start a process that serves HTTP on `port`; stopped again if it never answers."""
    proc = Proc(name, argv, env, logs)
    try:
        await wait_http(proc, port)
    except BaseException:
        await proc.stop()
        raise
    return proc, port


async def start_service(env: dict[str, str], logs: Path, name: str = "serve") -> tuple[Proc, int]:
    port = free_port()
    argv = [str(BIN / "hatched-mirror"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    return await _start_http(name, argv, env, logs, port)


async def start_worker(env: dict[str, str], logs: Path, name: str = "worker") -> Proc:
    """Started and idle: arq writes its health-check key after startup, on its first poll.

    The key may carry a suffix (the service names one per host), hence the pattern; the bench
    flushes its Redis database first, so no stale key can answer for this worker.
    """
    # Its Prometheus port is fixed by default and would collide between the bench's workers;
    # the bench reads nothing from it, so it is switched off (0) unless the caller set one.
    env = {"MIRROR_WORKER_METRICS_PORT": "0", **env}
    proc = Proc(name, [str(BIN / "hatched-mirror"), "worker"], env, logs)
    client = aioredis.Redis.from_url(env["REDIS_URL"])
    pattern = env.get("MIRROR_QUEUE_NAME", QUEUE) + ":health-check*"
    try:
        deadline = time.monotonic() + 30
        while not await client.keys(pattern):
            proc.check_alive()
            if time.monotonic() > deadline:
                raise BenchError("worker did not become ready within 30s")
            await asyncio.sleep(0.05)
    except BaseException:
        await proc.stop()
        raise
    finally:
        await client.aclose()
    return proc


async def start_baseline(kind: str, logs: Path, *args: str) -> tuple[Proc, int]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.baselines", "http", kind, "--port", str(port), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return await _start_http(f"baseline_{kind}", argv, env, logs, port)


async def run_python(
    module: str, args: Sequence[str], logs: Path, name: str, limit_s: float
) -> dict[str, Any]:
    """Run `python -m module args` to completion; its last stdout line is its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with (logs / f"{name}.log").open("ab") as log:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, *args, stdout=subprocess.PIPE, stderr=log, env=env
        )
        try:
            out, _ = await asyncio.wait_for(child.communicate(), limit_s)
        except TimeoutError:
            child.kill()
            await child.wait()
            raise BenchError(f"{name} ran longer than {limit_s:.0f}s") from None
    if child.returncode != 0 or not out.strip():
        raise BenchError(f"{name} failed ({child.returncode}), see {logs / (name + '.log')}")
    result: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
    return result


async def run_load(spec: dict[str, Any], logs: Path, name: str) -> dict[str, Any]:
    path = logs / f"{name}.spec.json"
    path.write_bytes(orjson.dumps(spec))
    limit = spec["duration"] + spec.get("warmup", 0) + 180
    return await run_python("bench.load", [str(path)], logs, name, limit)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time one process has used so far."""
    # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class CpuMeter:
    """What one process and the whole machine spent on the CPU between start() and stop()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._start = (0.0, 0.0, 0.0)
        self.process_s = self.machine_busy_s = self.machine_s = 0.0

    def start(self) -> None:
        self._start = (cpu_seconds(self.pid), *machine_cpu())

    def stop(self) -> None:
        busy, total = machine_cpu()
        self.process_s = cpu_seconds(self.pid) - self._start[0]
        self.machine_busy_s = busy - self._start[1]
        self.machine_s = total - self._start[2]


class RssSampler:
    """VmRSS of one process every `every_s` seconds, for as long as the block runs."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        self.pid = pid
        self.every_s = every_s
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            value = rss_mb(self.pid)
            if value is not None:
                self.samples.append(value)
            await asyncio.sleep(self.every_s)

    async def __aenter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        value = rss_mb(self.pid)
        if value is not None:
            self.samples.append(value)

    @property
    def peak(self) -> float:
        return round(max(self.samples, default=0.0), 1)
