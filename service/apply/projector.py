"""Pure state transitions: (buddy state, events) -> new buddy state and ledger entries.

Live apply, replay and rebuild all call `project`, so they cannot disagree. Every mirrored field
remembers the order key of the event that last set it (`Buddy.clock`) and an event only
overwrites a field when its key is newer, so any arrival order of the same events converges.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from service.coerce import integer, text
from service.ingest.events import Event

# (occurred_at in epoch microseconds, inbox seq): the seq breaks ties by receipt order.
Key = tuple[int, int]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BADGE_RANK = {"ready": 1, "awarded": 2}


def order_key(event: Event, seq: int) -> Key:
    return ((event.occurred_at - _EPOCH) // timedelta(microseconds=1), seq)


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Profile:
    """What Hatched says about a buddy, in the mirror's vocabulary: shared by the mirrored state
    (`Buddy`) and a REST snapshot (`service.hatched.remote.RemoteBuddy`)."""

    buddy_id: str
    user_id: str | None = None
    audience: str | None = None
    egg_id: str | None = None
    name: str | None = None
    status: str | None = None
    config_version_id: str | None = None
    evolution_stage: int | None = None
    image_url: str | None = None
    thumb_url: str | None = None
    base_image_url: str | None = None
    coins: int | None = None
    tokens: dict[str, int] = field(default_factory=dict)
    skills: dict[str, dict[str, Any]] = field(default_factory=dict)
    badges: dict[str, dict[str, Any]] = field(default_factory=dict)
    streaks: dict[str, dict[str, Any]] = field(default_factory=dict)
    appearance: dict[str, Any] | None = None
    progression: dict[str, Any] | None = None


@dataclass
class Buddy(Profile):
    """The mirrored state of one buddy: the `buddies` row, column for column."""

    items_owned: list[str] = field(default_factory=list)
    items_equipped: list[str] = field(default_factory=list)
    hatched_at: datetime | None = None
    last_event_at: datetime | None = None
    refreshed_at: datetime | None = None
    # The buddy object as Hatched's REST API last returned it (unknown fields included).
    remote_snapshot: dict[str, Any] | None = None
    # Internal bookkeeping: order keys per field, pending token deltas. Never served.
    clock: dict[str, Any] = field(default_factory=dict)


STATE_FIELDS = tuple(f.name for f in fields(Buddy))
# The snapshot is kept for reference; only what it maps to is mirrored state.
_MIRRORED = tuple(name for name in STATE_FIELDS if name not in ("clock", "remote_snapshot"))


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    delivery_id: str
    seq: int
    buddy_id: str
    currency: str
    amount: int
    balance_after: int | None
    reason: str | None
    reference_id: str | None
    ledger_id: str | None
    is_lucky: bool | None
    occurred_at: datetime


@dataclass
class Outcome:
    buddy: Buddy
    ledger: list[LedgerEntry] = field(default_factory=list)
    # Rule 5: a balance that does not follow from the previous one means a missed or
    # reordered event; the worker counts these and may schedule a REST refresh.
    inconsistencies: int = 0
    # Names of public fields a REST refresh corrected: how far webhooks alone had drifted.
    drift: list[str] = field(default_factory=list)


def project(state: Buddy | None, buddy_id: str, events: Iterable[tuple[int, Event]]) -> Outcome:
    """Apply `(seq, event)` pairs to a copy of `state` (None: a buddy seen for the first time)."""
    buddy = _copy(state) if state is not None else Buddy(buddy_id=buddy_id)
    outcome = Outcome(buddy=buddy)
    for seq, event in events:
        _apply(outcome, event, seq)
    return outcome


def _copy(state: Buddy) -> Buddy:
    """A copy `project` may change without touching `state`.

    Cheaper than a deep copy (this runs once per buddy per batch): every map and list of the
    state is replaced, never changed in place, by the rules below; only `clock` is changed in
    place, one level deep for the balance entries (`cur:*`), so that is what gets copied.
    """
    clock = {k: (dict(v) if k.startswith("cur:") else v) for k, v in state.clock.items()}
    # The attributes copied as they are, without dataclasses.replace: that calls __init__ with
    # every field by keyword, a tenth of the apply path's Python time per buddy.
    copy = object.__new__(Buddy)
    copy.__dict__.update(vars(state))
    copy.clock = clock
    return copy


def public_view(buddy: Buddy, version: int, updated_at: datetime) -> dict[str, Any]:
    """The buddy object of the contract: sorted lists, null for unknown, {} for empty maps."""
    return {
        "buddy_id": buddy.buddy_id,
        "user_id": buddy.user_id,
        "audience": buddy.audience,
        "egg_id": buddy.egg_id,
        "name": buddy.name,
        "status": buddy.status,
        "config_version_id": buddy.config_version_id,
        "evolution_stage": buddy.evolution_stage,
        "image_url": buddy.image_url,
        "thumb_url": buddy.thumb_url,
        "base_image_url": buddy.base_image_url,
        "coins": buddy.coins,
        "tokens": dict(sorted(buddy.tokens.items())),
        "skills": dict(sorted(buddy.skills.items())),
        "badges": dict(sorted(buddy.badges.items())),
        "streaks": dict(sorted(buddy.streaks.items())),
        "items": {"owned": sorted(buddy.items_owned), "equipped": sorted(buddy.items_equipped)},
        "appearance": buddy.appearance,
        "progression": buddy.progression,
        "hatched_at": _iso_or_none(buddy.hatched_at),
        "last_event_at": _iso_or_none(buddy.last_event_at),
        "refreshed_at": _iso_or_none(buddy.refreshed_at),
        "updated_at": iso(updated_at),
        "version": version,
    }


def mirrored(buddy: Buddy) -> tuple[Any, ...]:
    """What a reader can see; the version grows only when this changes."""
    return tuple(getattr(buddy, name) for name in _MIRRORED)


def _iso_or_none(dt: datetime | None) -> str | None:
    return iso(dt) if dt is not None else None


# --- per-event effects ---------------------------------------------------------------------


def _newer(buddy: Buddy, path: str, key: Key) -> bool:
    """Last-writer-wins gate for one field: claims it for `key` when `key` is newer."""
    current = buddy.clock.get(path)
    if current is not None and tuple(current) >= key:
        return False
    buddy.clock[path] = list(key)
    return True


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _apply(outcome: Outcome, event: Event, seq: int) -> None:
    buddy = outcome.buddy
    key = order_key(event, seq)
    data = event.data
    kind = event.type

    if buddy.last_event_at is None or event.occurred_at > buddy.last_event_at:
        buddy.last_event_at = event.occurred_at
    # Any event may carry the owner; the hatch is just the usual one.
    user_id = text(data.get("user_id"))
    if user_id is not None and _newer(buddy, "user_id", key):
        buddy.user_id = user_id

    if kind == "buddy.hatched":
        _hatched(buddy, event, key)
    elif kind == "buddy.evolved":
        stage = integer(data.get("new_stage"))
        if stage is None:
            stage = integer(data.get("evolution_stage"))
        _stage(buddy, stage, text(data.get("image_url")), key)
    elif kind in ("coins.earned", "coins.spent", "token.earned", "token.spent"):
        _currency(outcome, event, seq, key)
    elif kind == "skill.leveled":
        _skill(
            buddy, data, key, level=integer(data.get("to_level")), value=integer(data.get("value"))
        )
    elif kind == "skill.decayed":
        level = integer(data.get("new_level", data.get("level")))
        _skill(buddy, data, key, level=level, value=integer(data.get("new_value")))
    elif kind in ("badge.ready", "badge.awarded"):
        _badge(buddy, event, key)
    elif kind.startswith("streak."):
        _streak(buddy, event, key)
    elif kind.startswith("marketplace."):
        _item(buddy, event, key)
    elif kind == "buddy.refreshed":
        _refreshed(outcome, event, key)


def _hatched(buddy: Buddy, event: Event, key: Key) -> None:
    data = event.data
    for name in ("egg_id", "name", "audience", "config_version_id", "thumb_url"):
        value = text(data.get(name))
        if value is not None and _newer(buddy, name, key):
            setattr(buddy, name, value)
    if _newer(buddy, "hatched_at", key):
        buddy.hatched_at = event.occurred_at
    if _newer(buddy, "status", key):
        buddy.status = "active"
    stage = integer(data.get("evolution_stage"))
    _stage(buddy, stage if stage is not None else 1, text(data.get("image_url")), key)


def _stage(buddy: Buddy, stage: int | None, image_url: str | None, key: Key) -> None:
    if stage is None:
        return
    if buddy.evolution_stage is None or stage > buddy.evolution_stage:
        buddy.evolution_stage = stage
    # The image follows the event with the highest stage, then the newest one.
    rank = [stage, *key]
    current = buddy.clock.get("image")
    if image_url is not None and (current is None or rank > current):
        buddy.clock["image"] = rank
        buddy.image_url = image_url


def _currency(outcome: Outcome, event: Event, seq: int, key: Key) -> None:
    buddy, data = outcome.buddy, event.data
    is_coins = event.type.startswith("coins.")
    currency = "coins" if is_coins else text(data.get("token_type"))
    amount = integer(data.get("amount"))
    if currency is None or amount is None:
        return
    signed = -abs(amount) if event.type.endswith(".spent") else abs(amount)
    balance = integer(data.get("balance"))
    outcome.ledger.append(
        LedgerEntry(
            delivery_id=event.delivery_id,
            seq=seq,
            buddy_id=buddy.buddy_id,
            currency=currency,
            amount=signed,
            balance_after=balance,
            reason=text(data.get("reason")),
            reference_id=text(data.get("reference_id")),
            ledger_id=text(data.get("ledger_id")),
            is_lucky=data.get("is_lucky") if isinstance(data.get("is_lucky"), bool) else None,
            occurred_at=event.occurred_at,
        )
    )
    outcome.inconsistencies += _move(buddy, currency, key, balance=balance, signed=signed)


def _move(
    buddy: Buddy, currency: str, key: Key, *, balance: int | None, signed: int | None
) -> bool:
    """Set or move one balance under last-writer-wins; True when it broke rule 5's check."""
    slot = f"cur:{currency}"
    entry = buddy.clock.get(slot)
    previous = _balance(entry) if entry is not None else None
    inconsistent = False
    if balance is not None:
        base_key = entry["k"] if entry is not None else None
        if base_key is not None and tuple(base_key) >= key:
            return False
        inconsistent = (
            signed is not None
            and previous is not None
            and base_key is not None
            and previous != balance - signed
        )
        # Deltas newer than this balance still apply on top of it; older ones are inside it.
        later = [d for d in (entry["d"] if entry else []) if (d[0], d[1]) > key]
        entry = {"k": list(key), "b": balance, "d": later}
    elif signed is not None:
        # No balance in the payload (token events may omit it): count the movement itself,
        # remembering its key so a later-arriving balance can tell what it already includes.
        entry = entry if entry is not None else {"k": None, "b": 0, "d": []}
        if entry["k"] is not None and tuple(entry["k"]) >= key:
            return False
        if any((d[0], d[1]) == key for d in entry["d"]):
            return False
        entry["d"] = sorted([*entry["d"], [key[0], key[1], signed]])
    else:
        return False
    buddy.clock[slot] = entry
    value = _balance(entry)
    if currency == "coins":
        buddy.coins = value
    else:
        buddy.tokens = {**buddy.tokens, currency: value}
    return inconsistent


