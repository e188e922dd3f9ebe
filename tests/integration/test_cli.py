"""The commands, run as a user runs them: as processes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service import store
from tests.conftest import API_TOKEN, SECRET

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


async def test_migrate_is_idempotent_and_safe_in_parallel(
    database_url: str, tmp_path: Path
) -> None:
    admin = await store.create_pool(database_url, size=1, timeout_s=10)
    name = f"hm_migrate_{os.getpid()}"
    await admin.execute(f"DROP DATABASE IF EXISTS {name}")
    await admin.execute(f"CREATE DATABASE {name}")
    dsn = database_url.rsplit("/", 1)[0] + f"/{name}"
    try:
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
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


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
    headers = {"Authorization": "Bearer dev-api-token"}
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
