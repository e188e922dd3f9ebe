"""Signed sample deliveries for `send-test-event`, tests and benchmarks.

Pure: no I/O. Templates are copied from the Hatched fixtures; types without a fixture in one format
are derived from the other (v1 data is the v2 payload in camelCase inside the envelope).
"""

from __future__ import annotations

import copy
import re
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from service.ingest.events import IMAGE_KEY_MAP, KNOWN_TYPES, TYPE_ALIASES, V1_KEY_MAP, Format
from service.ingest.signatures import signature_headers

DEFAULT_BUDDY_ID = "buddy_01HXA7Q2M9K3"
SAMPLE_CUSTOMER_ID = "cus_01HX9Z3W5Y7A"
_FIXTURE_TIME = "2026-04-22T10:30:00Z"
_CDN = "https://cdn.hatched.live/buddies/buddy_01HXA7Q2M9K3"

SAMPLE_TYPES: tuple[str, ...] = tuple(sorted(KNOWN_TYPES))

# v2 bodies (snake_case, no envelope). `buddy_id` is replaced per delivery.
V2_TEMPLATES: dict[str, dict[str, Any]] = {
    "buddy.hatched": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "egg_id": "egg_01HXA7P0ZC1D",
        "user_id": "user_42",
        "name": "Pip",
        "image_url": f"{_CDN}/stage1.png",
        "thumb_url": f"{_CDN}/stage1_thumb.png",
        "evolution_stage": 1,
    },
    "buddy.evolved": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "previous_stage": 1,
        "new_stage": 2,
        "image_url": f"{_CDN}/stage2.png",
    },
    "coins.earned": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "amount": 10,
        "balance": 120,
        "reason": "lesson_completed",
        "reference_id": "ref_01HXA8B4T6W2",
        "ledger_id": "ledger_01HXA8B4V1R7",
        "is_lucky": False,
    },
    "coins.spent": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "amount": 50,
        "balance": 70,
        "reason": "marketplace_purchase",
        "reference_id": "ref_01HXA9C2D8E4",
        "ledger_id": "ledger_01HXA9C2F0G1",
        "is_lucky": False,
    },
    "token.earned": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "token_type": "gem",
        "amount": 1,
        "reason": "weekly_quiz_passed",
        "balance": 3,
    },
    "token.spent": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "token_type": "gem",
        "amount": 2,
        "reason": "gate_unlock",
        "balance": 1,
    },
    "skill.leveled": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "skill_key": "pronunciation",
        "from_level": 2,
        "to_level": 3,
        "value": 65,
    },
    "skill.decayed": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "user_id": "user_42",
        "skill_key": "vocabulary",
        "previous_value": 64,
        "new_value": 59,
        "amount": 5,
        "cadence": "weekly",
    },
    "badge.ready": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "badge_id": "badge_week_warrior",
        "awarded_at": _FIXTURE_TIME,
    },
    "badge.awarded": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "badge_id": "badge_week_warrior",
        "awarded_at": _FIXTURE_TIME,
    },
    "streak.ticked": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "streak_key": "daily_lesson",
        "count": 6,
        "milestone": 7,
    },
    "streak.milestone": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "streak_key": "daily_lesson",
        "count": 7,
        "milestone": 7,
    },
    "streak.burned": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "streak_key": "daily_lesson",
        "count": 0,
        "milestone": 7,
    },
    "marketplace.purchased": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "item_id": "item_cowboy_hat",
        "price": {"type": "coin", "amount": 50},
    },
    "marketplace.equipped": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "item_id": "item_cowboy_hat",
        "price": {"type": "coin", "amount": 50},
    },
    "marketplace.unequipped": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "item_id": "item_cowboy_hat",
        "price": {"type": "coin", "amount": 50},
    },
}

# v1 envelope `data` objects, keyed by canonical type.
V1_TEMPLATES: dict[str, dict[str, Any]] = {
    "buddy.hatched": {
        "buddyId": DEFAULT_BUDDY_ID,
        "userId": "user_42",
        "configVersionId": "cfg_v12",
        "image": {"url": f"{_CDN}/stage1.png", "stage": 1},
    },
    "buddy.evolved": {
        "buddyId": DEFAULT_BUDDY_ID,
        "fromStage": 1,
        "toStage": 2,
        "image": {"url": f"{_CDN}/stage2.png", "stage": 2},
    },
    "coins.earned": {
        "buddyId": DEFAULT_BUDDY_ID,
        "amount": 10,
        "balanceAfter": 120,
        "source": {"type": "event", "eventType": "lesson_completed"},
    },
    "coins.spent": {
        "buddyId": DEFAULT_BUDDY_ID,
        "amount": 50,
        "balanceAfter": 70,
        "source": {"type": "event", "eventType": "lesson_completed"},
    },
    "token.earned": {
        "buddyId": DEFAULT_BUDDY_ID,
        "tokenKey": "gem",
        "amount": 1,
        "balanceAfter": 3,
        "source": {"type": "event", "eventType": "weekly_quiz_passed"},
    },
    "token.spent": {
        "buddyId": DEFAULT_BUDDY_ID,
        "tokenKey": "gem",
        "amount": 2,
        "balanceAfter": 1,
        "source": {"type": "event", "eventType": "weekly_quiz_passed"},
    },
    "skill.leveled": {
        "buddyId": DEFAULT_BUDDY_ID,
        "skillKey": "pronunciation",
        "fromLevel": 2,
        "toLevel": 3,
        "value": 65,
    },
    # Hatched documented this one in snake_case even inside the v1 envelope; kept as documented.
    "skill.decayed": {
        "buddy_id": DEFAULT_BUDDY_ID,
        "user_id": "user_42",
        "skill_key": "vocabulary",
        "previous_value": 64,
        "new_value": 59,
        "amount": 5,
        "cadence": "weekly",
    },
    "badge.ready": {
        "buddyId": DEFAULT_BUDDY_ID,
        "badgeId": "badge_week_warrior",
        "awardedAt": _FIXTURE_TIME,
    },
    "badge.awarded": {
        "buddyId": DEFAULT_BUDDY_ID,
        "badgeId": "badge_week_warrior",
        "awardedAt": _FIXTURE_TIME,
    },
    "streak.ticked": {
        "buddyId": DEFAULT_BUDDY_ID,
        "streakKey": "daily_lesson",
        "count": 6,
        "milestone": 7,
    },
    "streak.milestone": {
        "buddyId": DEFAULT_BUDDY_ID,
        "streakKey": "daily_lesson",
        "count": 7,
        "milestone": 7,
    },
    "streak.burned": {
        "buddyId": DEFAULT_BUDDY_ID,
        "streakKey": "daily_lesson",
        "count": 0,
        "milestone": 7,
    },
    "marketplace.purchased": {
        "buddyId": DEFAULT_BUDDY_ID,
        "itemId": "item_cowboy_hat",
        "price": {"type": "coin", "amount": 50},
    },
    "marketplace.equipped": {
        "buddyId": DEFAULT_BUDDY_ID,
        "itemId": "item_cowboy_hat",
        "price": {"type": "coin", "amount": 50},
    },
    "marketplace.unequipped": {
        "buddyId": DEFAULT_BUDDY_ID,
        "itemId": "item_cowboy_hat",
        "price": {"type": "coin", "amount": 50},
    },
}

