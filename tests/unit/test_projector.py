"""The pure projector against section 2 (rules 3-5) of hatched-webhooks.md.

Example tests pin each event type's effect and the last-writer-wins gates; property tests check
that any arrival order, duplicates and chunking of the same events converge on the same state.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.apply.projector import Buddy, Outcome, iso, mirrored, order_key, project, public_view
from service.dev.samples import build_delivery
from service.ingest.events import KNOWN_TYPES, Event, Format, parse_delivery

BUDDY = "buddy_01HXA7Q2M9K3"
SECRET = "whsec_unit_projector"
T0 = datetime(2026, 4, 22, 10, 30, tzinfo=UTC)
CDN = f"https://cdn.hatched.live/buddies/{BUDDY}"
FORMATS: list[Format] = ["v1", "v2"]

_delivery_ids = itertools.count(1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ev(event_type: str, when: datetime, data: dict[str, Any] | None = None) -> Event:
    """An already normalised event (snake_case `data`), as `parse_delivery` would produce."""
    return Event(
        delivery_id=f"dlv-{next(_delivery_ids)}",
        event_id=None,
        type=event_type,
        buddy_id=BUDDY,
        occurred_at=when,
        signed_at=when,
        data={"buddy_id": BUDDY, **(data or {})},
    )


def delivered(
    event_type: str, fmt: Format, when: datetime, data: dict[str, Any] | None = None
) -> Event:
    """A realistic event: a signed sample delivery run through `parse_delivery`."""
    headers, body = build_delivery(
        event_type,
        fmt,
        secret=SECRET,
        buddy_id=BUDDY,
        timestamp=int(when.timestamp()),
        occurred_at=when,
        data=data,
    )
    parsed = parse_delivery(body, {k.lower(): v for k, v in headers.items()}, fmt, when)
    assert parsed.status == "accepted"
    assert parsed.event is not None
    return parsed.event


def run(*events: Event, state: Buddy | None = None) -> Outcome:
    """Project events in the given arrival order, seq = arrival position."""
    return project(state, BUDDY, list(enumerate(events, start=1)))


# --- 1. per-event effects --------------------------------------------------------------------


def test_no_events_creates_an_empty_buddy() -> None:
    outcome = project(None, BUDDY, [])
    assert outcome.buddy == Buddy(buddy_id=BUDDY)
    assert outcome.ledger == []
    assert outcome.inconsistencies == 0


def test_buddy_is_created_on_first_sight_before_its_hatch() -> None:
    buddy = run(ev("coins.earned", at(0), {"amount": 5, "balance": 5})).buddy
    assert buddy.buddy_id == BUDDY
    assert buddy.coins == 5
    assert buddy.status is None
    assert buddy.hatched_at is None
    assert buddy.evolution_stage is None


def test_hatched_v2_sets_identity_images_stage_status_and_hatched_at() -> None:
    buddy = run(delivered("buddy.hatched", "v2", at(0))).buddy
    assert buddy.user_id == "user_42"
    assert buddy.egg_id == "egg_01HXA7P0ZC1D"
    assert buddy.name == "Pip"
    assert buddy.image_url == f"{CDN}/stage1.png"
    assert buddy.thumb_url == f"{CDN}/stage1_thumb.png"
    assert buddy.evolution_stage == 1
    assert buddy.status == "active"
    assert buddy.hatched_at == at(0)
    assert buddy.last_event_at == at(0)
    assert buddy.audience is None
    assert buddy.config_version_id is None


def test_hatched_v1_sets_config_version_and_image_from_the_nested_image() -> None:
    buddy = run(delivered("buddy.hatched", "v1", at(0))).buddy
    assert buddy.user_id == "user_42"
    assert buddy.config_version_id == "cfg_v12"
    assert buddy.image_url == f"{CDN}/stage1.png"
    assert buddy.evolution_stage == 1
    assert buddy.status == "active"
    assert buddy.hatched_at == at(0)


def test_hatched_takes_audience_and_config_version_when_present() -> None:
    event = delivered(
        "buddy.hatched", "v2", at(0), {"audience": "kids", "config_version_id": "cfg_v7"}
    )
    buddy = run(event).buddy
    assert buddy.audience == "kids"
    assert buddy.config_version_id == "cfg_v7"


def test_hatched_without_stage_starts_at_stage_one() -> None:
    buddy = run(ev("buddy.hatched", at(0), {"user_id": "u1", "image_url": "img1"})).buddy
    assert buddy.evolution_stage == 1
    assert buddy.image_url == "img1"


@pytest.mark.parametrize("fmt", FORMATS)
def test_evolved_raises_stage_and_takes_its_image(fmt: Format) -> None:
    buddy = run(
        delivered("buddy.hatched", fmt, at(0)), delivered("buddy.evolved", fmt, at(60))
    ).buddy
    assert buddy.evolution_stage == 2
    assert buddy.image_url == f"{CDN}/stage2.png"
    assert buddy.last_event_at == at(60)


@pytest.mark.parametrize("order", ["in_order", "reversed"])
def test_evolved_image_follows_the_highest_stage_not_the_newest_event(order: str) -> None:
    # A late, newer-stamped event for a lower stage (e.g. a retry) must not roll the image back.
    high = ev("buddy.evolved", at(10), {"previous_stage": 2, "new_stage": 3, "image_url": "s3"})
    low = ev("buddy.evolved", at(20), {"previous_stage": 1, "new_stage": 2, "image_url": "s2"})
    events = [high, low] if order == "in_order" else [low, high]
    buddy = run(*events).buddy
    assert buddy.evolution_stage == 3
    assert buddy.image_url == "s3"


def test_evolved_without_image_keeps_the_stored_image() -> None:
    buddy = run(
        ev("buddy.hatched", at(0), {"evolution_stage": 1, "image_url": "s1"}),
        ev("buddy.evolved", at(1), {"new_stage": 2}),
    ).buddy
    assert buddy.evolution_stage == 2
    assert buddy.image_url == "s1"


@pytest.mark.parametrize("fmt", FORMATS)
def test_coins_earned_sets_balance_and_one_positive_ledger_entry(fmt: Format) -> None:
    event = delivered("coins.earned", fmt, at(0))
    outcome = project(None, BUDDY, [(7, event)])
    assert outcome.buddy.coins == 120
    assert len(outcome.ledger) == 1
    entry = outcome.ledger[0]
    assert entry.delivery_id == event.delivery_id
    assert entry.seq == 7
    assert entry.buddy_id == BUDDY
    assert entry.currency == "coins"
    assert entry.amount == 10
    assert entry.balance_after == 120
    assert entry.reason == "lesson_completed"
    assert entry.occurred_at == at(0)
    if fmt == "v2":
        assert entry.reference_id == "ref_01HXA8B4T6W2"
        assert entry.ledger_id == "ledger_01HXA8B4V1R7"
        assert entry.is_lucky is False
    else:
        assert entry.reference_id is None
        assert entry.ledger_id is None
        assert entry.is_lucky is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_coins_spent_sets_balance_and_one_negative_ledger_entry(fmt: Format) -> None:
    outcome = run(delivered("coin.spent" if fmt == "v1" else "coins.spent", fmt, at(0)))
    assert outcome.buddy.coins == 70
    assert [(e.currency, e.amount, e.balance_after) for e in outcome.ledger] == [("coins", -50, 70)]


def test_coins_amount_sign_comes_from_the_type_not_the_payload() -> None:
    outcome = run(ev("coins.spent", at(0), {"amount": -5, "balance": 15}))
    assert outcome.ledger[0].amount == -5
    outcome = run(ev("coins.earned", at(0), {"amount": -5, "balance": 15}))
    assert outcome.ledger[0].amount == 5


def test_ledger_gets_one_entry_per_delivery() -> None:
    outcome = run(
        ev("coins.earned", at(0), {"amount": 10, "balance": 10}),
        ev("coins.earned", at(1), {"amount": 5, "balance": 15}),
        ev("coins.spent", at(2), {"amount": 3, "balance": 12}),
    )
    assert [e.amount for e in outcome.ledger] == [10, 5, -3]
    assert len({e.delivery_id for e in outcome.ledger}) == 3
    assert outcome.buddy.coins == 12


@pytest.mark.parametrize("fmt", FORMATS)
def test_token_events_with_balance_set_the_balance(fmt: Format) -> None:
    earned = delivered("token.earned", fmt, at(0))
    spent = delivered("token.spent", fmt, at(1))
    outcome = run(earned)
    assert outcome.buddy.tokens == {"gem": 3}
    assert [(e.currency, e.amount, e.balance_after) for e in outcome.ledger] == [("gem", 1, 3)]
    outcome = run(earned, spent)
    assert outcome.buddy.tokens == {"gem": 1}
    assert [e.amount for e in outcome.ledger] == [1, -2]
    assert outcome.buddy.coins is None


def test_token_events_without_balance_add_and_subtract_the_amount() -> None:
    outcome = run(
        ev("token.earned", at(0), {"token_type": "gem", "amount": 5}),
        ev("token.earned", at(1), {"token_type": "gem", "amount": 4}),
        ev("token.spent", at(2), {"token_type": "gem", "amount": 3}),
        ev("token.earned", at(3), {"token_type": "star", "amount": 2}),
    )
    assert outcome.buddy.tokens == {"gem": 6, "star": 2}
    assert [(e.currency, e.amount, e.balance_after) for e in outcome.ledger] == [
        ("gem", 5, None),
        ("gem", 4, None),
        ("gem", -3, None),
        ("star", 2, None),
    ]


def test_token_movement_without_balance_applies_on_top_of_an_older_balance() -> None:
    balance = ev("token.earned", at(10), {"token_type": "gem", "amount": 1, "balance": 10})
    newer_move = ev("token.earned", at(20), {"token_type": "gem", "amount": 5})
    older_move = ev("token.spent", at(5), {"token_type": "gem", "amount": 4})
    # The older movement is already inside the balance; the newer one comes on top.
    for order in itertools.permutations([balance, newer_move, older_move]):
        assert run(*order).buddy.tokens == {"gem": 15}


@pytest.mark.parametrize("fmt", FORMATS)
def test_skill_leveled_sets_level_and_value(fmt: Format) -> None:
    buddy = run(delivered("skill.leveled", fmt, at(0))).buddy
    assert buddy.skills == {"pronunciation": {"level": 3, "value": 65}}


@pytest.mark.parametrize("fmt", FORMATS)
def test_skill_decayed_sets_value_and_user(fmt: Format) -> None:
    buddy = run(delivered("skill.decayed", fmt, at(0))).buddy
    assert buddy.skills == {"vocabulary": {"value": 59, "level": None}}
    assert buddy.user_id == "user_42"


def test_skill_decayed_keeps_the_level_unless_it_gives_one() -> None:
    leveled = ev("skill.leveled", at(0), {"skill_key": "k", "to_level": 3, "value": 65})
    decayed = ev("skill.decayed", at(1), {"skill_key": "k", "new_value": 59})
    assert run(leveled, decayed).buddy.skills == {"k": {"level": 3, "value": 59}}
    relevel = ev("skill.decayed", at(2), {"skill_key": "k", "new_value": 40, "new_level": 2})
    assert run(leveled, decayed, relevel).buddy.skills == {"k": {"level": 2, "value": 40}}


@pytest.mark.parametrize("fmt", FORMATS)
def test_badge_ready_has_no_awarded_at(fmt: Format) -> None:
    buddy = run(delivered("badge.ready", fmt, at(0))).buddy
    assert buddy.badges == {"badge_week_warrior": {"status": "ready", "awarded_at": None}}


@pytest.mark.parametrize("fmt", FORMATS)
def test_badge_awarded_takes_awarded_at_from_the_payload(fmt: Format) -> None:
    event = delivered("badge.awarded", fmt, at(0), {"awarded_at": "2026-04-20T08:00:00Z"})
    buddy = run(event).buddy
    assert buddy.badges == {
        "badge_week_warrior": {"status": "awarded", "awarded_at": "2026-04-20T08:00:00Z"}
    }


def test_badge_awarded_without_awarded_at_uses_occurred_at() -> None:
    when = at(90.5)
    buddy = run(ev("badge.awarded", when, {"badge_id": "b1"})).buddy
    assert buddy.badges == {"b1": {"status": "awarded", "awarded_at": iso(when)}}
    assert buddy.badges["b1"]["awarded_at"] == "2026-04-22T10:31:30.500000Z"


@pytest.mark.parametrize("ready_is_newer", [False, True])
@pytest.mark.parametrize("awarded_first", [False, True])
def test_badge_awarded_beats_ready_in_either_order(
    ready_is_newer: bool, awarded_first: bool
) -> None:
    ready = ev("badge.ready", at(20 if ready_is_newer else 0), {"badge_id": "b1"})
    awarded = ev("badge.awarded", at(10), {"badge_id": "b1"})
    events = [awarded, ready] if awarded_first else [ready, awarded]
    buddy = run(*events).buddy
    assert buddy.badges == {"b1": {"status": "awarded", "awarded_at": iso(at(10))}}


@pytest.mark.parametrize("fmt", FORMATS)
def test_streak_ticked_sets_count_without_milestone(fmt: Format) -> None:
    buddy = run(delivered("streak.ticked", fmt, at(0))).buddy
    assert buddy.streaks == {"daily_lesson": {"count": 6, "last_milestone": None}}


@pytest.mark.parametrize("fmt", FORMATS)
def test_streak_milestone_sets_count_and_last_milestone(fmt: Format) -> None:
    buddy = run(delivered("streak.milestone", fmt, at(0))).buddy
    assert buddy.streaks == {"daily_lesson": {"count": 7, "last_milestone": 7}}


def test_streak_milestone_without_milestone_field_uses_the_count() -> None:
    buddy = run(ev("streak.milestone", at(0), {"streak_key": "s", "count": 30})).buddy
    assert buddy.streaks == {"s": {"count": 30, "last_milestone": 30}}


@pytest.mark.parametrize("fmt", FORMATS)
def test_streak_burned_sets_the_payload_count(fmt: Format) -> None:
    events = [delivered("streak.milestone", fmt, at(0)), delivered("streak.burned", fmt, at(1))]
    buddy = run(*events, delivered("streak.ticked", fmt, at(2), {"count": 1})).buddy
    assert buddy.streaks == {"daily_lesson": {"count": 1, "last_milestone": 7}}
    buddy = run(*events).buddy
    assert buddy.streaks == {"daily_lesson": {"count": 0, "last_milestone": 7}}


def test_streak_burned_without_count_resets_to_zero() -> None:
    buddy = run(
        ev("streak.milestone", at(0), {"streak_key": "s", "count": 7, "milestone": 7}),
        ev("streak.burned", at(1), {"streak_key": "s"}),
    ).buddy
    assert buddy.streaks == {"s": {"count": 0, "last_milestone": 7}}


@pytest.mark.parametrize("fmt", FORMATS)
def test_marketplace_purchase_owns_without_equipping(fmt: Format) -> None:
    buddy = run(delivered("marketplace.purchased", fmt, at(0))).buddy
    assert buddy.items_owned == ["item_cowboy_hat"]
    assert buddy.items_equipped == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_marketplace_equip_owns_and_equips_and_unequip_only_unequips(fmt: Format) -> None:
    equipped = delivered("marketplace.equipped", fmt, at(0))
    buddy = run(equipped).buddy
    assert buddy.items_owned == ["item_cowboy_hat"]
    assert buddy.items_equipped == ["item_cowboy_hat"]
    buddy = run(equipped, delivered("marketplace.unequipped", fmt, at(1))).buddy
    assert buddy.items_owned == ["item_cowboy_hat"]
    assert buddy.items_equipped == []


def test_marketplace_owned_grows_and_lists_stay_sorted() -> None:
    buddy = run(
        ev("marketplace.purchased", at(0), {"item_id": "zebra"}),
        ev("marketplace.equipped", at(1), {"item_id": "hat"}),
        ev("marketplace.purchased", at(2), {"item_id": "apple"}),
        ev("marketplace.equipped", at(3), {"item_id": "apple"}),
        ev("marketplace.purchased", at(4), {"item_id": "zebra"}),
    ).buddy
    assert buddy.items_owned == ["apple", "hat", "zebra"]
    assert buddy.items_equipped == ["apple", "hat"]


def test_unequipping_an_unknown_item_does_not_own_it() -> None:
    buddy = run(ev("marketplace.unequipped", at(0), {"item_id": "hat"})).buddy
    assert buddy.items_owned == []
    assert buddy.items_equipped == []


@pytest.mark.parametrize("event_type", sorted(KNOWN_TYPES))
def test_user_id_is_taken_from_any_event_carrying_it(event_type: str) -> None:
    buddy = run(ev(event_type, at(0), {"user_id": "user_7"})).buddy
    assert buddy.user_id == "user_7"
    assert buddy.last_event_at == at(0)


def test_unknown_event_types_are_not_an_error() -> None:
    outcome = run(ev("lottery.won", at(0), {"user_id": "u1", "prize": "x"}))
    assert outcome.buddy.user_id == "u1"
    assert outcome.buddy.last_event_at == at(0)
    assert outcome.ledger == []
    expected = Buddy(buddy_id=BUDDY, user_id="u1", last_event_at=at(0))
    assert mirrored(outcome.buddy) == mirrored(expected)


def test_last_event_at_is_the_newest_occurred_at_whatever_the_order() -> None:
    buddy = run(ev("streak.ticked", at(30), {}), ev("streak.ticked", at(10), {})).buddy
    assert buddy.last_event_at == at(30)


# --- 2. last-writer-wins per field -----------------------------------------------------------

LWW_CASES: dict[str, tuple[str, dict[str, Any], str, dict[str, Any]]] = {
    "coins_balance": (
        "coins.earned",
        {"amount": 10, "balance": 110},
        "coins.spent",
        {"amount": 40, "balance": 70},
    ),
    "token_balance": (
        "token.earned",
        {"token_type": "gem", "amount": 1, "balance": 4},
        "token.spent",
        {"token_type": "gem", "amount": 2, "balance": 2},
    ),
    "skill_value": (
        "skill.leveled",
        {"skill_key": "k", "to_level": 3, "value": 65},
        "skill.decayed",
        {"skill_key": "k", "new_value": 59, "new_level": 2},
    ),
    "streak_count": (
        "streak.ticked",
        {"streak_key": "s", "count": 6},
        "streak.burned",
        {"streak_key": "s", "count": 0},
    ),
    "streak_milestone": (
        "streak.milestone",
        {"streak_key": "s", "count": 7, "milestone": 7},
        "streak.milestone",
        {"streak_key": "s", "count": 14, "milestone": 14},
    ),
    "equipped_flag": (
        "marketplace.equipped",
        {"item_id": "hat"},
        "marketplace.unequipped",
        {"item_id": "hat"},
    ),
    "unequipped_flag": (
        "marketplace.unequipped",
        {"item_id": "hat"},
        "marketplace.equipped",
        {"item_id": "hat"},
    ),
    "user_id": ("skill.decayed", {"user_id": "old"}, "streak.ticked", {"user_id": "new"}),
    "identity": (
        "buddy.hatched",
        {"name": "Old", "egg_id": "e1", "thumb_url": "t1", "audience": "a1"},
        "buddy.hatched",
        {"name": "New", "egg_id": "e2", "thumb_url": "t2", "audience": "a2"},
    ),
}


@pytest.mark.parametrize("case", sorted(LWW_CASES))
def test_an_older_event_arriving_late_does_not_overwrite(case: str) -> None:
    old_type, old_data, new_type, new_data = LWW_CASES[case]
    older = ev(old_type, at(0), old_data)
    newer = ev(new_type, at(10), new_data)
    late = run(newer, older).buddy
    in_order = run(older, newer).buddy
    assert mirrored(late) == mirrored(in_order)
    # ... and the newer event alone decides every field it sets.
    newer_only = run(newer).buddy
    for name in ("coins", "tokens", "skills", "streaks", "items_equipped", "user_id", "name"):
        if getattr(newer_only, name) not in (None, {}, []):
            assert getattr(late, name) == getattr(newer_only, name), name


def test_concrete_lww_values() -> None:
    coins_old = ev("coins.earned", at(0), {"amount": 10, "balance": 110})
    coins_new = ev("coins.spent", at(10), {"amount": 40, "balance": 70})
    assert run(coins_new, coins_old).buddy.coins == 70
    skill_old = ev("skill.leveled", at(0), {"skill_key": "k", "to_level": 3, "value": 65})
    skill_new = ev("skill.decayed", at(10), {"skill_key": "k", "new_value": 59})
    assert run(skill_new, skill_old).buddy.skills == {"k": {"level": 3, "value": 59}}
    streak_old = ev("streak.ticked", at(0), {"streak_key": "s", "count": 6})
    streak_new = ev("streak.burned", at(10), {"streak_key": "s"})
    assert run(streak_new, streak_old).buddy.streaks == {"s": {"count": 0, "last_milestone": None}}
    equip_old = ev("marketplace.equipped", at(0), {"item_id": "hat"})
    unequip_new = ev("marketplace.unequipped", at(10), {"item_id": "hat"})
    buddy = run(unequip_new, equip_old).buddy
    assert buddy.items_equipped == []
    assert buddy.items_owned == ["hat"]


@pytest.mark.parametrize("order", ["in_order", "reversed"])
def test_stage_never_goes_down(order: str) -> None:
    evolved = ev("buddy.evolved", at(0), {"new_stage": 3, "image_url": "s3"})
    # A newer hatch (e.g. a replay) still carries stage 1.
    hatched = ev("buddy.hatched", at(10), {"evolution_stage": 1, "image_url": "s1"})
    events = [evolved, hatched] if order == "in_order" else [hatched, evolved]
    buddy = run(*events).buddy
    assert buddy.evolution_stage == 3
    assert buddy.image_url == "s3"
    assert buddy.status == "active"


def test_ties_on_occurred_at_are_broken_by_seq() -> None:
    first = ev("coins.earned", at(0), {"amount": 10, "balance": 110})
    second = ev("coins.earned", at(0), {"amount": 5, "balance": 115})
    # The higher seq (received later) wins, whichever is processed first.
    assert project(None, BUDDY, [(1, first), (2, second)]).buddy.coins == 115
    assert project(None, BUDDY, [(2, second), (1, first)]).buddy.coins == 115
    assert project(None, BUDDY, [(2, first), (1, second)]).buddy.coins == 110
    assert order_key(first, 1) < order_key(second, 2)
    equip = ev("marketplace.equipped", at(0), {"item_id": "hat"})
    unequip = ev("marketplace.unequipped", at(0), {"item_id": "hat"})
    assert project(None, BUDDY, [(2, unequip), (1, equip)]).buddy.items_equipped == []
    assert project(None, BUDDY, [(1, unequip), (2, equip)]).buddy.items_equipped == ["hat"]


def test_order_key_is_microseconds_then_seq() -> None:
    event = ev("streak.ticked", datetime(1970, 1, 1, 0, 0, 1, 5, tzinfo=UTC))
    assert order_key(event, 9) == (1_000_005, 9)


# --- 3. rule 5: balance consistency ----------------------------------------------------------


def coin_run(*steps: tuple[str, int, int]) -> list[Event]:
    return [
        ev(kind, at(i), {"amount": amount, "balance": balance})
        for i, (kind, amount, balance) in enumerate(steps)
    ]


def test_in_order_coin_events_are_consistent() -> None:
    events = coin_run(("coins.earned", 10, 110), ("coins.earned", 5, 115), ("coins.spent", 20, 95))
    outcome = run(*events)
    assert outcome.inconsistencies == 0
    assert outcome.buddy.coins == 95


def test_in_order_coin_events_across_calls_are_consistent() -> None:
    first, second = coin_run(("coins.earned", 10, 110), ("coins.spent", 10, 100))
    state = run(first).buddy
    outcome = project(state, BUDDY, [(2, second)])
    assert outcome.inconsistencies == 0
    assert outcome.buddy.coins == 100


def test_a_missed_coin_event_counts_one_inconsistency() -> None:
    events = coin_run(
        ("coins.earned", 10, 110),
        ("coins.earned", 5, 115),  # never arrives
        ("coins.spent", 20, 95),
    )
    outcome = run(events[0], events[2])
    assert outcome.inconsistencies == 1
    assert outcome.buddy.coins == 95


def test_a_missed_token_event_counts_one_inconsistency() -> None:
    gem = {"token_type": "gem"}
    outcome = run(
        ev("token.earned", at(0), {**gem, "amount": 1, "balance": 1}),
        ev("token.earned", at(2), {**gem, "amount": 1, "balance": 3}),
    )
    assert outcome.inconsistencies == 1
    assert outcome.buddy.tokens == {"gem": 3}


def test_the_first_balance_seen_is_not_an_inconsistency() -> None:
    assert run(ev("coins.earned", at(0), {"amount": 10, "balance": 500})).inconsistencies == 0


# --- 4. public view --------------------------------------------------------------------------

CONTRACT_KEYS = [
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
    "tokens",
    "skills",
    "badges",
    "streaks",
    "items",
    "appearance",
    "progression",
    "hatched_at",
    "last_event_at",
    "refreshed_at",
    "updated_at",
    "version",
]


def test_public_view_of_an_empty_buddy() -> None:
    view = public_view(Buddy(buddy_id=BUDDY), 0, T0)
    assert list(view) == CONTRACT_KEYS
    assert view == {
        "buddy_id": BUDDY,
        "user_id": None,
        "audience": None,
        "egg_id": None,
        "name": None,
        "status": None,
        "config_version_id": None,
        "evolution_stage": None,
        "image_url": None,
        "thumb_url": None,
        "base_image_url": None,
        "coins": None,
        "tokens": {},
        "skills": {},
        "badges": {},
        "streaks": {},
        "items": {"owned": [], "equipped": []},
        "appearance": None,
        "progression": None,
        "hatched_at": None,
        "last_event_at": None,
        "refreshed_at": None,
        "updated_at": "2026-04-22T10:30:00Z",
        "version": 0,
    }


def test_public_view_of_the_contract_example() -> None:
    events = [
        delivered("buddy.hatched", "v1", at(0)),
        delivered("buddy.hatched", "v2", at(1)),
        delivered("buddy.evolved", "v2", at(2)),
        delivered("coins.earned", "v2", at(3)),
        delivered("token.earned", "v2", at(4)),
        delivered("skill.leveled", "v2", at(5)),
        delivered("badge.awarded", "v2", at(6), {"awarded_at": "2026-04-22T10:30:00Z"}),
        delivered("streak.milestone", "v2", at(7)),
        delivered("marketplace.equipped", "v2", at(8)),
        ev("marketplace.purchased", at(9), {"item_id": "item_a_scarf"}),
        ev("token.earned", at(10), {"token_type": "acorn", "amount": 2}),
        ev("skill.leveled", at(11), {"skill_key": "grammar", "to_level": 1, "value": 10}),
    ]
    buddy = run(*events).buddy
    view = public_view(buddy, 17, datetime(2026, 4, 22, 12, 0, tzinfo=timezone(timedelta(hours=2))))
    assert list(view) == CONTRACT_KEYS
    assert view == {
        "buddy_id": BUDDY,
        "user_id": "user_42",
        "audience": None,
        "egg_id": "egg_01HXA7P0ZC1D",
        "name": "Pip",
        "status": "active",
        "config_version_id": "cfg_v12",
        "evolution_stage": 2,
        "image_url": f"{CDN}/stage2.png",
        "thumb_url": f"{CDN}/stage1_thumb.png",
        "base_image_url": None,
        "coins": 120,
        "tokens": {"acorn": 2, "gem": 3},
        "skills": {
            "grammar": {"value": 10, "level": 1},
            "pronunciation": {"value": 65, "level": 3},
        },
        "badges": {
            "badge_week_warrior": {"status": "awarded", "awarded_at": "2026-04-22T10:30:00Z"}
        },
        "streaks": {"daily_lesson": {"count": 7, "last_milestone": 7}},
        "items": {"owned": ["item_a_scarf", "item_cowboy_hat"], "equipped": ["item_cowboy_hat"]},
        "appearance": None,
        "progression": None,
        "hatched_at": "2026-04-22T10:30:01Z",
        "last_event_at": "2026-04-22T10:30:11Z",
        "refreshed_at": None,
        "updated_at": "2026-04-22T10:00:00Z",
        "version": 17,
    }
    # Maps come out in key order, so the JSON is stable.
    assert list(view["tokens"]) == ["acorn", "gem"]
    assert list(view["skills"]) == ["grammar", "pronunciation"]
    assert orjson.loads(orjson.dumps(view)) == view


def test_public_view_sorts_lists_and_formats_every_timestamp_with_z() -> None:
    plus_two = timezone(timedelta(hours=2))
    buddy = Buddy(
        buddy_id=BUDDY,
        items_owned=["b", "a", "c"],
        items_equipped=["c", "a"],
        tokens={"z": 1, "a": 2},
        hatched_at=datetime(2026, 1, 1, 12, 0, tzinfo=plus_two),
        last_event_at=datetime(2026, 1, 1, 10, 0, 0, 250000, tzinfo=UTC),
        refreshed_at=datetime(2026, 1, 2, tzinfo=UTC),
        appearance={"status": "ready"},
        progression={"xp": 5},
    )
    view = public_view(buddy, 3, datetime(2026, 1, 3, tzinfo=UTC))
    assert view["items"] == {"owned": ["a", "b", "c"], "equipped": ["a", "c"]}
    assert list(view["tokens"]) == ["a", "z"]
    assert view["hatched_at"] == "2026-01-01T10:00:00Z"
    assert view["last_event_at"] == "2026-01-01T10:00:00.250000Z"
    assert view["refreshed_at"] == "2026-01-02T00:00:00Z"
    assert view["updated_at"] == "2026-01-03T00:00:00Z"
    assert view["appearance"] == {"status": "ready"}
    assert view["progression"] == {"xp": 5}
    assert "clock" not in view


# --- 6. deep-copy semantics ------------------------------------------------------------------


def test_project_does_not_mutate_the_state_passed_in() -> None:
    state = run(
        delivered("buddy.hatched", "v2", at(0)),
        delivered("coins.earned", "v2", at(1)),
        ev("token.earned", at(2), {"token_type": "gem", "amount": 2}),
        ev("token.earned", at(3), {"token_type": "star", "amount": 2, "balance": 2}),
        delivered("skill.leveled", "v2", at(4)),
        delivered("badge.ready", "v2", at(5)),
        delivered("streak.ticked", "v2", at(6)),
        delivered("marketplace.equipped", "v2", at(7)),
    ).buddy
    snapshot = copy.deepcopy(state)
    more = [
        delivered("buddy.evolved", "v2", at(10)),
        delivered("coins.spent", "v2", at(11)),
        ev("token.spent", at(12), {"token_type": "gem", "amount": 1}),
        ev("token.earned", at(13), {"token_type": "star", "amount": 1, "balance": 3}),
        ev("skill.decayed", at(14), {"skill_key": "pronunciation", "new_value": 1}),
        delivered("badge.awarded", "v2", at(15)),
        delivered("streak.burned", "v2", at(16)),
        delivered("marketplace.unequipped", "v2", at(17)),
        ev("marketplace.purchased", at(18), {"item_id": "other"}),
    ]
    outcome = project(state, BUDDY, list(enumerate(more, start=100)))
    assert state == snapshot
    assert outcome.buddy is not state
    assert outcome.buddy != state
    # Nothing is shared: changing the result cannot leak back into the input.
    outcome.buddy.tokens["gem"] = 999
    outcome.buddy.skills["pronunciation"]["value"] = 999
    outcome.buddy.items_owned.append("leak")
    outcome.buddy.clock["leak"] = True
    assert state == snapshot


def test_project_does_not_mutate_the_events() -> None:
    events = [
        ev("token.earned", at(0), {"token_type": "gem", "amount": 2}),
        ev("badge.awarded", at(1), {"badge_id": "b"}),
        ev("skill.leveled", at(2), {"skill_key": "k", "to_level": 1, "value": 1}),
    ]
    before = copy.deepcopy(events)
    run(*events)
    assert events == before


# --- 5. properties ---------------------------------------------------------------------------

SKILLS = ["listening", "speaking"]
STREAKS = ["daily", "weekly"]
BADGES = ["b_first", "b_week"]
ITEMS = ["hat", "scarf", "boots"]
TOKENS = ["gem", "star"]
EVENT_TYPES = sorted(KNOWN_TYPES)

small = st.integers(min_value=0, max_value=500)
amount = st.integers(min_value=1, max_value=50)
maybe_user = {"user_id": st.sampled_from(["user_1", "user_2"])}


def _data_for(event_type: str) -> st.SearchStrategy[dict[str, Any]]:
    """Payload (snake_case) for one event type; optional keys may be absent."""
    if event_type == "buddy.hatched":
        return st.fixed_dictionaries(
            {"egg_id": st.sampled_from(["egg_1", "egg_2"])},
            optional={
                **maybe_user,
                "name": st.sampled_from(["Pip", "Pop"]),
                "audience": st.sampled_from(["kids", "adults"]),
                "config_version_id": st.sampled_from(["cfg_1", "cfg_2"]),
                "image_url": st.sampled_from(["h1", "h2"]),
                "thumb_url": st.sampled_from(["t1", "t2"]),
                "evolution_stage": st.integers(min_value=1, max_value=2),
            },
        )
    if event_type == "buddy.evolved":
        return st.fixed_dictionaries(
            {"new_stage": st.integers(min_value=1, max_value=5)},
            optional={**maybe_user, "image_url": st.sampled_from(["e1", "e2", "e3"])},
        )
    if event_type.startswith("coins."):
        return st.fixed_dictionaries(
            {"amount": amount},
            optional={**maybe_user, "balance": small, "reason": st.just("r")},
        )
    if event_type.startswith("token."):
        # `balance` optional on purpose: without it the value is a running sum.
        return st.fixed_dictionaries(
            {"token_type": st.sampled_from(TOKENS), "amount": amount},
            optional={**maybe_user, "balance": small},
        )
    if event_type == "skill.leveled":
        return st.fixed_dictionaries(
            {"skill_key": st.sampled_from(SKILLS)},
            optional={
                **maybe_user,
                "to_level": st.integers(min_value=1, max_value=9),
                "value": small,
            },
        )
    if event_type == "skill.decayed":
        return st.fixed_dictionaries(
            {"skill_key": st.sampled_from(SKILLS)},
            optional={
                **maybe_user,
                "new_value": small,
                "new_level": st.integers(min_value=1, max_value=9),
            },
        )
    if event_type.startswith("badge."):
        return st.fixed_dictionaries(
            {"badge_id": st.sampled_from(BADGES)},
            optional={
                **maybe_user,
                "awarded_at": st.sampled_from(["2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"]),
            },
        )
    if event_type.startswith("streak."):
        return st.fixed_dictionaries(
            {"streak_key": st.sampled_from(STREAKS)},
            optional={
                **maybe_user,
                "count": st.integers(min_value=0, max_value=40),
                "milestone": st.sampled_from([7, 30]),
            },
        )
    if event_type.startswith("marketplace."):
        return st.fixed_dictionaries({"item_id": st.sampled_from(ITEMS)}, optional=maybe_user)
    raise AssertionError(event_type)


@st.composite
def event_sets(draw: st.DrawFn, max_size: int = 20) -> list[Event]:
    """Events for one buddy with distinct occurred_at values (so arrival order must not matter)."""
    kinds = draw(
        st.lists(st.sampled_from([*EVENT_TYPES, "lottery.won"]), min_size=1, max_size=max_size)
    )
    offsets = draw(
        st.lists(
            st.integers(min_value=0, max_value=10**9),
            min_size=len(kinds),
            max_size=len(kinds),
            unique=True,
        )
    )
    events: list[Event] = []
    for kind, offset in zip(kinds, offsets, strict=True):
        data = draw(_data_for(kind)) if kind in KNOWN_TYPES else {"user_id": "user_3"}
        events.append(ev(kind, T0 + timedelta(microseconds=offset), data))
    return events


def pairs(events: Sequence[Event]) -> list[tuple[int, Event]]:
    """seq = arrival position."""
    return list(enumerate(events, start=1))


# No example database: runs stay independent (hypothesis still caches constants in .hypothesis/).
PROPERTY = settings(max_examples=200, deadline=None, database=None)


@PROPERTY
@given(events=event_sets(), data=st.data())
def test_any_arrival_order_gives_the_same_state(events: list[Event], data: st.DataObject) -> None:
    reference = project(None, BUDDY, pairs(events))
    shuffled = data.draw(st.permutations(events))
    outcome = project(None, BUDDY, pairs(shuffled))
    assert mirrored(outcome.buddy) == mirrored(reference.buddy)
    # Every delivery still yields exactly its ledger entry, whatever the order.
    assert sorted(e.delivery_id for e in outcome.ledger) == sorted(
        e.delivery_id for e in reference.ledger
    )


@PROPERTY
@given(events=event_sets())
def test_duplicates_change_nothing(events: list[Event]) -> None:
    once = project(None, BUDDY, pairs(events))
    twice = project(None, BUDDY, pairs(events) + pairs(events))
    assert twice.buddy == once.buddy
    again = project(once.buddy, BUDDY, pairs(events))
    assert again.buddy == once.buddy
    assert again.inconsistencies == 0


@PROPERTY
@given(events=event_sets(), data=st.data())
def test_projecting_in_two_chunks_equals_projecting_at_once(
    events: list[Event], data: st.DataObject
) -> None:
    all_pairs = pairs(data.draw(st.permutations(events)))
    split = data.draw(st.integers(min_value=0, max_value=len(all_pairs)))
    whole = project(None, BUDDY, all_pairs)
    first = project(None, BUDDY, all_pairs[:split])
    before = copy.deepcopy(first.buddy)
    second = project(first.buddy, BUDDY, all_pairs[split:])
    assert first.buddy == before
    assert second.buddy == whole.buddy
    assert first.ledger + second.ledger == whole.ledger
    assert first.inconsistencies + second.inconsistencies == whole.inconsistencies


@PROPERTY
@given(events=event_sets(), data=st.data())
def test_evolution_stage_never_decreases(events: list[Event], data: st.DataObject) -> None:
    state: Buddy | None = None
    highest = 0
    for seq, event in pairs(data.draw(st.permutations(events))):
        state = project(state, BUDDY, [(seq, event)]).buddy
        stage = state.evolution_stage if state.evolution_stage is not None else 0
        assert stage >= highest
        highest = stage
    # ... and it ends at the highest stage any event carried.
    stages = [_stage_of(e) for e in events]
    expected = max((s for s in stages if s is not None), default=None)
    assert state is not None
    assert state.evolution_stage == expected


def _stage_of(event: Event) -> int | None:
    if event.type == "buddy.hatched":
        stage = event.data.get("evolution_stage", 1)
        return int(stage)
    if event.type == "buddy.evolved":
        return int(event.data["new_stage"])
    return None


@PROPERTY
@given(events=event_sets(), data=st.data())
def test_awarded_beats_ready_in_any_order(events: list[Event], data: st.DataObject) -> None:
    buddy = project(None, BUDDY, pairs(data.draw(st.permutations(events)))).buddy
    expected: dict[str, dict[str, Any]] = {}
    for badge_id in BADGES:
        mine = [e for e in events if e.type.startswith("badge.") and e.data["badge_id"] == badge_id]
        awarded = [e for e in mine if e.type == "badge.awarded"]
        if awarded:
            newest = max(awarded, key=lambda e: e.occurred_at)
            when = newest.data.get("awarded_at") or iso(newest.occurred_at)
            expected[badge_id] = {"status": "awarded", "awarded_at": when}
        elif mine:
            expected[badge_id] = {"status": "ready", "awarded_at": None}
    assert buddy.badges == expected


@PROPERTY
@given(events=event_sets(max_size=30), data=st.data())
def test_token_value_is_the_newest_balance_plus_later_movements(
    events: list[Event], data: st.DataObject
) -> None:
    buddy = project(None, BUDDY, pairs(data.draw(st.permutations(events)))).buddy
    expected: dict[str, int] = {}
    for token in TOKENS:
        mine = sorted(
            (e for e in events if e.type.startswith("token.") and e.data["token_type"] == token),
            key=lambda e: e.occurred_at,
        )
        if not mine:
            continue
        value = 0
        for event in mine:
            signed = event.data["amount"] * (-1 if event.type == "token.spent" else 1)
            value = event.data["balance"] if "balance" in event.data else value + signed
        expected[token] = value
    assert buddy.tokens == expected
