"""The package as shipped: `python -m build` makes the sdist and the wheel (from the sdist), the
wheel goes into a fresh venv outside the checkout with the pinned lock, and its own
`hatched-mirror` runs migrate, serve, worker and send-test-event against a scratch database,
with no MIRROR_SQL_DIR and no source tree to lean on. The delivery must end up applied.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tarfile
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.config import API_TOKEN
from tests.support.databases import scratch_database as new_database
from tests.support.harness import free_port, service_env

ROOT = Path(__file__).resolve().parents[2]
BUDDY = "buddy_01WHEELTEST0001"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def expected_sql() -> set[str]:
    return {p.name for p in (ROOT / "sql").glob("*.sql")}


def test_wheel_carries_migrations_demo_page_and_license(dist: dict[str, Path]) -> None:
    names = zipfile.ZipFile(dist["wheel"]).namelist()
    assert {Path(n).name for n in names if n.startswith("service/sql/")} == expected_sql()
    assert "service/dev/static/demo.html" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_sdist_carries_migrations_demo_page_and_license(dist: dict[str, Path]) -> None:
    with tarfile.open(dist["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {Path(n).name for n in names if n.startswith("sql/") and n.endswith(".sql")} == (
        expected_sql()
    )
    assert {"service/dev/static/demo.html", "LICENSE", "pyproject.toml"} <= names


@pytest.fixture
async def scratch_database(database_url: str) -> AsyncIterator[str]:
    async with new_database(database_url, "hm_wheel") as dsn:
        yield dsn


@pytest.fixture(scope="module")
def installed(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the lock's pins and the wheel, nothing else; its bin/."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    for args in (
        ["--require-hashes", "-r", str(ROOT / "requirements.lock")],
        ["--no-deps", str(dist["wheel"])],
    ):
        result = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout
    return venv / "bin"


def wheel_env(database_url: str, redis_url: str, queue: str) -> dict[str, str]:
    env = service_env(database_url, redis_url, MIRROR_QUEUE_NAME=queue)
    env.pop("MIRROR_SQL_DIR", None)
    env.pop("PYTHONPATH", None)  # nothing of the checkout on the path
    return env


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working directory outside the checkout, so `sql/` there cannot be found by accident."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    return work


def started(
    command: list[str], env: dict[str, str], cwd: Path, log: Path
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    running: list[subprocess.Popen[bytes]] = []
    yield running
    for proc in running:
        stop(proc)


@pytest.mark.timeout(900)
async def test_the_installed_wheel_runs_the_service(
    installed: Path,
    scratch_database: str,
    redis_url: str,
    outside: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    cli = str(installed / "hatched-mirror")
    env = wheel_env(scratch_database, redis_url, f"wheel-{uuid.uuid4().hex[:8]}")

    migrate = await asyncio.to_thread(
        subprocess.run, [cli, "migrate"], env=env, cwd=outside, capture_output=True, text=True
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert "0001_core" in migrate.stdout

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = started(
        [cli, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env,
        outside,
        outside / "serve.log",
    )
    worker = started([cli, "worker"], env, outside, outside / "worker.log")
    processes += [serve, worker]

    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        deadline = time.monotonic() + 60
        while True:
            try:
                if (await http.get("/readyz")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert serve.poll() is None, (outside / "serve.log").read_text()
            assert time.monotonic() < deadline, (outside / "serve.log").read_text()
            await asyncio.sleep(0.2)

        sent = await asyncio.to_thread(
            subprocess.run,
            [
                cli,
                "send-test-event",
                "buddy.hatched",
                "--buddy-id",
                BUDDY,
                "--url",
                f"{url}/webhooks/hatched",
            ],
            env=env,
            cwd=outside,
            capture_output=True,
            text=True,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert sent.stdout.startswith("202"), sent.stdout

        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        deadline = time.monotonic() + 60
        while True:
            response = await http.get(f"/v1/buddies/{BUDDY}", headers=headers)
            if response.status_code == 200:
                break
            assert worker.poll() is None, (outside / "worker.log").read_text()
            assert time.monotonic() < deadline, (outside / "worker.log").read_text()[-3000:]
            await asyncio.sleep(0.2)
        assert response.json()["buddy_id"] == BUDDY

    assert stop(serve) == 0, (outside / "serve.log").read_text()[-3000:]
    assert stop(worker) == 0, (outside / "worker.log").read_text()[-3000:]
