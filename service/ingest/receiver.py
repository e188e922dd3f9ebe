"""POST /webhooks/hatched: verify, store durably, wake a worker, answer. Nothing else."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import structlog
from starlette.requests import Request
from starlette.responses import Response

from service import logs, metrics, store
from service.ingest.events import parse_delivery
from service.ingest.signatures import SignatureError, verify
from service.ingest.wakeups import shard_of
from service.problems import DATABASE_ERRORS, Problem, json_response, unavailable
from service.state import AppState

log = structlog.get_logger(__name__)

# Only these headers matter for replay; the rest (proxies, tracing) is not worth storing.
_KEPT_PREFIXES = ("x-hatched-", "hatched-")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing to read past `limit` bytes (Content-Length may lie or be absent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> Problem:
    return Problem(413, "payload_too_large", "Payload too large", f"body exceeds {limit} bytes")


async def receive(request: Request) -> Response:
    state: AppState = request.app.state.mirror
    settings = state.settings
    body = await read_body(request, settings.max_body_bytes)
    try:
        verified = verify(
            body,
            request.headers,
            settings.webhook_secrets,
            time.time(),
            settings.signature_tolerance_s,
        )
    except SignatureError as exc:
        metrics.SIGNATURE_FAILURES.labels(code=exc.code).inc()
        logs.signature_refused(exc.code)
        raise Problem(401, exc.code, "Signature rejected", str(exc)) from None
    metrics.SECRET_MATCHES.labels(index=str(verified.secret_index)).inc()

    signed_at = datetime.fromtimestamp(verified.timestamp, UTC)
    parsed = parse_delivery(body, request.headers, verified.format, signed_at)
    # From here on every line about this delivery says which one (and whose).
    structlog.contextvars.bind_contextvars(delivery_id=parsed.delivery_id, buddy_id=parsed.buddy_id)
    event = parsed.event
    delivery = store.NewDelivery(
        delivery_id=parsed.delivery_id,
        format=verified.format,
        event_type=event.type if event is not None else parsed.raw_type,
        event_id=event.event_id if event is not None else None,
        buddy_id=parsed.buddy_id,
        shard=shard_of(parsed.buddy_id, settings.shards) if parsed.buddy_id else 0,
        occurred_at=event.occurred_at if event is not None else None,
        signed_at=signed_at,
        headers={k: v for k, v in request.headers.items() if k.startswith(_KEPT_PREFIXES)},
        body=body,
        status=parsed.status,
        reason=parsed.reason,
    )
    try:
        seq = await state.inbox.store(delivery)
    except DATABASE_ERRORS as exc:
        log.error("inbox_unavailable", error=repr(exc))
        metrics.DELIVERIES.labels(type=metrics.type_label(delivery.event_type), outcome="503").inc()
        raise unavailable("the inbox database is unreachable; retry later") from None

    if seq == store.FORGOTTEN:
        # The buddy was erased: nothing was stored, the tombstone counted the hit. A 2xx, so
        # Hatched stops retrying.
        metrics.DELIVERIES.labels(
            type=metrics.type_label(delivery.event_type), outcome="forgotten"
        ).inc()
        metrics.TOMBSTONE_HITS.labels(path="receiver").inc()
        log.info("delivery_forgotten")
        return json_response({"delivery_id": parsed.delivery_id, "status": "forgotten"}, 202)

    if seq is None:
        metrics.DELIVERIES.labels(
            type=metrics.type_label(delivery.event_type), outcome="duplicate"
        ).inc()
        log.info("delivery_duplicate")
        return json_response({"delivery_id": parsed.delivery_id, "status": "duplicate"}, 200)

    metrics.DELIVERIES.labels(
        type=metrics.type_label(delivery.event_type), outcome=parsed.status
    ).inc()
    log.info("delivery_stored", seq=seq, status=parsed.status, reason=parsed.reason)
    return json_response({"delivery_id": parsed.delivery_id, "status": parsed.status}, 202)
