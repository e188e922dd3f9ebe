"""`serve` as a supervisor sees it: a graceful SIGTERM (or Ctrl-C) ends it with status 0."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.support.harness import Process, free_port, service_env, wait_for_http


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_exits_0_after_a_graceful_stop(
    sig: signal.Signals, migrated: str, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    process = Process(args, service_env(migrated, redis_url), log).start()
    wait_for_http(f"http://127.0.0.1:{port}/readyz/inbox", why=log.read_text)
    code = process.kill(sig, timeout=30)
    text = log.read_text()
    assert "Finished server process" in text, text  # the shutdown ran to its end
    assert code == 0, text