def _balance(entry: dict[str, Any]) -> int:
    return int(entry["b"]) + sum(int(d[2]) for d in entry["d"])


def _skill(
    buddy: Buddy, data: dict[str, Any], key: Key, *, level: int | None, value: int | None
) -> None:
    skill_key = text(data.get("skill_key"))
    if skill_key is None:
        return
    skill = dict(buddy.skills.get(skill_key, {"value": None, "level": None}))
    if value is not None and _newer(buddy, f"skill:{skill_key}:value", key):
        skill["value"] = value
    if level is not None and _newer(buddy, f"skill:{skill_key}:level", key):
        skill["level"] = level
    buddy.skills = {**buddy.skills, skill_key: skill}


def _badge(buddy: Buddy, event: Event, key: Key) -> None:
    badge_id = text(event.data.get("badge_id"))
    if badge_id is None:
        return
    status = "awarded" if event.type == "badge.awarded" else "ready"
    # `awarded` beats `ready` whatever the order; within one status the newest wins.
    rank = [_BADGE_RANK[status], *key]
    current = buddy.clock.get(f"badge:{badge_id}")
    if current is not None and current >= rank:
        return
    buddy.clock[f"badge:{badge_id}"] = rank
    awarded_at = None
    if status == "awarded":
        awarded_at = iso(_parse_time(event.data.get("awarded_at")) or event.occurred_at)
    buddy.badges = {**buddy.badges, badge_id: {"status": status, "awarded_at": awarded_at}}


