"""Logs an operator reads, from real processes: one line per refused signature (its code, no
secret), rate-limited; a worker at idle does not log arq's cron runs at INFO."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from service import logs
from service.dev.samples import build_delivery
from tests.support.config import SECRET
from tests.support.harness import Process, free_port, serve, service_env


def lines(log: Path) -> list[dict[str, object]]:
    out = []
    for raw in log.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(raw))
        except ValueError:
            continue
    return out


@pytest.mark.timeout(120)
def test_refused_signatures_are_logged_rate_limited(
    migrated: str, redis_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    wrong = "whsec_not_the_configured_one"
    with serve(service_env(migrated, redis_url), log) as url:
        headers, body = build_delivery("buddy.hatched", "v2", secret=wrong, buddy_id="buddy_x")
        for _ in range(12):
            response = httpx.post(f"{url}/webhooks/hatched", content=body, headers=headers)
            assert response.status_code == 401
        assert httpx.post(f"{url}/webhooks/hatched", content=body).status_code == 401
    refused = [line for line in lines(log) if line.get("event") == "signature_refused"]
    codes = [line["code"] for line in refused]
    assert codes.count("invalid_signature") == logs.REFUSED_LINES_PER_WINDOW
    assert codes.count("missing_signature") == 1
    assert all(line.get("level") == "warning" and line.get("request_id") for line in refused)
    text = log.read_text()
    assert wrong not in text and SECRET not in text
    for value in headers.values():
        if len(value) > 40:  # the signature header: never logged
            assert value not in text


def test_the_rate_limit_reports_what_it_left_out() -> None:
    code = f"test_code_{time.time_ns()}"
    limit, window = logs.REFUSED_LINES_PER_WINDOW, logs.REFUSED_WINDOW_S
    written = [logs.signature_refused(code, now=1000.0 + i * 0.01) for i in range(limit + 7)]
    assert written == [True] * limit + [False] * 7
    assert logs.signature_refused(code, now=1000.0 + window + 1)  # a new window
    assert logs._refused[code][2] == 0  # the 7 left out were reported on that line


@pytest.mark.timeout(120)
def test_an_idle_worker_does_not_log_cron_runs(
    migrated: str, redis_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    env = service_env(migrated, redis_url, MIRROR_QUEUE_NAME=f"quiet-{time.time_ns()}")
    worker = Process(["worker"], env, log).start()
    try:
        time.sleep(6)  # the sweep cron runs every second here (MIRROR_SWEEP_AFTER_S=1)
    finally:
        assert worker.stop() == 0
    text = log.read_text()
    assert "Starting worker" in text  # arq's own INFO lines still come through
    assert "→ cron:" not in text and "← cron:" not in text, text[-2000:]
    assert "recording health" not in text


@pytest.mark.timeout(120)
def test_dev_keeps_its_banner_readable(migrated: str, redis_url: str, tmp_path: Path) -> None:
    """`make run` is `hatched-mirror dev`: at idle it writes a handful of lines after its
    banner, not a scroll of cron runs, and says plainly that it stopped."""
    log = tmp_path / "dev.log"
    env = service_env(migrated, redis_url, MIRROR_QUEUE_NAME=f"dev-{time.time_ns()}")
    env["MIRROR_LOG_FORMAT"] = "console"
    port = free_port()
    dev = Process(["dev", "--port", str(port)], env, log).start()
    try:
        deadline = time.monotonic() + 30
        while "Uvicorn running" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        time.sleep(6)
    finally:
        code = dev.kill(signal.SIGINT)
    text = log.read_text(errors="replace")
    assert code == 0, text
    after_banner = text.split("bootstrap demo", 1)[1].splitlines()[1:]
    assert len([line for line in after_banner if line.strip()]) <= 14, text
    assert "SIGUSR1" not in text and "cron:sweep()" not in text
    assert after_banner[-1] == "hatched-mirror dev stopped"
