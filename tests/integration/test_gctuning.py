"""`serve` and `worker` as users start them set up the garbage collector (service/gctuning.py):
each says so in its log, with what it froze."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from service import store
from service.gctuning import GC_THRESHOLDS
from tests.support.harness import Process, log_lines, serve, service_env


def tuned_lines(log: Path, process: str) -> list[dict[str, object]]:
    return [
        x for x in log_lines(log) if x.get("event") == "gc_tuned" and x.get("process") == process
    ]


def check(line: dict[str, object]) -> None:
    assert line["thresholds"] == list(GC_THRESHOLDS)
    # Startup built the modules, the app and its clients: tens of thousands of objects.
    frozen = line["frozen"]
    assert isinstance(frozen, int) and frozen > 10_000


def test_serve_and_worker_tune_the_garbage_collector(
    migrated: str, redis_url: str, db: store.Pool, tmp_path: Path
) -> None:
    env = service_env(migrated, redis_url)
    serve_log = tmp_path / "serve.log"
    with serve(env, serve_log) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200
    (line,) = tuned_lines(serve_log, "serve")
    check(line)

    worker_log = tmp_path / "worker.log"
    worker = Process(["worker"], env, worker_log).start()
    try:
        deadline = time.monotonic() + 30
        while not tuned_lines(worker_log, "worker") and time.monotonic() < deadline:
            assert worker.proc is not None and worker.proc.poll() is None, worker_log.read_text()
            time.sleep(0.2)
    finally:
        worker.stop()
    (line,) = tuned_lines(worker_log, "worker")
    check(line)