def _streak(buddy: Buddy, event: Event, key: Key) -> None:
    data = event.data
    streak_key = text(data.get("streak_key"))
    if streak_key is None:
        return
    streak = dict(buddy.streaks.get(streak_key, {"count": None, "last_milestone": None}))
    count = integer(data.get("count"))
    if event.type == "streak.burned" and count is None:
        count = 0
    if count is not None and _newer(buddy, f"streak:{streak_key}:count", key):
        streak["count"] = count
    if event.type == "streak.milestone":
        milestone = integer(data.get("milestone"))
        milestone = milestone if milestone is not None else count
        if milestone is not None and _newer(buddy, f"streak:{streak_key}:milestone", key):
            streak["last_milestone"] = milestone
    buddy.streaks = {**buddy.streaks, streak_key: streak}


def _item(buddy: Buddy, event: Event, key: Key) -> None:
    item_id = text(event.data.get("item_id"))
    if item_id is None:
        return
    # Ownership only grows through webhooks; a REST refresh is the way to drop items.
    owns = event.type in ("marketplace.purchased", "marketplace.equipped")
    if owns and item_id not in buddy.items_owned:
        buddy.items_owned = sorted([*buddy.items_owned, item_id])
    if event.type == "marketplace.purchased":
        return
    equipped = event.type == "marketplace.equipped"
    if _newer(buddy, f"equip:{item_id}", key):
        others = [i for i in buddy.items_equipped if i != item_id]
        buddy.items_equipped = sorted([*others, item_id] if equipped else others)


