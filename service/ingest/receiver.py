"""POST /webhooks/hatched: verify, store durably, wake a worker, answer. Nothing else."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from service import logs, metrics, store
from service.ingest.events import PARSER, Format, Parsed, parse_delivery, stored_data
from service.ingest.inbox import DeliveryRefused
from service.ingest.signatures import SignatureError, ambiguous_header, verify
from service.ingest.wakeups import shard_of
from service.problems import (
    DATABASE_ERRORS,
    Problem,
    invalid_parameter,
    json_response,
    unavailable,
)
from service.state import AppState

log = structlog.get_logger(__name__)

PATH = "/webhooks/hatched"

# Only these headers matter for replay; the rest (proxies, tracing) is not worth storing.
_KEPT_PREFIXES = (b"x-hatched-", b"hatched-")


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The raw body, refusing to read past `limit` bytes (Content-Length may lie or be absent)
    or for longer than `timeout_s` (a client trickling its upload holds a connection)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        log.info("request_body_timeout", received_bytes=size, timeout_s=timeout_s)
        raise Problem(
            408, "request_timeout", "Request timeout", f"body not received within {timeout_s:g}s"
        ) from None
    except ClientDisconnect:
        # The client gave up mid-upload: nothing to store and nobody to answer; one quiet line.
        log.info("client_disconnected", received_bytes=size)
        raise Problem(400, "client_disconnected", "Client disconnected") from None
    return b"".join(chunks)


async def read_json_object(
    request: Request, limit: int, timeout_s: float, *, empty: bool = False
) -> dict[str, Any]:
    """A JSON object request body (read as `read_body` does), else `400 invalid_parameter`
    naming `body`. `empty`: a blank body counts as `{}`."""
    raw = await read_body(request, limit, timeout_s)
    if empty and not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid_parameter("body", "must be a JSON object") from None
    if not isinstance(body, dict):
        raise invalid_parameter("body", "must be a JSON object")
    return body


def _too_large(limit: int) -> Problem:
    return Problem(413, "payload_too_large", "Payload too large", f"body exceeds {limit} bytes")


def stored_delivery(
    parsed: Parsed,
    fmt: Format,
    signed_at: datetime,
    headers: dict[str, str],
    body: bytes,
    *,
    shards: int,
    signature: bytes | None,
) -> store.NewDelivery:
    """The inbox row of a verified, classified webhook: the raw delivery, what it was
    classified as, and the event's data for the worker to apply without parsing it again."""
    event = parsed.event
    data = stored_data(parsed)
    return store.NewDelivery(
        delivery_id=parsed.delivery_id,
        format=fmt,
        event_type=event.type if event is not None else parsed.raw_type,
        event_id=event.event_id if event is not None else None,
        buddy_id=parsed.buddy_id,
        shard=shard_of(parsed.buddy_id, shards) if parsed.buddy_id else 0,
        occurred_at=event.occurred_at if event is not None else None,
        signed_at=signed_at,
        headers=headers,
        body=body,
        status=parsed.status,
        reason=parsed.reason,
        signature=signature,
        event_data=data,
        event_parser=PARSER if data is not None else None,
    )


async def receive(request: Request) -> Response:
    state: AppState = request.app.state.mirror
    settings = state.settings
    refuse_ambiguous(request.scope["headers"])
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    return await store_body(state, request.scope["headers"], body)


def refuse_ambiguous(raw_headers: list[tuple[bytes, bytes]]) -> None:
    if (name := ambiguous_header(raw_headers)) is not None:
        raise Problem(
            400,
            "ambiguous_header",
            "Ambiguous header",
            f"`{name}` is sent more than once (or with the other signature scheme)",
        )


async def store_body(
    state: AppState, raw_headers: list[tuple[bytes, bytes]], body: bytes
) -> Response:
    """A delivery whose body is in hand (read within the size and time limits, its headers
    unambiguous): verified, stored, answered. Raises Problem for what is refused."""
    settings = state.settings
    # The one view of the headers that verification, classification and storage all read (and
    # the worker reads again): with no significant header repeated, it cannot differ from them.
    # Decoded as Starlette's Headers decodes them (latin-1).
    headers = {
        k.decode("latin-1"): v.decode("latin-1")
        for k, v in raw_headers
        if k.startswith(_KEPT_PREFIXES)
    }
    try:
        verified = verify(
            body,
            headers,
            settings.webhook_secrets,
            time.time(),
            settings.signature_tolerance_s,
        )
    except SignatureError as exc:
        metrics.SIGNATURE_FAILURES.labels(code=exc.code).inc()
        logs.signature_refused(exc.code)
        raise Problem(401, exc.code, "Signature rejected", str(exc)) from None
    metrics.count(metrics.SECRET_MATCHES, str(verified.secret_index))

    signed_at = datetime.fromtimestamp(verified.timestamp, UTC)
    parsed = parse_delivery(body, headers, verified.format, signed_at)
    # From here on every line about this delivery says which one (and whose).
    structlog.contextvars.bind_contextvars(delivery_id=parsed.delivery_id, buddy_id=parsed.buddy_id)
    delivery = stored_delivery(
        parsed,
        verified.format,
        signed_at,
        headers,
        body,
        shards=settings.shards,
        signature=verified.replay_key(),
    )
    try:
        stored = await state.inbox.store(delivery)
    except DeliveryRefused as exc:
        metrics.count(metrics.DELIVERIES, metrics.type_label(delivery.event_type), "400")
        raise Problem(400, "delivery_refused", "Delivery refused", str(exc)) from None
    except DATABASE_ERRORS as exc:
        log.error("inbox_unavailable", error=repr(exc))
        metrics.count(metrics.DELIVERIES, metrics.type_label(delivery.event_type), "503")
        raise unavailable("the inbox database is unreachable; retry later") from None

    if stored.seq == store.FORGOTTEN:
        # The buddy was erased: nothing was stored, the tombstone counted the hit. A 2xx, so
        # Hatched stops retrying.
        metrics.count(metrics.DELIVERIES, metrics.type_label(delivery.event_type), "forgotten")
        metrics.TOMBSTONE_HITS.labels(path="receiver").inc()
        log.info("delivery_forgotten")
        return json_response({"delivery_id": parsed.delivery_id, "status": "forgotten"}, 202)

    if stored.seq is None:
        # A delivery id stored before (Hatched's retry), or a signature stored before (a
        # replay of a captured request under another delivery id or event type).
        metrics.count(metrics.DELIVERIES, metrics.type_label(delivery.event_type), "duplicate")
        log.info("delivery_duplicate")
        return json_response({"delivery_id": parsed.delivery_id, "status": "duplicate"}, 200)

    metrics.count(metrics.DELIVERIES, metrics.type_label(delivery.event_type), stored.status)
    log.info("delivery_stored", seq=stored.seq, status=stored.status, reason=stored.reason)
    return json_response({"delivery_id": parsed.delivery_id, "status": stored.status}, 202)
