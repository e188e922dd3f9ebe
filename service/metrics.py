"""Prometheus metrics. Labels stay low-cardinality: event types are a closed set."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from service import store
from service.ingest.events import KNOWN_TYPES

DELIVERIES = Counter(
    "hatched_deliveries_total",
    "Webhook deliveries answered by the receiver, by event type and outcome.",
    ["type", "outcome"],
)
SIGNATURE_FAILURES = Counter(
    "hatched_signature_failures_total", "Deliveries refused for their signature.", ["code"]
)
APPLIED = Counter(
    "hatched_apply_deliveries_total", "Deliveries finished by the worker, by status.", ["status"]
)
APPLY_BATCH = Histogram(
    "hatched_apply_batch_size",
    "Deliveries per apply transaction.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
)
APPLY_SECONDS = Histogram("hatched_apply_seconds", "Time to drain one shard wake-up.")
INCONSISTENCIES = Counter(
    "hatched_balance_inconsistencies_total",
    "Balances that did not follow from the previous one (a missed or reordered event).",
)
INBOX_LAG = Gauge(
    "hatched_inbox_lag_seconds", "Age of the oldest delivery still waiting to be applied."
)
INBOX_PENDING = Gauge("hatched_inbox_pending", "Deliveries waiting to be applied.")
DEAD = Gauge("hatched_inbox_dead", "Deliveries in status dead, waiting for a replay.")
STREAM_CLIENTS = Gauge("hatched_stream_clients", "Live SSE clients of this process.")
PRUNED = Counter("hatched_pruned_deliveries_total", "Applied deliveries deleted after retention.")
CHANGES_WRITTEN = Counter(
    "hatched_changes_written_total", "Change-feed entries written (one per visible change)."
)
CHANGES_PRUNED = Counter(
    "hatched_pruned_changes_total", "Change-feed entries deleted after their retention."
)
HATCHED_CALLS = Counter(
    "hatched_api_requests_total",
    "Calls to Hatched's REST API, by route and HTTP status (429: rate limited; none: no answer).",
    ["route", "status"],
)
HATCHED_SECONDS = Histogram("hatched_api_request_seconds", "Hatched REST API latency.", ["route"])
REFRESHES = Counter(
    "hatched_refreshes_total",
    "Buddy refreshes from the REST API, by outcome (stored, failed, not_found, skipped_budget,"
    " forgotten).",
    ["outcome"],
)
REFRESH_DRIFT = Counter(
    "hatched_refresh_drift_fields_total",
    "Mirrored fields a REST refresh had to correct (webhooks alone had drifted).",
    ["field"],
)
SWEPT = Counter("hatched_sweep_wakeups_total", "Shards re-woken by the sweeper.")
TOMBSTONE_HITS = Counter(
    "hatched_tombstone_hits_total",
    "Deliveries, refreshes and backfill loads of an erased buddy turned away, by path"
    " (receiver, refresh, backfill).",
    ["path"],
)
ERASURES = Counter("hatched_erasures_total", "End users erased (DELETE /v1/users/{id}, forget).")


def type_label(event_type: str | None) -> str:
    return event_type if event_type in KNOWN_TYPES else "other"


async def refresh_inbox_gauges(conn: store.Executor) -> None:
    pending, lag_s, dead = await store.inbox_stats(conn)
    INBOX_PENDING.set(pending)
    INBOX_LAG.set(lag_s)
    DEAD.set(dead)


def observe_hatched_call(route: str, status: int | None, seconds: float) -> None:
    HATCHED_CALLS.labels(route=route, status=str(status) if status is not None else "none").inc()
    HATCHED_SECONDS.labels(route=route).observe(seconds)
