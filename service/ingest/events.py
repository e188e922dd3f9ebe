"""The canonical event: one shape for both of Hatched's wire formats.

Pure: no I/O. The receiver calls `parse_delivery` to classify a verified delivery and stores the
event's data beside the raw bytes (`stored_data`); the worker rebuilds the event from that
(`stored_event`). A delivery stored by another version of the normaliser (`PARSER`) is parsed
again from its raw bytes, so a later version of this module can still re-read the whole log.

Every id it returns obeys `service.ids` (length and characters), every time is within
`MIN_TIME`..`MAX_TIME` and no body is deeper than `MAX_DEPTH`: a delivery breaking one is dead,
with a reason that quotes at most a prefix of the value.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args

import orjson

from service.coerce import as_utc, snake_case
from service.ids import MAX_TYPE_CHARS, id_problem, prefix

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

# Payload fields that name something the mirror stores as a key or id (besides buddy_id).
ID_FIELDS = (
    "user_id",
    "egg_id",
    "token_type",
    "skill_key",
    "badge_id",
    "streak_key",
    "item_id",
)
# Hatched's payloads are a few levels deep; anything much deeper is not one of them, and an
# unbounded depth would exhaust the recursion of the normaliser (and of whoever reads it next).
MAX_DEPTH = 32
# Order keys outside this range are not times Hatched can have meant; one far in the future
# would also win every last-writer-wins comparison for good.
MIN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
MAX_TIME = datetime(3000, 1, 1, tzinfo=UTC)


# The version of the normalisation below, stored with each delivery's data
# (deliveries.event_parser). Bump it whenever parse_delivery would give a stored body another
# event than before: the worker then parses deliveries stored under the old number again.
PARSER = 1


class _Dead(Exception):
    """A field that makes the delivery unusable; str(exc) is the stored reason."""


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
    try:
        header_delivery = _id(headers.get(delivery_header), "delivery id")
    except _Dead as exc:
        return _dead(_invalid_id(headers.get(delivery_header)), str(exc), None)
    fallback_id = header_delivery or _body_hash(body)
    try:
        header_type = _type(headers.get(type_header))
    except _Dead as exc:
        return _dead(fallback_id, str(exc), None)

    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        # orjson refuses more than 1024 levels of nesting with this error too.
        return _dead(fallback_id, "body_not_json", header_type)
    if not isinstance(doc, dict):
        return _dead(fallback_id, "body_not_object", header_type)
    if _deeper_than(doc, MAX_DEPTH):
        return _dead(fallback_id, f"body_too_deep: more than {MAX_DEPTH} levels", header_type)

    event_id: str | None = None
    created_at: datetime | None = None
    if fmt == "v2":
        delivery_id = fallback_id
        try:
            raw_type = header_type or _type(doc.get("type")) or _type(doc.get("event"))
        except _Dead as exc:
            return _dead(delivery_id, str(exc), None)
        payload: Any = doc
    else:
        try:
            body_delivery = _id(doc.get("deliveryId"), "deliveryId")
        except _Dead as exc:
            return _dead(_invalid_id(doc.get("deliveryId")), str(exc), header_type)
        delivery_id = body_delivery or fallback_id
        try:
            raw_type = _type(doc.get("type")) or header_type
        except _Dead as exc:
            return _dead(delivery_id, str(exc), None)
        payload = doc.get("data")
        if not isinstance(payload, dict):
            return _dead(delivery_id, "data_not_object", raw_type)
        try:
            event_id = _id(doc.get("eventId"), "eventId")
            created_at = _time(doc.get("createdAt"), "createdAt")
        except _Dead as exc:
            return _dead(delivery_id, str(exc), raw_type)

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

    try:
        buddy_id = _id(data.get("buddy_id"), "buddy_id")
        for name in ID_FIELDS:
            value = data.get(name)
            if isinstance(value, str) and (problem := id_problem(value)) is not None:
                raise _Dead(f"invalid_id: {name} {problem}; starts {prefix(value)}")
        occurred_at = (
            created_at
            or _time(data.get("occurred_at"), "occurred_at")
            or _time(data.get("awarded_at"), "awarded_at")
            or signed_at
        )
    except _Dead as exc:
        return _dead(delivery_id, str(exc), raw_type)
    known = event_type in KNOWN_TYPES
    if buddy_id is None:
        if known:
            return _dead(delivery_id, "no_buddy_id", raw_type)
        return Parsed(
            delivery_id, "unmapped", f"unknown_event_type:{event_type}", raw_type, None, None
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


def stored_data(parsed: Parsed) -> str | None:
    """What the receiver stores as `deliveries.event_data`: the event's data as JSON text, for
    a delivery the worker will apply; None otherwise (the worker never reads it)."""
    if parsed.status != "accepted" or parsed.event is None:
        return None
    return orjson.dumps(parsed.event.data).decode()


def stored_event(
    delivery_id: str,
    event_type: str,
    event_id: str | None,
    buddy_id: str,
    occurred_at: datetime,
    signed_at: datetime,
    data_json: str,
) -> Parsed:
    """The accepted delivery `parse_delivery` gave at receipt, from the columns stored with it
    (the data from `stored_data`), without reading the body again."""
    data = orjson.loads(data_json)
    event = Event(delivery_id, event_id, event_type, buddy_id, occurred_at, signed_at, data)
    return Parsed(delivery_id, "accepted", None, event_type, buddy_id, event)


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
    # A NUL cannot be stored in a Postgres text column: such a value counts as absent.
    if isinstance(value, str) and "\x00" not in value:
        value = value.strip()
        if value:
            return value
    return None


def _id(value: object, name: str, max_chars: int | None = None) -> str | None:
    """An id (surrounding blanks dropped), None when absent; `_Dead` when it breaks the rule."""
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    problem = id_problem(value) if max_chars is None else id_problem(value, max_chars)
    if problem is not None:
        raise _Dead(f"invalid_id: {name} {problem}; starts {prefix(value)}")
    return value


def _type(value: object) -> str | None:
    return _id(value, "event type", MAX_TYPE_CHARS)


def _invalid_id(value: object) -> str:
    # The stored key of a delivery whose own id cannot be stored: a hash of that id, so that
    # Hatched's retries of it still answer `duplicate`.
    raw = value if isinstance(value, str) else repr(value)
    digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()
    return "invalid-id:sha256:" + digest


def _time(value: object, name: str) -> datetime | None:
    """An ISO 8601 time as UTC; None when absent or unreadable (the next source of the order
    key is used, as before); `_Dead` when it reads as a time outside MIN_TIME..MAX_TIME."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    try:
        utc = as_utc(parsed)
    except OverflowError:
        # A valid local time whose UTC instant falls outside year 1..9999.
        utc = None
    if utc is None or not MIN_TIME <= utc < MAX_TIME:
        raise _Dead(f"time_out_of_range: {name} starts {prefix(value)}")
    return utc


def _deeper_than(doc: object, limit: int) -> bool:
    """Whether `doc` nests objects and arrays more than `limit` levels (iteratively)."""
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
