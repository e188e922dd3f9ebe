"""Change-feed diffs (service/apply/changes.py) against the buddy object of public_view."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from service.apply.changes import FIELD_NAMES, diff, grows
from service.apply.projector import Buddy, project, public_view
from service.ingest.events import Event
from tests.unit.test_projector import BUDDY, PROPERTY, at, ev, event_sets, pairs

NOW = datetime(2026, 12, 1, tzinfo=UTC)
# What every change moves; the entry carries the version itself.
NOT_DIFFED = {"version", "updated_at"}


def view(buddy: Buddy) -> dict[str, Any]:
    return {k: v for k, v in public_view(buddy, 1, NOW).items() if k not in NOT_DIFFED}


def test_the_fields_are_those_of_the_buddy_object() -> None:
    assert set(public_view(Buddy(buddy_id=BUDDY), 1, NOW)) - NOT_DIFFED == FIELD_NAMES


def test_a_new_buddy_changes_from_null() -> None:
    buddy = project(None, BUDDY, [(1, ev("buddy.hatched", at(0), {"name": "Pip"}))]).buddy
    changed = diff(None, buddy)
    assert changed["name"] == {"from": None, "to": "Pip"}
    assert changed["buddy_id"] == {"from": None, "to": BUDDY}
    assert changed["tokens"] == {"from": None, "to": {}}
    # Nothing is listed that stays null.
    assert "audience" not in changed and "refreshed_at" not in changed
    assert not NOT_DIFFED & set(changed)


def test_a_coin_event_changes_coins_and_last_event_at() -> None:
    before = project(None, BUDDY, [(1, ev("buddy.hatched", at(0)))]).buddy
    after = project(before, BUDDY, [(2, ev("coins.earned", at(5), {"amount": 20}))]).buddy
    changed = diff(before, after)
    assert set(changed) == {"coins", "last_event_at"}
    assert changed["last_event_at"]["to"] == "2026-04-22T10:30:05Z"


def test_last_event_at_alone_is_no_change() -> None:
    skill = {"skill_key": "grammar", "to_level": 3, "value": 40}
    before = project(None, BUDDY, [(1, ev("skill.leveled", at(0), skill))]).buddy
    # A newer event that sets what is already there.
    after = project(before, BUDDY, [(2, ev("skill.leveled", at(9), skill))]).buddy
    assert after.last_event_at != before.last_event_at
    assert diff(before, after) == {}
    assert diff(after, after) == {}
    assert not grows(before, after)


def test_list_order_alone_is_no_change() -> None:
    before = Buddy(buddy_id=BUDDY, items_owned=["a", "b"])
    assert diff(before, Buddy(buddy_id=BUDDY, items_owned=["b", "a"])) == {}
    assert not grows(before, Buddy(buddy_id=BUDDY, items_owned=["b", "a"]))


def _chunks(events: list[tuple[int, Event]], cuts: list[int]) -> list[list[tuple[int, Event]]]:
    bounds = sorted({0, len(events), *(c % (len(events) + 1) for c in cuts)})
    return [events[a:b] for a, b in itertools.pairwise(bounds)]


@PROPERTY
@given(events=event_sets(), data=st.data())
def test_diff_is_public_view_field_by_field(events: list[Event], data: st.DataObject) -> None:
    ordered = pairs(data.draw(st.permutations(events)))
    split = data.draw(st.integers(min_value=0, max_value=len(ordered)))
    before = project(None, BUDDY, ordered[:split]).buddy
    after = project(before, BUDDY, ordered[split:]).buddy
    old, new = view(before), view(after)
    expected = {k: {"from": old[k], "to": new[k]} for k in new if old[k] != new[k]}
    if set(expected) == {"last_event_at"}:
        expected = {}
    assert diff(before, after) == expected
    # With the feed off the version grows on this test alone: it must agree with the diff.
    assert grows(before, after) == bool(expected)
    assert grows(None, after)


@PROPERTY
@given(events=event_sets(), data=st.data())
def test_replaying_the_diffs_from_nothing_rebuilds_the_buddy(
    events: list[Event], data: st.DataObject
) -> None:
    """Shuffled, duplicated and cut into batches as the worker would: folding each batch's
    `changed` into an empty object gives the final buddy (`last_event_at` as of the last
    entry: it moves alone without one)."""
    stream = data.draw(st.permutations(events + data.draw(st.lists(st.sampled_from(events)))))
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=100), max_size=6))
    state: Buddy | None = None
    rebuilt: dict[str, Any] = dict.fromkeys(FIELD_NAMES)
    versions = 0
    for chunk in _chunks(pairs(stream), cuts):
        after = project(state, BUDDY, chunk).buddy
        changed = diff(state, after)
        if changed:
            versions += 1
            for name, change in changed.items():
                # (last_event_at may have moved alone in between, without an entry)
                assert name == "last_event_at" or rebuilt[name] == change["from"]
                rebuilt[name] = change["to"]
        state = after
    assert state is not None and versions >= 1
    final = view(state)
    last_seen = rebuilt.pop("last_event_at")
    assert rebuilt == {k: v for k, v in final.items() if k != "last_event_at"}
    # As times: ISO strings with and without a fraction do not sort as their instants.
    assert last_seen is not None
    assert datetime.fromisoformat(last_seen) <= datetime.fromisoformat(final["last_event_at"])
