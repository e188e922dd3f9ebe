"""Results as Markdown: the machine, the command, one section per scenario, the targets."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from bench.procs import ADMIN_DSN, SERVICE_REDIS_DB, redis_url

HEADER = """\
# Benchmarks

What the suite in `bench/` measures, how, and what it measured. Each run appends a section with
the machine it ran on, the exact command and its tables; tables are never edited by hand.

    .venv/bin/python -m bench.run                      # all but `scale` and `upgrade` (~15 min)
    .venv/bin/python -m bench.run --only receiver read # some of them
    .venv/bin/python -m bench.run --only scale         # long (~15 min): 1M buddies, 20M rows
    .venv/bin/python -m bench.run --only upgrade       # ~5 min: sql/0008 and 0009 on 20M rows
    .venv/bin/python -m bench.run --quick              # CI smoke: tiny sizes, < 90 s, no file

How it measures:

- Every scenario gets a fresh database (`hm_bench_*`, migrated with `hatched-mirror migrate`,
  dropped afterwards) and starts the service as users do: `hatched-mirror serve` (one uvicorn
  worker) and `hatched-mirror worker` (one arq process), configured by environment, JSON logs to
  a file, stopped with SIGTERM.
- The load generator (`bench/load.py`) is its own process and pre-signs every delivery before
  the clock starts (a learning app's mix: coins, skills, streaks, badges, some evolutions, items;
  70% v2 / 30% v1 unless `--format`). Closed loop: N keep-alive connections, each sending its next
  request when the last one answered. Open loop: request i is due at start + i/rate whatever
  happened before, and its latency counts from that due time (no coordinated omission).
- Baselines (`bench/baselines.py`) run in the same invocation, on the same machine, the same way:
  (a) verify the HMAC and answer 202; (b) (a) plus one INSERT of the raw delivery per request;
  (c) the naive design: verify, then lock, project (the service's own projector) and upsert the
  buddy inside the request; (d) arq with one no-op job per delivery; (e) asyncpg upserts of
  buddy rows, 200 per transaction (the database ceiling for applying).
- The machine has 2 cores: the load generator, the server, the worker, Postgres and Redis share
  them, so every figure is a whole-machine figure and the load generator's own CPU is in it.
  Ratios between rows of one run mean more than absolute numbers.
"""


@dataclass
class Target:
    goal: str
    measured: str
    met: bool | None  # None: not judged (a quick run's sizes are too small to mean anything)


@dataclass
class Section:
    name: str
    title: str
    blocks: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the suite or the service is broken
    warnings: list[str] = field(default_factory=list)  # worth reading, not a failure
    data: dict[str, Any] = field(default_factory=dict)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 100 else f"{v:,.2f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else 0.0


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return values[3] + values[4], sum(values)  # idle + iowait


async def settle(max_s: float, idle_at_least: float = 0.85, window_s: float = 1.0) -> str:
    """Wait (up to `max_s`) for the machine to go quiet after the previous scenario: its
    processes are gone, but Postgres's checkpoint and autovacuum, or a dropped database's
    files, can keep a core busy for a while, and every figure here is a whole-machine figure.
    Returns what it waited, for the section's footer."""
    waited = 0.0
    idle = 0.0
    while True:
        idle0, total0 = _cpu_times()
        await asyncio.sleep(window_s)
        idle1, total1 = _cpu_times()
        waited += window_s
        idle = (idle1 - idle0) / max(1, total1 - total0)
        if idle >= idle_at_least or waited >= max_s:
            return f"settled {waited:.0f} s before, CPU {100 * idle:.0f}% idle"


def _head() -> str:
    """The commit the service ran from (read-only git; uncommitted edits are not shown)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def _host() -> tuple[str, int]:
    """CPU model and memory in kB, from /proc (this suite runs on Linux only)."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return model, mem_kb


async def machine() -> dict[str, str]:
    model, mem_kb = _host()
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        pg = await conn.fetchval("SHOW server_version")
        settings = []
        for name in ("shared_buffers", "synchronous_commit", "fsync"):
            settings.append(f"{name}={await conn.fetchval(f'SHOW {name}')}")
        pg_conf = ", ".join(settings)
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(redis_url(SERVICE_REDIS_DB))
    try:
        redis_version = str((await client.info("server"))["redis_version"])
    finally:
        await client.aclose()
    packages = ("starlette", "uvicorn", "uvloop", "httptools", "asyncpg", "arq", "orjson")
    return {
        "cpus (nproc)": str(os.cpu_count()),
        "cpu model": model,
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": f"{pg} ({pg_conf})",
        "redis": redis_version,
        "packages": ", ".join(f"{p} {_version(p)}" for p in packages),
        "service commit": f"{_head()} (plus any uncommitted edits in the tree)",
        "load average at start": loadavg(),
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def render(
    when: str, command: str, info: dict[str, str], notes: Sequence[str], sections: Sequence[Section]
) -> str:
    out = [f"## Run of {when}", "", f"Command: `{command}`", ""]
    out += [f"> {n}" for n in notes]
    if notes:
        out.append("")
    out.append(table(["machine", ""], list(info.items())))
    out.append("")
    summary = [(s.title, t.goal, t.measured, _verdict(t.met)) for s in sections for t in s.targets]
    if summary:
        out += ["### Targets", "", table(["scenario", "target", "measured", ""], summary), ""]
    for s in sections:
        out += [f"### {s.title}", ""]
        for block in s.blocks:
            out += [block, ""]
        out += [f"- problem: {p}" for p in s.problems]
        out += [f"- warning: {w}" for w in s.warnings]
        if s.problems or s.warnings:
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _verdict(met: bool | None) -> str:
    return "met" if met else ("not judged" if met is None else "**missed**")


def append(path: Path, text: str) -> None:
    existing = path.read_text() if path.exists() else HEADER
    path.write_text(existing.rstrip() + "\n\n" + text)
