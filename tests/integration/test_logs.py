"""Structured logs: JSON lines that say which delivery, buddy and request; no secrets."""

from __future__ import annotations

from pathlib import Path

import httpx

from service import store
from service.dev.samples import build_delivery
from tests.support.config import ADMIN_TOKEN, API_TOKEN, SECRET
from tests.support.harness import log_lines, serve, service_env


def test_delivery_lines_carry_ids_and_no_secret_is_logged(
    migrated: str, redis_url: str, db: store.Pool, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    headers, body = build_delivery("coins.earned", "v2", secret=SECRET, buddy_id="buddy_logged")
    with serve(service_env(migrated, redis_url), log) as url:
        sent = httpx.post(
            f"{url}/webhooks/hatched", content=body, headers={**headers, "X-Request-ID": "req-123"}
        )
        assert sent.status_code == 202 and sent.headers["x-request-id"] == "req-123"
        forged = httpx.post(
            f"{url}/webhooks/hatched",
            content=body,
            headers={**headers, "X-Hatched-Signature": "sha256=" + "0" * 64},
        )
        assert forged.status_code == 401
        generated = forged.headers["x-request-id"]
        assert generated and generated != "req-123"
        read = httpx.get(
            f"{url}/v1/buddies/buddy_logged", headers={"Authorization": f"Bearer {API_TOKEN}"}
        )
        assert read.status_code in (200, 404)
    lines = log_lines(log)
    stored = [line for line in lines if line.get("event") == "delivery_stored"]
    assert len(stored) == 1
    assert stored[0]["delivery_id"] == sent.json()["delivery_id"]
    assert stored[0]["buddy_id"] == "buddy_logged"
    assert stored[0]["request_id"] == "req-123"
    assert {"timestamp", "level"} <= stored[0].keys()
    assert not any("_record" in line or "_from_structlog" in line for line in lines)
    text = log.read_text()
    for secret in (SECRET, API_TOKEN, ADMIN_TOKEN):
        assert secret not in text
