"""The Docker image, built and run where a Docker engine answers: `migrate`, then `serve`
answering /readyz against the test Postgres and Redis (host network).

Skipped where no engine answers, as the testcontainers path of tests/support/services.py is
(CI machines have the docker client but no daemon); tests/unit/test_deploy.py checks the
Dockerfile itself (hadolint, the lock with hashes, no installer in the runtime stage) and
tests/integration/test_wheel.py the wheel it installs.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support.config import ADMIN_TOKEN, API_TOKEN, SECRET
from tests.support.harness import free_port, wait_for_http

ROOT = Path(__file__).resolve().parents[2]


def docker() -> str:
    found = shutil.which("docker")
    if found is None:
        pytest.skip("no docker client")
    ping = subprocess.run([found, "info"], capture_output=True, timeout=20)
    if ping.returncode != 0:
        pytest.skip("no Docker engine answers")
    return found


@pytest.mark.timeout(1200)
def test_image_migrates_and_serves(migrated: str, redis_url: str) -> None:
    cli = docker()
    tag = f"hatched-mirror:test-{uuid.uuid4().hex[:8]}"
    build = subprocess.run(
        [cli, "build", "-t", tag, str(ROOT)], capture_output=True, text=True, timeout=1100
    )
    assert build.returncode == 0, build.stderr[-3000:]
    port = free_port()
    env = {
        "DATABASE_URL": migrated,
        "REDIS_URL": redis_url,
        "HATCHED_WEBHOOK_SECRETS": SECRET,
        "MIRROR_API_TOKENS": API_TOKEN,
        "MIRROR_ADMIN_TOKENS": ADMIN_TOKEN,
    }
    flags = ["--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp"]
    for key, value in env.items():
        flags += ["-e", f"{key}={value}"]
    try:
        no_pip = subprocess.run(
            [cli, "run", "--rm", "--entrypoint", "python", tag, "-c", "import pip"],
            capture_output=True,
        )
        assert no_pip.returncode != 0, "the runtime image still has pip"
        migrate = subprocess.run(
            [cli, "run", *flags, tag, "migrate"], capture_output=True, text=True, timeout=120
        )
        assert migrate.returncode == 0, migrate.stdout + migrate.stderr
        name = f"hm-serve-{uuid.uuid4().hex[:8]}"
        subprocess.run(
            [cli, "run", "-d", "--name", name, *flags, tag, "serve", "--port", str(port)],
            check=True,
            capture_output=True,
        )
        try:
            wait_for_http(
                f"http://127.0.0.1:{port}/readyz",
                within=60,
                why=lambda: "serve in the image never became ready",
            )
        finally:
            stopped = subprocess.run([cli, "stop", "-t", "30", name], capture_output=True)
            assert stopped.returncode == 0
    finally:
        subprocess.run([cli, "rmi", "-f", tag], capture_output=True)