# v1 templates whose data is snake_case on the wire, so overrides must stay snake_case too.
_V1_SNAKE_TYPES = frozenset({"skill.decayed"})

_V1_NAMES = {canonical: alias for alias, canonical in TYPE_ALIASES.items()}
_V1_INVERSE_KEY_MAP = {snake: camel for camel, snake in V1_KEY_MAP.items()}
_V1_IMAGE_KEYS = {snake: nested for nested, snake in IMAGE_KEY_MAP.items()}
_SNAKE_RE = re.compile(r"_([a-z0-9])")


def build_delivery(
    event_type: str,
    fmt: Format,
    *,
    secret: str,
    buddy_id: str = DEFAULT_BUDDY_ID,
    timestamp: int | None = None,
    delivery_id: str | None = None,
    occurred_at: datetime | None = None,
    data: Mapping[str, Any] | None = None,
) -> tuple[dict[str, str], bytes]:
    """A signed delivery as Hatched would send it: (headers, body bytes), ready to POST.

    `event_type` may be canonical (coins.earned) or an alias (coin.earned). `data` overrides or
    extends the payload, given in snake_case whatever the format. `occurred_at` defaults to the
    signing time and sets v1 `createdAt` and the badges' `awarded_at` unless overridden.
    Raises ValueError for a type outside KNOWN_TYPES.
    """
    canonical = TYPE_ALIASES.get(event_type, event_type)
    if canonical not in KNOWN_TYPES:
        raise ValueError(f"no sample for event type {event_type!r}")
    if timestamp is None:
        timestamp = int(time.time())
    when = _iso_utc(occurred_at or datetime.fromtimestamp(timestamp, UTC))
    overrides = dict(data or {})

    headers: dict[str, str] = {"Content-Type": "application/json"}
    if fmt == "v2":
        payload = copy.deepcopy(V2_TEMPLATES[canonical])
        payload["buddy_id"] = buddy_id
        if "awarded_at" in payload:
            payload["awarded_at"] = when
        payload.update(overrides)
        delivery_id = delivery_id or str(uuid.uuid4())
        body = orjson.dumps(payload)
        headers["X-Hatched-Event"] = canonical
        headers["X-Hatched-Delivery"] = delivery_id
        headers.update(signature_headers(body, secret, timestamp, "v2"))
        return headers, body

    v1_data = copy.deepcopy(V1_TEMPLATES[canonical])
    if canonical in _V1_SNAKE_TYPES:
        v1_data["buddy_id"] = buddy_id
        v1_data.update(overrides)
    else:
        v1_data["buddyId"] = buddy_id
        if "awardedAt" in v1_data:
            v1_data["awardedAt"] = when
        _apply_v1_overrides(v1_data, overrides)
    v1_name = _V1_NAMES.get(canonical, canonical)
    delivery_id = delivery_id or f"wh_{uuid.uuid4().hex}"
    envelope = {
        "deliveryId": delivery_id,
        "eventId": f"evt_{uuid.uuid4().hex}",
        "type": v1_name,
        "customerId": SAMPLE_CUSTOMER_ID,
        "createdAt": when,
        "data": v1_data,
    }
    body = orjson.dumps(envelope)
    headers.update(signature_headers(body, secret, timestamp, "v1"))
    headers["Hatched-Delivery-Id"] = delivery_id
    headers["Hatched-Event-Type"] = v1_name
    return headers, body


def _apply_v1_overrides(v1_data: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    for key, value in overrides.items():
        nested = _V1_IMAGE_KEYS.get(key)
        if nested is not None:
            image = v1_data.get("image")
            if not isinstance(image, dict):
                image = v1_data["image"] = {}
            image[nested] = value
            continue
        v1_data[_V1_INVERSE_KEY_MAP.get(key) or _camel_case(key)] = _camel_value(value)


def _camel_case(key: str) -> str:
    return _SNAKE_RE.sub(lambda m: m.group(1).upper(), key)


def _camel_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {_camel_case(k): _camel_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_camel_value(v) for v in value]
    return value


def _iso_utc(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
