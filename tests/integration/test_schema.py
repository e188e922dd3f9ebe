"""Property-based run of the whole HTTP API against its own /openapi.json (schemathesis):
valid tokens, generated parameters; no 5xx and no answer outside the documented schema."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import ADMIN_TOKEN, API_TOKEN, SECRET


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def api_process(migrated: str, redis_url: str) -> Iterator[str]:
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": migrated,
        "REDIS_URL": redis_url,
        "HATCHED_WEBHOOK_SECRETS": SECRET,
        "MIRROR_API_TOKENS": API_TOKEN,
        "MIRROR_ADMIN_TOKENS": ADMIN_TOKEN,
        "MIRROR_LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"serve did not start: {log}")
        time.sleep(0.1)
    yield url
    proc.terminate()
    _, stderr = proc.communicate(timeout=30)
    # Any traceback in the server's log is a defect even when the answer looked fine.
    assert b"Traceback" not in stderr, stderr.decode()[-4000:]


def test_api_conforms_to_its_schema(api_process: str) -> None:
    schema = schemathesis.openapi.from_url(f"{api_process}/openapi.json")
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an invalid schema raises here
        if operation.path.endswith("/stream"):
            continue  # an endless event stream; tests/integration/test_api.py covers it
        admin = operation.path.startswith("/v1/deliveries") or operation.path.endswith("/refresh")
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN if admin else API_TOKEN}"}

        @given(case=operation.as_strategy())
        @settings(
            max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
            # A cursor's validity cannot be written in a schema (it is opaque), so a made-up one
            # is rightly refused with 400; every other check runs.
            case.call_and_validate(
                headers=headers,  # noqa: B023 (called right here)
                excluded_checks=[positive_data_acceptance],
            )

        check()
        checked += 1
    assert checked >= 10
