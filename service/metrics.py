"""Prometheus metrics. Labels stay low-cardinality: event types are a closed set, and there are
at most MIRROR_SUBSCRIPTIONS_MAX subscriptions."""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import store
from service.ingest.events import KNOWN_TYPES
from service.store import subscriptions

# Every HTTP request, by route template ("/v1/buddies/{buddy_id}", or
# "unmatched" for a path no route serves) and status: rate, errors and latency.
HTTP_REQUESTS = Counter(
    "hatched_mirror_http_requests_total",
    "HTTP requests answered, by method, route template and status.",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "hatched_mirror_http_request_seconds",
    "Time from a request's arrival to its response headers, by route template and status.",
    ["route", "status"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BUILD_INFO = Gauge(
    "hatched_mirror_build_info",
    "The running version (value 1).",
    ["version"],
    multiprocess_mode="max",
)
SECRET_MATCHES = Counter(
    "hatched_signature_secret_matches_total",
    "Verified deliveries by the position in HATCHED_WEBHOOK_SECRETS of the secret that matched "
    "(0 = first); after a rotation, retire the old secret once its rate is zero.",
    ["index"],
)

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
# `multiprocess_mode` only matters under `serve --workers N` (render_latest below): the inbox
# gauges are the same shared figures in every process, so the freshest one counts; stream
# clients add up over the live processes.
INBOX_LAG = Gauge(
    "hatched_inbox_lag_seconds",
    "Age of the oldest delivery still waiting to be applied.",
    multiprocess_mode="mostrecent",
)
INBOX_PENDING = Gauge(
    "hatched_inbox_pending", "Deliveries waiting to be applied.", multiprocess_mode="mostrecent"
)
INBOX_BACKOFF = Gauge(
    "hatched_inbox_backoff",
    "Of the pending deliveries, those waiting out a retry backoff (more workers do not help).",
    multiprocess_mode="mostrecent",
)
INBOX_READY_LAG = Gauge(
    "hatched_inbox_ready_lag_seconds",
    "Age of the oldest pending delivery a worker may take now (backoff left out).",
    multiprocess_mode="mostrecent",
)
DEAD = Gauge(
    "hatched_inbox_dead",
    "Deliveries in status dead, waiting for a replay.",
    multiprocess_mode="mostrecent",
)
STREAM_CLIENTS = Gauge(
    "hatched_stream_clients", "Live SSE clients of this process.", multiprocess_mode="livesum"
)
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
SUBSCRIPTION_DELIVERIES = Counter(
    "hatched_subscription_deliveries_total",
    "Changes POSTed to subscriptions, by outcome (delivered: a 2xx; rejected: any other answer;"
    " timeout; unreachable).",
    ["subscription_id", "outcome"],
)
SUBSCRIPTION_DELIVERY_LAG = Histogram(
    "hatched_subscription_delivery_seconds",
    "From a change's commit to its acknowledgement by the subscription's endpoint.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)
# Read at scrape time from Postgres, like the inbox gauges: the same in every process, and
# still right when no worker runs.
SUBSCRIPTION_LAG = Gauge(
    "hatched_subscription_lag_entries",
    "Feed entries a subscription has not had acknowledged yet.",
    ["subscription_id"],
    multiprocess_mode="mostrecent",
)
SUBSCRIPTION_LAG_SECONDS = Gauge(
    "hatched_subscription_lag_seconds",
    "Age of the oldest feed entry a subscription has not had acknowledged (0: none).",
    ["subscription_id"],
    multiprocess_mode="mostrecent",
)
SUBSCRIPTIONS = Gauge(
    "hatched_subscriptions",
    "Subscriptions by status (active, failing, disabled).",
    ["status"],
    multiprocess_mode="mostrecent",
)


def type_label(event_type: str | None) -> str:
    return event_type if event_type in KNOWN_TYPES else "other"


# The inbox gauges come from one aggregate query over delivery_states. Every replica's scrape
# and every sweep would run it; with a large backlog (a million dead deliveries) that is a
# third of a second of a pooled connection each, so a process runs it at most once per
# INBOX_STATS_MAX_AGE_S and concurrent scrapes wait for the one query in flight.
INBOX_STATS_MAX_AGE_S = 5.0
_inbox_refreshed_at = float("-inf")
_inbox_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def refresh_inbox_gauges(
    conn: store.Executor, max_age_s: float = INBOX_STATS_MAX_AGE_S
) -> None:
    global _inbox_refreshed_at
    if time.monotonic() - _inbox_refreshed_at < max_age_s:
        return
    # One lock per event loop (`dev` and the tests may run more than one in a process).
    lock = _inbox_locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
    async with lock:
        if time.monotonic() - _inbox_refreshed_at < max_age_s:
            return  # another scrape refreshed them while this one waited
        backlog = await store.inbox_backlog(conn)
        INBOX_PENDING.set(backlog.pending)
        INBOX_BACKOFF.set(backlog.backoff)
        INBOX_LAG.set(backlog.lag_s)
        INBOX_READY_LAG.set(backlog.ready_lag_s)
        DEAD.set(backlog.dead)
        await _refresh_subscription_gauges(conn)
        _inbox_refreshed_at = time.monotonic()


async def _refresh_subscription_gauges(conn: store.Executor) -> None:
    rows = await subscriptions.stats(conn)
    # A deleted subscription's series go; each status is shown, 0 included, for the alerts.
    SUBSCRIPTION_LAG.clear()
    SUBSCRIPTION_LAG_SECONDS.clear()
    counts = dict.fromkeys(("active", "failing", "disabled"), 0)
    now = datetime.now(UTC)
    for row in rows:
        sid = row["subscription_id"]
        counts[row["status"]] += 1
        SUBSCRIPTION_LAG.labels(subscription_id=sid).set(row["lag"])
        oldest = row["oldest_pending_at"]
        age = (now - oldest).total_seconds() if oldest is not None else 0.0
        SUBSCRIPTION_LAG_SECONDS.labels(subscription_id=sid).set(max(0.0, age))
    for status, count in counts.items():
        SUBSCRIPTIONS.labels(status=status).set(count)


def render_latest() -> tuple[bytes, str]:
    """The exposition of this process, or under `serve --workers N` (PROMETHEUS_MULTIPROC_DIR,
    set by the CLI) of all its worker processes, so one scrape shows the server's totals."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def set_build_info() -> None:
    try:
        version = metadata.version("hatched-mirror")
    except metadata.PackageNotFoundError:  # running from a tree that was never installed
        version = "unknown"
    BUILD_INFO.labels(version=version).set(1)


def observe_hatched_call(route: str, status: int | None, seconds: float) -> None:
    HATCHED_CALLS.labels(route=route, status=str(status) if status is not None else "none").inc()
    HATCHED_SECONDS.labels(route=route).observe(seconds)


# Set by a fast path that answers before the router runs (service/read/cached.py), so its
# answers are counted under the route they stand for.
ROUTE_KEY = "hatched_mirror.route"


class HttpMetrics:
    """Pure ASGI: counts each response and times it to its headers, labelled by the route
    template the router matched (never the raw path, which would be unbounded). Time to the
    headers rather than to the last byte, so an SSE stream counts as fast as it started."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = ""

        async def send_timed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
                _observe(scope, status, time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            if not status:  # no response at all: the app failed before answering
                _observe(scope, "500", time.perf_counter() - started)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# labels() takes a lock and validates on every call; the children are cached here instead
# (bounded: route templates, seven methods and "other", the status codes the app answers).
_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def _observe(scope: Scope, status: str, seconds: float) -> None:
    route = scope.get("route")
    template = getattr(route, "path", None) or scope.get(ROUTE_KEY) or "unmatched"
    method = scope["method"] if scope["method"] in _METHODS else "other"
    observe_http(method, template, status, seconds)


_counted: dict[tuple[int, tuple[str, ...]], Any] = {}


def count(metric: Counter, *values: str) -> None:
    """`metric.labels(*values).inc()` for a counter every delivery increments, with its child
    looked up once (labels() locks and validates each time; the label values are bounded)."""
    key = (id(metric), values)
    child = _counted.get(key)
    if child is None:
        child = _counted[key] = metric.labels(*values)
    child.inc()


def observe_http(method: str, template: str, status: str, seconds: float) -> None:
    """One answered request, for a layer that answers in front of HttpMetrics (the cached
    reads' fast path): the same series the middleware would have counted it in."""
    key = (method, template, status)
    children = _children.get(key)
    if children is None:
        children = (
            HTTP_REQUESTS.labels(method=method, route=template, status=status),
            HTTP_SECONDS.labels(route=template, status=status),
        )
        _children[key] = children
    children[0].inc()
    children[1].observe(seconds)
