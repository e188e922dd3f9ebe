"""The metrics operators query, read from live processes: a real `serve` and `worker`
scraped over HTTP, every metric name in the Grafana dashboard, the alert rules and the KEDA
ScaledObject exported by one of them; HTTP request metrics by route template and status; the
build info; which webhook secret matched; the inbox gauges (backoff left out of the ready
backlog); `serve --workers 2` summing its processes."""

from __future__ import annotations

import importlib
import json
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import metrics, store
from service.config import Settings
from service.dev.samples import build_delivery
from tests.support.config import API_TOKEN, SECOND_SECRET, SECRET
from tests.support.harness import Process, free_port, serve, service_env
from tests.support.scrape import sample

yaml: Any = importlib.import_module("yaml")

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported_names(text: str) -> set[str]:
    """Every series name a scrape may carry, including families that have no sample yet (a
    labelled counter nothing has incremented)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def queried_names() -> dict[str, set[str]]:
    """Metric names in each artifact's PromQL."""
    pattern = re.compile(r"\bhatched_[a-z0-9_]+")
    dashboard = json.loads((ROOT / "deploy/grafana/hatched-mirror.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    rule = yaml.safe_load((ROOT / "deploy/k8s/monitoring/prometheusrule.yaml").read_text())
    rules = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    scaled = yaml.safe_load((ROOT / "deploy/k8s/base/scaledobject-worker.yaml").read_text())
    keda = [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]
    overlay = (ROOT / "deploy/k8s/overlays/example/kustomization.yaml").read_text()
    return {
        "dashboard": {n for e in exprs for n in pattern.findall(e)},
        "rules": {n for e in rules for n in pattern.findall(e)},
        "keda": {n for e in keda for n in pattern.findall(e)},
        "overlay keda patch": set(pattern.findall(overlay)),
    }


def scrape(url: str, deadline_s: float = 30) -> str:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                return response.text
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"no metrics at {url}"
        time.sleep(0.2)


@pytest.mark.timeout(120)
def test_every_queried_metric_is_exported(migrated: str, redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = service_env(migrated, redis_url, MIRROR_WORKER_METRICS_PORT=str(port))
    env["MIRROR_QUEUE_NAME"] = f"metrics-live-{time.time_ns()}"
    worker = Process(["worker"], env, tmp_path / "worker.log").start()
    try:
        worker_text = scrape(f"http://127.0.0.1:{port}/metrics")
        with serve(env, tmp_path / "serve.log") as url:
            serve_text = scrape(f"{url}/metrics")
    finally:
        assert worker.stop() == 0
    exported = exported_names(serve_text) | exported_names(worker_text)
    for artifact, names in queried_names().items():
        assert names, f"{artifact} queries nothing?"
        assert names <= exported, f"{artifact} queries unknown metrics: {names - exported}"


async def test_http_metrics_by_route_template_and_status(http: httpx.AsyncClient) -> None:
    before = (await http.get("/metrics")).text
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    for _ in range(3):
        assert (await http.get("/v1/buddies/buddy_nope", headers=auth)).status_code == 404
    assert (await http.get("/v1/buddies/buddy_x")).status_code == 401
    assert (await http.get("/no/such/path")).status_code == 404
    after = (await http.get("/metrics")).text
    route = "/v1/buddies/{buddy_id}"

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    total = "hatched_mirror_http_requests_total"
    assert delta(total, method="GET", route=route, status="404") == 3
    assert delta(total, method="GET", route=route, status="401") == 1
    assert delta(total, method="GET", route="unmatched", status="404") == 1
    assert delta("hatched_mirror_http_request_seconds_count", route=route, status="404") == 3
    # The raw path never becomes a label.
    assert "buddy_nope" not in after
    version = metadata.version("hatched-mirror")
    assert sample(after, "hatched_mirror_build_info", version=version) == 1


async def test_the_matching_secret_is_counted_by_position(
    http: httpx.AsyncClient, settings: Settings
) -> None:
    assert settings.webhook_secrets == [SECRET, SECOND_SECRET]
    before = (await http.get("/metrics")).text
    for i, secret in enumerate((SECRET, SECOND_SECRET, SECOND_SECRET)):
        headers, body = build_delivery(
            "buddy.hatched", "v2", secret=secret, buddy_id=f"buddy_secret_{i}"
        )
        assert (await http.post("/webhooks/hatched", content=body, headers=headers)).is_success
    after = (await http.get("/metrics")).text
    name = "hatched_signature_secret_matches_total"
    assert sample(after, name, index="0") - sample(before, name, index="0") == 1
    assert sample(after, name, index="1") - sample(before, name, index="1") == 2
    assert SECOND_SECRET not in after and SECRET not in after


async def test_inbox_gauges_leave_backoff_out_and_are_cached(
    http: httpx.AsyncClient, db: store.Pool
) -> None:
    for i in range(3):
        headers, body = build_delivery("buddy.hatched", "v2", secret=SECRET, buddy_id=f"b_{i}")
        assert (await http.post("/webhooks/hatched", content=body, headers=headers)).is_success
    # The oldest failed an attempt (2 h ago) and waits out its backoff; the others (1 h old)
    # are ready: the ready lag is theirs.
    oldest = "(SELECT min(seq) FROM delivery_states WHERE status = 'accepted')"
    await db.execute(
        f"UPDATE delivery_states SET next_attempt_at = now() + interval '1 hour' "
        f"WHERE seq = {oldest}"
    )
    await db.execute(
        f"UPDATE deliveries SET received_at = now() - CASE WHEN seq = {oldest} "
        "THEN interval '2 hours' ELSE interval '1 hour' END"
    )
    await metrics.refresh_inbox_gauges(db, max_age_s=0)
    assert metrics.INBOX_PENDING._value.get() == 3
    assert metrics.INBOX_BACKOFF._value.get() == 1
    assert metrics.INBOX_LAG._value.get() >= 7200
    assert 3600 <= metrics.INBOX_READY_LAG._value.get() < 3700
    # Within INBOX_STATS_MAX_AGE_S a scrape does not query again: the gauges stay as they were.
    await db.execute("UPDATE delivery_states SET next_attempt_at = NULL")
    await metrics.refresh_inbox_gauges(db)
    assert metrics.INBOX_BACKOFF._value.get() == 1
    await metrics.refresh_inbox_gauges(db, max_age_s=0)
    assert metrics.INBOX_BACKOFF._value.get() == 0


@pytest.mark.timeout(120)
def test_serve_with_two_workers_reports_the_sum(
    migrated: str, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = service_env(migrated, redis_url)
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    process = Process(args, env, tmp_path / "serve.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        scrape(f"{url}/healthz")
        before = sample(
            httpx.get(f"{url}/metrics").text,
            "hatched_mirror_http_requests_total",
            route="/healthz",
            status="200",
        )
        sent = 40
        for _ in range(sent):  # fresh connections, so both processes answer some
            assert httpx.get(f"{url}/healthz", headers={"Connection": "close"}).status_code == 200
        counted = [
            sample(
                httpx.get(f"{url}/metrics", headers={"Connection": "close"}).text,
                "hatched_mirror_http_requests_total",
                route="/healthz",
                status="200",
            )
            for _ in range(4)
        ]
    finally:
        code = process.stop()
    assert all(c - before >= sent for c in counted), (before, counted)
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
