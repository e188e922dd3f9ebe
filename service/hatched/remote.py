"""Hatched's REST payloads mapped to mirror state: pure, no HTTP client."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from service.apply.projector import Profile
from service.coerce import any_time, integer, snake_deep, snake_keys

if TYPE_CHECKING:
    pass


# --- the buddy as the REST API returns it ---------------------------------------------------


def _number(value: Any) -> int | float | None:
    """Skill values may be fractional; keep them exact rather than dropping them."""
    as_int = integer(value)
    if as_int is not None:
        return as_int
    if isinstance(value, float) and value == value:
        return value
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _iso(value: Any) -> str | None:
    """Badge times as the projector writes them (UTC, `Z`); unreadable strings kept as sent."""
    parsed = any_time(value)
    if parsed is None:
        return value if isinstance(value, str) and value else None
    return parsed.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _first(obj: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = obj.get(key)
        if value is not None:
            return value
    return None


def _entries(value: Any, key_fields: tuple[str, ...]) -> list[tuple[str, Any]]:
    """A keyed collection as (key, entry) pairs, from `{key: entry}` or `[{<key field>: ..}]`."""
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    out: list[tuple[str, Any]] = []
    if isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping):
                entry = snake_keys(item)
                key = _text(_first(entry, *key_fields))
                if key is not None:
                    out.append((key, entry))
            elif (key := _text(item)) is not None:
                out.append((key, None))
    return out


def _tokens(value: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, entry in _entries(value, ("token_type", "token_key", "key", "type", "id")):
        amount = integer(entry)
        if amount is None and isinstance(entry, Mapping):
            amount = integer(_first(snake_keys(entry), "balance", "amount", "value", "count"))
        if amount is not None:
            out[key] = amount
    return out


def _skills(value: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, entry in _entries(value, ("skill_key", "key", "id")):
        if isinstance(entry, Mapping):
            entry = snake_keys(entry)
            out[key] = {"value": _number(entry.get("value")), "level": integer(entry.get("level"))}
        else:
            out[key] = {"value": _number(entry), "level": None}
    return out


def _badges(value: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, entry in _entries(value, ("badge_id", "id", "key")):
        status, awarded_at = "awarded", None
        if isinstance(entry, Mapping):
            entry = snake_keys(entry)
            status = _text(entry.get("status")) or "awarded"
            awarded_at = _iso(entry.get("awarded_at"))
        elif isinstance(entry, str):
            awarded_at = _iso(entry)
        elif entry is False:
            continue
        out[key] = {"status": status, "awarded_at": awarded_at if status == "awarded" else None}
    return out


def _streaks(value: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, entry in _entries(value, ("streak_key", "key", "id")):
        if isinstance(entry, Mapping):
            entry = snake_keys(entry)
            milestone = _first(entry, "last_milestone", "milestone")
            out[key] = {"count": integer(entry.get("count")), "last_milestone": integer(milestone)}
        else:
            out[key] = {"count": integer(entry), "last_milestone": None}
    return out


def _item_ids(value: Any) -> list[str] | None:
    if not isinstance(value, list):
        return None
    ids: set[str] = set()
    for item in value:
        if isinstance(item, Mapping):
            item_id = _text(_first(snake_keys(item), "item_id", "id"))
        else:
            item_id = _text(item)
        if item_id is not None:
            ids.add(item_id)
    return sorted(ids)


def _unwrap(obj: Any) -> Any:
    """The object itself when it came under `data` (or `buddy`) rather than bare."""
    if isinstance(obj, Mapping) and not any(k in obj for k in ("buddy_id", "buddyId", "id")):
        for key in ("data", "buddy"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return inner
    return obj


@dataclass
class RemoteBuddy(Profile):
    """A buddy as Hatched's REST API reports it, mapped onto the mirror's vocabulary.

    Maps use the projector's shapes (skills `{value, level}`, badges `{status, awarded_at}`,
    streaks `{count, last_milestone}`), so a refresh can be compared with mirrored state directly.
    `owned_item_ids` is None when the response says nothing about ownership (only equipped items
    are in the documented shape); `raw` is the buddy object exactly as received.
    """

    equipped_item_ids: list[str] = field(default_factory=list)
    owned_item_ids: list[str] | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any) -> RemoteBuddy:
        """Map a buddy object, bare or under `data`, snake_case or camelCase.

        Raises ValueError when it is not an object or carries no buddy id.
        """
        obj = _unwrap(obj)
        if not isinstance(obj, Mapping):
            raise ValueError(f"a buddy must be a JSON object, not {type(obj).__name__}")
        src = snake_keys(obj)
        buddy_id = _text(_first(src, "buddy_id", "id"))
        if buddy_id is None:
            raise ValueError("buddy object without a buddy id")

        image = src.get("image")
        image = snake_keys(image) if isinstance(image, Mapping) else {}
        items = src.get("items")
        items = snake_keys(items) if isinstance(items, Mapping) else {}
        coins = src.get("coins")
        if isinstance(coins, Mapping):
            coins = snake_keys(coins).get("balance")
        stage = _first(src, "evolution_stage", "stage")
        if stage is None:
            stage = image.get("stage")
        equipped = _first(src, "equipped_item_ids", "equipped_items")
        if equipped is None:
            equipped = items.get("equipped")
        owned = _first(src, "owned_item_ids", "owned_items")
        if owned is None:
            owned = items.get("owned")
        appearance = src.get("appearance")
        progression = src.get("progression")
        return cls(
            buddy_id=buddy_id,
            user_id=_text(src.get("user_id")),
            audience=_text(src.get("audience")),
            egg_id=_text(src.get("egg_id")),
            name=_text(src.get("name")),
            status=_text(src.get("status")),
            config_version_id=_text(src.get("config_version_id")),
            evolution_stage=integer(stage),
            image_url=_text(_first(src, "image_url") or image.get("url")),
            thumb_url=_text(
                _first(src, "thumb_url", "thumbnail_url") or _first(image, "thumb_url")
            ),
            base_image_url=_text(src.get("base_image_url")),
            coins=integer(coins),
            tokens=_tokens(src.get("tokens")),
            skills=_skills(src.get("skills")),
            badges=_badges(src.get("badges")),
            streaks=_streaks(src.get("streaks")),
            equipped_item_ids=_item_ids(equipped) or [],
            owned_item_ids=_item_ids(owned),
            # Appearance has a fixed vocabulary; progression is opaque, so it stays as sent.
            appearance=snake_deep(appearance) if isinstance(appearance, Mapping) else None,
            progression=dict(progression) if isinstance(progression, Mapping) else None,
            created_at=any_time(_first(src, "created_at", "hatched_at")),
            updated_at=any_time(src.get("updated_at")),
            raw=dict(obj),
        )


def next_cursor(body: Any, sent: str | None = None) -> str | None:
    """The cursor of the next page, wherever this response keeps it; None on the last page."""
    if not isinstance(body, Mapping):
        return None
    meta = body.get("meta")
    meta = snake_keys(meta) if isinstance(meta, Mapping) else {}
    if meta.get("has_more") is False:
        return None
    found = _first(meta, "next_cursor", "cursor", "next")
    if found is None:
        found = _first(snake_keys(body), "next_cursor")
    cursor = _text(found)
    # An API that echoes the cursor it was sent would otherwise loop a backfill forever.
    return None if cursor is None or cursor == sent else cursor


def _object(body: Any) -> dict[str, Any]:
    """A bootstrap answer: unwrapped from `data`, top-level keys in snake_case."""
    if isinstance(body, Mapping):
        inner = body.get("data")
        if isinstance(inner, Mapping) and len(body.keys() - {"data", "meta"}) == 0:
            body = inner
        return snake_keys(body)
    return {}
