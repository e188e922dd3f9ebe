"""The canonical event: one shape for both of Hatched's wire formats.

Pure: no I/O. The receiver calls `parse_delivery` to classify a verified delivery; the worker calls
it again on the stored raw bytes, so a later version of this module can re-read the whole log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

import orjson

from service.coerce import as_utc, iso_time, snake_case

# Canonical event types the projector understands. Anything else is kept as `unmapped`.
KNOWN_TYPES = frozenset(
    {
        "buddy.hatched",
        "buddy.evolved",
        "coins.earned",
        "coins.spent",
        "token.earned",
        "token.spent",
        "skill.leveled",
        "skill.decayed",
        "badge.ready",
        "badge.awarded",
        "streak.ticked",
        "streak.milestone",
        "streak.burned",
        "marketplace.purchased",
        "marketplace.equipped",
        "marketplace.unequipped",
    }
)

# v1 and one concept page use the singular names.
TYPE_ALIASES = {"coin.earned": "coins.earned", "coin.spent": "coins.spent"}

Format = Literal["v1", "v2"]
# Every state a stored delivery can be in (also the CHECK on delivery_states.status, sql/0008).
DeliveryStatus = Literal["accepted", "applied", "duplicate", "unmapped", "dead"]
DELIVERY_STATUSES: tuple[DeliveryStatus, ...] = get_args(DeliveryStatus)
# What receipt decides; the worker moves `accepted` on to the others.
Status = Literal["accepted", "unmapped", "dead"]


@dataclass(frozen=True, slots=True)
class Event:
    """One normalised delivery. `data` is snake_case whatever the wire format was."""

    delivery_id: str
    event_id: str | None
    type: str
    buddy_id: str
    occurred_at: datetime
    signed_at: datetime
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Parsed:
    """How one delivery was classified. `event` is None for dead deliveries."""

    delivery_id: str
    status: Status
    reason: str | None
    raw_type: str | None
    buddy_id: str | None
    event: Event | None


# Section 2 rule 1 of hatched-webhooks.md. `image` is absent here because it is flattened.
V1_KEY_MAP: dict[str, str] = {
    "buddyId": "buddy_id",
    "balanceAfter": "balance",
    "tokenKey": "token_type",
    "fromStage": "previous_stage",
    "toStage": "new_stage",
    "configVersionId": "config_version_id",
    "skillKey": "skill_key",
    "fromLevel": "from_level",
    "toLevel": "to_level",
    "badgeId": "badge_id",
    "awardedAt": "awarded_at",
    "streakKey": "streak_key",
    "itemId": "item_id",
}
IMAGE_KEY_MAP: dict[str, str] = {"url": "image_url", "stage": "evolution_stage"}

_BALANCE_TYPES = frozenset({"coins.earned", "coins.spent", "token.earned", "token.spent"})


def parse_delivery(
    body: bytes, headers: Mapping[str, str], fmt: Format, signed_at: datetime
) -> Parsed:
    """Classify a verified delivery and normalise it into an `Event`.

    Never raises on bad input: anything unusable comes back with status "dead" and a reason.
    `headers` is read with lower-case names only.
    """
    signed_at = as_utc(signed_at)
    if fmt == "v2":
        delivery_header = "x-hatched-delivery"
        type_header = "x-hatched-event"
    else:
        delivery_header = "hatched-delivery-id"
        type_header = "hatched-event-type"
    header_delivery = _nonempty_str(headers.get(delivery_header))
    header_type = _nonempty_str(headers.get(type_header))

    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _dead(header_delivery or _body_hash(body), "body_not_json", header_type)
    if not isinstance(doc, dict):
        return _dead(header_delivery or _body_hash(body), "body_not_object", header_type)

    event_id: str | None = None
    created_at: datetime | None = None
    if fmt == "v2":
        delivery_id = header_delivery or _body_hash(body)
        raw_type = header_type or _nonempty_str(doc.get("type")) or _nonempty_str(doc.get("event"))
        payload: Any = doc
    else:
        delivery_id = _nonempty_str(doc.get("deliveryId")) or header_delivery or _body_hash(body)
        raw_type = _nonempty_str(doc.get("type")) or header_type
        payload = doc.get("data")
        if not isinstance(payload, dict):
            return _dead(delivery_id, "data_not_object", raw_type)
        event_id = _nonempty_str(doc.get("eventId"))
        created_at = iso_time(doc.get("createdAt"))

    if raw_type is None:
        return _dead(delivery_id, "no_event_type", None)
    event_type = TYPE_ALIASES.get(raw_type, raw_type)

    data = _normalise_data(payload)
    if fmt == "v1" and event_type in _BALANCE_TYPES and "reason" not in data:
        source = data.get("source")
        if isinstance(source, dict):
            reason = _nonempty_str(source.get("event_type")) or _nonempty_str(source.get("type"))
            if reason is not None:
                data["reason"] = reason

    buddy_id = _nonempty_str(data.get("buddy_id"))
    known = event_type in KNOWN_TYPES
    if buddy_id is None:
        if known:
            return _dead(delivery_id, "no_buddy_id", raw_type)
        return Parsed(
            delivery_id, "unmapped", f"unknown_event_type:{event_type}", raw_type, None, None
        )

    occurred_at = (
        created_at
        or iso_time(data.get("occurred_at"))
        or iso_time(data.get("awarded_at"))
        or signed_at
    )
    event = Event(
        delivery_id=delivery_id,
        event_id=event_id,
        type=event_type,
        buddy_id=buddy_id,
        occurred_at=occurred_at,
        signed_at=signed_at,
        data=data,
    )
    if known:
        return Parsed(delivery_id, "accepted", None, raw_type, buddy_id, event)
    return Parsed(
        delivery_id, "unmapped", f"unknown_event_type:{event_type}", raw_type, buddy_id, event
    )


def _normalise_data(payload: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    flattened: dict[str, Any] = {}
    for key, value in payload.items():
        if key == "image" and isinstance(value, dict):
            rest: dict[str, Any] = {}
            for image_key, image_value in value.items():
                target = IMAGE_KEY_MAP.get(image_key)
                if target is None:
                    rest[image_key] = image_value
                else:
                    flattened[target] = image_value
            if rest:
                data["image"] = _snake_value(rest)
            continue
        data[V1_KEY_MAP.get(key) or snake_case(key)] = _snake_value(value)
    # An explicit top-level field is more specific than one lifted out of `image`.
    for key, value in flattened.items():
        data.setdefault(key, value)
    return data


def _snake_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {snake_case(k): _snake_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_snake_value(v) for v in value]
    return value


def _dead(delivery_id: str, reason: str, raw_type: str | None) -> Parsed:
    return Parsed(delivery_id, "dead", reason, raw_type, None, None)


def _body_hash(body: bytes) -> str:
    # Hatched retries the same bytes, so a content hash still dedupes when no id was sent.
    return "sha256:" + hashlib.sha256(body).hexdigest()


def _nonempty_str(value: object) -> str | None:
    # A NUL cannot be stored in a Postgres text column: such an id counts as absent.
    if isinstance(value, str) and "\x00" not in value:
        value = value.strip()
        if value:
            return value
    return None