_SNAPSHOT_TEXT = (
    "audience",
    "egg_id",
    "name",
    "status",
    "config_version_id",
    "thumb_url",
    "base_image_url",
)


def _refreshed(outcome: Outcome, event: Event, key: Key) -> None:
    """An authoritative snapshot from Hatched's REST API, fetched at `occurred_at`.

    Every field it carries wins over anything older than the fetch; events that happened after
    it still apply on top. Badges and owned items it omits are kept: the documented shape lists
    awarded badges and equipped items only.
    """
    buddy, data = outcome.buddy, event.data
    before = {name: getattr(buddy, name) for name in _MIRRORED}
    for name in _SNAPSHOT_TEXT:
        value = text(data.get(name))
        if value is not None and _newer(buddy, name, key):
            setattr(buddy, name, value)
    _stage(buddy, integer(data.get("evolution_stage")), text(data.get("image_url")), key)
    if (coins := integer(data.get("coins"))) is not None:
        _move(buddy, "coins", key, balance=coins, signed=None)
    for token, balance in (data.get("tokens") or {}).items():
        if (amount := integer(balance)) is not None:
            _move(buddy, str(token), key, balance=amount, signed=None)
    for skill_key, skill in (data.get("skills") or {}).items():
        _skill(
            buddy,
            {"skill_key": skill_key},
            key,
            level=integer(skill.get("level")),
            value=integer(skill.get("value")),
        )
    for badge_id, badge in (data.get("badges") or {}).items():
        rank = [_BADGE_RANK.get(badge.get("status"), 2), *key]
        current = buddy.clock.get(f"badge:{badge_id}")
        if current is None or rank > current:
            buddy.clock[f"badge:{badge_id}"] = rank
            status = "ready" if rank[0] == 1 else "awarded"
            awarded = _parse_time(badge.get("awarded_at")) if status == "awarded" else None
            awarded_at = iso(awarded or event.occurred_at) if status == "awarded" else None
            buddy.badges = {**buddy.badges, badge_id: {"status": status, "awarded_at": awarded_at}}
    for streak_key, streak in (data.get("streaks") or {}).items():
        current_streak = dict(
            buddy.streaks.get(streak_key, {"count": None, "last_milestone": None})
        )
        if (count := integer(streak.get("count"))) is not None and _newer(
            buddy, f"streak:{streak_key}:count", key
        ):
            current_streak["count"] = count
        milestone = integer(streak.get("last_milestone"))
        if milestone is not None and _newer(buddy, f"streak:{streak_key}:milestone", key):
            current_streak["last_milestone"] = milestone
        buddy.streaks = {**buddy.streaks, streak_key: current_streak}
    equipped = {str(i) for i in data.get("equipped_item_ids") or ()}
    for item in sorted(equipped | set(buddy.items_equipped)):
        if _newer(buddy, f"equip:{item}", key):
            others = [i for i in buddy.items_equipped if i != item]
            buddy.items_equipped = sorted([*others, item] if item in equipped else others)
    owned = data.get("owned_item_ids")
    if owned is not None and _newer(buddy, "items_owned", key):
        buddy.items_owned = sorted({str(i) for i in owned} | equipped)
    elif equipped - set(buddy.items_owned):
        buddy.items_owned = sorted(set(buddy.items_owned) | equipped)
    for name in ("appearance", "progression"):
        block = data.get(name)
        if isinstance(block, dict) and _newer(buddy, name, key):
            setattr(buddy, name, block)
    created = data.get("created_at")
    if buddy.hatched_at is None and isinstance(created, datetime):
        buddy.hatched_at = created
    if buddy.refreshed_at is None or event.occurred_at > buddy.refreshed_at:
        buddy.refreshed_at = event.occurred_at
    raw = data.get("raw")
    if isinstance(raw, dict) and _newer(buddy, "remote_snapshot", key):
        buddy.remote_snapshot = raw
    outcome.drift.extend(
        name
        for name in _MIRRORED
        if name not in ("refreshed_at", "hatched_at") and getattr(buddy, name) != before[name]
    )
