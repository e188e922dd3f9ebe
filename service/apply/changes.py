"""Change-feed entries: what became visible of a buddy, field by field (pure).

The applier already holds each buddy's state before and after a batch; the diff is taken here,
in Python, from those two objects, so the write path adds no query: the entries travel with the
batch's one statement (service/store/buddies.py, WRITE_BATCH).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from service.apply.projector import Buddy, iso

CauseKind = Literal["delivery", "refresh", "rebuild", "replay"]


def _time(value: datetime | None) -> str | None:
    return iso(value) if value is not None else None


def _sorted_map(value: dict[str, Any]) -> dict[str, Any]:
    return dict(sorted(value.items()))


def _plain(name: str) -> Callable[[Buddy], Any]:
    return lambda b: getattr(b, name)


def _mapped(name: str) -> Callable[[Buddy], Any]:
    return lambda b: _sorted_map(getattr(b, name))


def _timed(name: str) -> Callable[[Buddy], Any]:
    return lambda b: _time(getattr(b, name))


# Every top-level field of the buddy object (projector.public_view) but `updated_at` and
# `version`, which every change moves: (public name, the Buddy attributes it is made of, how
# public_view renders it). tests/unit/test_changes.py holds this to public_view.
FIELDS: tuple[tuple[str, tuple[str, ...], Callable[[Buddy], Any]], ...] = (
    *(
        (name, (name,), _plain(name))
        for name in (
            "buddy_id",
            "user_id",
            "audience",
            "egg_id",
            "name",
            "status",
            "config_version_id",
            "evolution_stage",
            "image_url",
            "thumb_url",
            "base_image_url",
            "coins",
        )
    ),
    *((name, (name,), _mapped(name)) for name in ("tokens", "skills", "badges", "streaks")),
    (
        "items",
        ("items_owned", "items_equipped"),
        lambda b: {"owned": sorted(b.items_owned), "equipped": sorted(b.items_equipped)},
    ),
    ("appearance", ("appearance",), _plain("appearance")),
    ("progression", ("progression",), _plain("progression")),
    *((name, (name,), _timed(name)) for name in ("hatched_at", "last_event_at", "refreshed_at")),
)
FIELD_NAMES = frozenset(name for name, _, _ in FIELDS)
# Moves with nearly every event: a change of it alone is not one a reader acts on, so it does
# not grow the version and makes no entry (the contract: never `last_event_at` alone).
_BOOKKEEPING = "last_event_at"


# Which public field each Buddy attribute belongs to, and how that field is rendered.
_FIELD_OF = {attr: name for name, attrs, _ in FIELDS for attr in attrs}
_RENDER = {name: render for name, _, render in FIELDS}


def diff(before: Buddy | None, after: Buddy) -> dict[str, dict[str, Any]]:
    """{field: {"from", "to"}} for every top-level field whose public value differs (`from`
    null for a new buddy); empty when only `last_event_at` moved, or nothing did.

    Runs once per changed buddy per batch on the apply path: the attributes are compared as
    they are (a dict lookup each), and only the fields that moved are rendered."""
    new_attrs = vars(after)
    if before is None:
        moved = dict.fromkeys(_RENDER)
    else:
        old_attrs = vars(before)
        # `is not` first: the projector leaves most attributes as the very object it was
        # given (of 5,000 projected deliveries, `skills` in 4,099), which `!=` would still
        # walk item by item. (The same object cannot differ from itself: the projector
        # replaces maps and lists, never changes them in place.)
        moved = {
            name: None
            for attr, name in _FIELD_OF.items()
            if (was := old_attrs[attr]) is not (now := new_attrs[attr]) and was != now
        }
        if not moved or (len(moved) == 1 and _BOOKKEEPING in moved):
            return {}
    out: dict[str, dict[str, Any]] = {}
    for name in moved:
        render = _RENDER[name]
        old = render(before) if before is not None else None
        new = render(after)
        if old != new:
            out[name] = {"from": old, "to": new}
    if len(out) == 1 and _BOOKKEEPING in out:
        return {}
    return out


def grows(before: Buddy | None, after: Buddy) -> bool:
    """`bool(diff(before, after))`, for when no entry is written (MIRROR_CHANGES_ENABLED off):
    the version must still grow exactly when a reader would see a change, but nothing needs
    building, and the first field that moved for a reader answers."""
    if before is None:
        return True
    old_attrs, new_attrs = vars(before), vars(after)
    for attr, name in _FIELD_OF.items():
        was, now = old_attrs[attr], new_attrs[attr]
        if was is not now and name != _BOOKKEEPING and was != now:
            render = _RENDER[name]
            if render(before) != render(after):
                return True
    return False


@dataclass(frozen=True, slots=True)
class Cause:
    kind: CauseKind
    delivery_id: str | None = None
    event_type: str | None = None


def entry(
    after: Buddy, version: int, cause: Cause, changed: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """A `changes` row as the batch statement reads it (jsonb_populate_recordset)."""
    return {
        "buddy_id": after.buddy_id,
        "user_id": after.user_id,
        "audience": after.audience,
        "version": version,
        "cause_kind": cause.kind,
        "delivery_id": cause.delivery_id,
        "event_type": cause.event_type,
        "changed": changed,
    }
