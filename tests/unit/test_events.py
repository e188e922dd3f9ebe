from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from service.ingest.events import KNOWN_TYPES, TYPE_ALIASES, Format, Parsed, parse_delivery

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hatched"
FIXTURE_FILES = sorted(p.name for p in FIXTURES.glob("*.json"))
BUDDY = "buddy_01HXA7Q2M9K3"
SIGNED_AT = datetime(2026, 4, 22, 10, 30, tzinfo=UTC)
LATER = datetime(2026, 4, 22, 10, 35, 7, tzinfo=UTC)
CREATED = datetime(2026, 4, 22, 10, 30, tzinfo=UTC)

# The fields each fixture must map to (a subset of `data`), keyed by file name.
EXPECTED_DATA: dict[str, dict[str, Any]] = {
    "v1_envelope__badge.awarded.json": {
        "badge_id": "badge_week_warrior",
        "awarded_at": "2026-04-22T10:30:00Z",
    },
    "v1_envelope__badge.ready.json": {"badge_id": "badge_week_warrior"},
    "v1_envelope__buddy.evolved.json": {
        "previous_stage": 1,
        "new_stage": 2,
        "image_url": f"https://cdn.hatched.live/buddies/{BUDDY}/stage2.png",
        "evolution_stage": 2,
    },
    "v1_envelope__buddy.hatched.json": {
        "user_id": "user_42",
        "config_version_id": "cfg_v12",
        "image_url": f"https://cdn.hatched.live/buddies/{BUDDY}/stage1.png",
        "evolution_stage": 1,
    },
    "v1_envelope__coin.earned.json": {
        "amount": 10,
        "balance": 120,
        "reason": "lesson_completed",
        "source": {"type": "event", "event_type": "lesson_completed"},
    },
    "v1_envelope__coin.spent.json": {"amount": 50, "balance": 70, "reason": "lesson_completed"},
    "v1_envelope__marketplace.equipped.json": {
        "item_id": "item_cowboy_hat",
        "price": {"type": "coin", "amount": 50},
    },
    "v1_envelope__marketplace.purchased.json": {
        "item_id": "item_cowboy_hat",
        "price": {"type": "coin", "amount": 50},
    },
    "v1_envelope__skill.decayed.json": {
        "user_id": "user_42",
        "skill_key": "vocabulary",
        "previous_value": 64,
        "new_value": 59,
    },
    "v1_envelope__skill.leveled.json": {
        "skill_key": "pronunciation",
        "from_level": 2,
        "to_level": 3,
        "value": 65,
    },
    "v1_envelope__streak.burned.json": {"streak_key": "daily_lesson", "count": 0, "milestone": 7},
    "v1_envelope__streak.milestone.json": {
        "streak_key": "daily_lesson",
        "count": 7,
        "milestone": 7,
    },
    "v1_envelope__streak.ticked.json": {"streak_key": "daily_lesson", "count": 6},
    "v1_envelope__token.earned.json": {
        "token_type": "gem",
        "amount": 1,
        "balance": 3,
        "reason": "weekly_quiz_passed",
    },
    "v1_envelope__token.spent.json": {"token_type": "gem", "amount": 2, "balance": 1},
    "v2_headers__badge.awarded.json": {
        "badge_id": "badge_week_warrior",
        "awarded_at": "2026-04-22T10:30:00Z",
    },
    "v2_headers__buddy.evolved.json": {"previous_stage": 1, "new_stage": 2},
    "v2_headers__buddy.hatched.json": {
        "egg_id": "egg_01HXA7P0ZC1D",
        "user_id": "user_42",
        "name": "Pip",
        "evolution_stage": 1,
    },
    "v2_headers__coins.earned.json": {
        "amount": 10,
        "balance": 120,
        "reason": "lesson_completed",
        "ledger_id": "ledger_01HXA8B4V1R7",
        "is_lucky": False,
    },
    "v2_headers__coins.spent.json": {"amount": 50, "balance": 70, "reason": "marketplace_purchase"},
    "v2_headers__marketplace.purchased.json": {
        "item_id": "item_cowboy_hat",
        "price": {"type": "coin", "amount": 50},
    },
    "v2_headers__skill.decayed.json": {"skill_key": "vocabulary", "new_value": 59},
    "v2_headers__skill.leveled.json": {"skill_key": "pronunciation", "to_level": 3, "value": 65},
    "v2_headers__streak.milestone.json": {"streak_key": "daily_lesson", "count": 7},
    "v2_headers__token.earned.json": {"token_type": "gem", "amount": 1, "balance": 3},
    "v2_headers__token.spent.json": {"token_type": "gem", "reason": "gate_unlock", "balance": 1},
}


def load(name: str) -> dict[str, Any]:
    fixture: dict[str, Any] = json.loads((FIXTURES / name).read_text("utf-8"))
    return fixture


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def fmt_of(name: str) -> Format:
    return "v2" if name.startswith("v2_") else "v1"


def parse_fixture(name: str, signed_at: datetime = SIGNED_AT) -> Parsed:
    fixture = load(name)
    return parse_delivery(
        compact(fixture["body"]), lower(fixture["headers"]), fmt_of(name), signed_at
    )


def camel_keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        found = [k for k in value if any(c.isupper() for c in k)]
        for v in value.values():
            found.extend(camel_keys(v))
        return found
    if isinstance(value, list):
        return [k for v in value for k in camel_keys(v)]
    return []


def v2(
    body: Any, event: str | None = "coins.earned", delivery: str | None = "d-1"
) -> tuple[bytes, dict[str, str]]:
    headers = {}
    if event is not None:
        headers["x-hatched-event"] = event
    if delivery is not None:
        headers["x-hatched-delivery"] = delivery
    return (body if isinstance(body, bytes) else compact(body)), headers


def v1_envelope(data: Any, **extra: Any) -> dict[str, Any]:
    return {
        "deliveryId": "wh_1",
        "eventId": "evt_1",
        "type": "coin.earned",
        "createdAt": "2026-04-22T10:30:00Z",
        "data": data,
        **extra,
    }


def test_every_fixture_has_expectations() -> None:
    assert sorted(EXPECTED_DATA) == FIXTURE_FILES


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_parse_fixture(name: str) -> None:
    fixture = load(name)
    parsed = parse_fixture(name, signed_at=LATER)
    canonical = TYPE_ALIASES.get(fixture["event_type"], fixture["event_type"])
    assert canonical in KNOWN_TYPES
    assert parsed.status == "accepted"
    assert parsed.reason is None
    assert parsed.raw_type == fixture["event_type"]
    assert parsed.buddy_id == BUDDY
    event = parsed.event
    assert event is not None
    assert event.type == canonical
    assert event.buddy_id == BUDDY
    assert event.signed_at == LATER

    if fmt_of(name) == "v2":
        assert parsed.delivery_id == fixture["headers"]["X-Hatched-Delivery"]
        assert event.event_id is None
        # v2 carries no event time except awarded_at; the signature time stands in.
        expected_time = CREATED if "awarded_at" in fixture["body"] else LATER
    else:
        assert parsed.delivery_id == fixture["body"]["deliveryId"]
        assert event.event_id == fixture["body"]["eventId"]
        expected_time = CREATED
    assert event.delivery_id == parsed.delivery_id
    assert event.occurred_at == expected_time
    assert event.occurred_at.tzinfo is not None
    assert event.occurred_at.utcoffset() == timedelta(0)

    assert event.data["buddy_id"] == BUDDY
    assert camel_keys(event.data) == []
    for key, value in EXPECTED_DATA[name].items():
        assert event.data[key] == value, key


def test_v1_image_is_flattened() -> None:
    parsed = parse_fixture("v1_envelope__buddy.hatched.json")
    assert parsed.event is not None
    assert "image" not in parsed.event.data


def test_v2_body_is_data_unchanged() -> None:
    fixture = load("v2_headers__buddy.hatched.json")
    parsed = parse_fixture("v2_headers__buddy.hatched.json")
    assert parsed.event is not None
    assert parsed.event.data == fixture["body"]


def test_v1_and_v2_fixtures_agree_on_shared_fields() -> None:
    one = parse_fixture("v1_envelope__skill.leveled.json").event
    two = parse_fixture("v2_headers__skill.leveled.json").event
    assert one is not None and two is not None
    assert one.data == two.data


def test_generic_camel_case_and_nested() -> None:
    data = {
        "buddyId": "b1",
        "referenceId": "r1",
        "isLucky": True,
        "imageURL": "u",
        "source": {"eventType": "x", "subSource": {"someKey": 1}},
        "items": [{"itemId": "i1"}],
        "already_snake": 1,
    }
    parsed = parse_delivery(compact(v1_envelope(data)), {}, "v1", SIGNED_AT)
    assert parsed.event is not None
    assert parsed.event.data == {
        "buddy_id": "b1",
        "reference_id": "r1",
        "is_lucky": True,
        "image_url": "u",
        "source": {"event_type": "x", "sub_source": {"some_key": 1}},
        "items": [{"item_id": "i1"}],
        "already_snake": 1,
        "reason": "x",
    }


def test_v1_reason_falls_back_to_source_type_and_keeps_explicit_reason() -> None:
    data = {"buddyId": "b1", "amount": 1, "source": {"type": "admin"}}
    parsed = parse_delivery(compact(v1_envelope(data)), {}, "v1", SIGNED_AT)
    assert parsed.event is not None and parsed.event.data["reason"] == "admin"

    data = {"buddyId": "b1", "reason": "gift", "source": {"eventType": "lesson"}}
    parsed = parse_delivery(compact(v1_envelope(data)), {}, "v1", SIGNED_AT)
    assert parsed.event is not None and parsed.event.data["reason"] == "gift"


def test_v1_reason_not_derived_for_other_types() -> None:
    data = {"buddyId": "b1", "source": {"eventType": "lesson"}}
    body = compact(v1_envelope(data, type="skill.leveled"))
    parsed = parse_delivery(body, {}, "v1", SIGNED_AT)
    assert parsed.event is not None and "reason" not in parsed.event.data


def test_top_level_image_url_wins_over_nested() -> None:
    data = {"buddyId": "b1", "image": {"url": "nested", "stage": 2, "thumbUrl": "t"}}
    data["imageUrl"] = "top"
    parsed = parse_delivery(compact(v1_envelope(data, type="buddy.evolved")), {}, "v1", SIGNED_AT)
    assert parsed.event is not None
    assert parsed.event.data["image_url"] == "top"
    assert parsed.event.data["evolution_stage"] == 2
    assert parsed.event.data["image"] == {"thumb_url": "t"}


# --- dead deliveries ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_dead_not_json(fmt: Format) -> None:
    parsed = parse_delivery(b"{not json", {}, fmt, SIGNED_AT)
    assert (parsed.status, parsed.reason) == ("dead", "body_not_json")
    assert parsed.event is None and parsed.buddy_id is None
    assert parsed.delivery_id.startswith("sha256:")


@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_dead_json_array(fmt: Format) -> None:
    parsed = parse_delivery(b'[{"buddy_id":"b1"}]', {}, fmt, SIGNED_AT)
    assert (parsed.status, parsed.reason) == ("dead", "body_not_object")
    assert parsed.event is None


def test_dead_not_json_keeps_header_delivery_and_type() -> None:
    body, headers = v2(b"\xff\xfe", event="coins.earned", delivery="d-9")
    parsed = parse_delivery(body, headers, "v2", SIGNED_AT)
    assert (parsed.status, parsed.reason) == ("dead", "body_not_json")
    assert (parsed.delivery_id, parsed.raw_type) == ("d-9", "coins.earned")

    headers = {"hatched-delivery-id": "wh_9", "hatched-event-type": "coin.spent"}
    parsed = parse_delivery(b"", headers, "v1", SIGNED_AT)
    assert (parsed.status, parsed.reason) == ("dead", "body_not_json")
    assert (parsed.delivery_id, parsed.raw_type) == ("wh_9", "coin.spent")


@pytest.mark.parametrize("data", [None, [], "x", 3], ids=["null", "list", "str", "int"])
def test_dead_v1_data_not_object(data: Any) -> None:
    parsed = parse_delivery(compact(v1_envelope(data)), {}, "v1", SIGNED_AT)
    assert (parsed.status, parsed.reason) == ("dead", "data_not_object")
    assert parsed.delivery_id == "wh_1"
    assert parsed.raw_type == "coin.earned"


def test_dead_v1_data_missing() -> None:
    envelope = v1_envelope({})
    del envelope["data"]
    parsed = parse_delivery(compact(envelope), {}, "v1", SIGNED_AT)
    assert (parsed.status, parsed.reason) == ("dead", "data_not_object")


@pytest.mark.parametrize("buddy", [None, "", "  ", 42], ids=["absent", "empty", "blank", "int"])
@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_dead_no_buddy_id(fmt: Format, buddy: Any) -> None:
    payload: dict[str, Any] = {"amount": 1}
    if buddy is not None:
        payload["buddy_id" if fmt == "v2" else "buddyId"] = buddy
    if fmt == "v2":
        body, headers = v2(payload)
    else:
        body, headers = compact(v1_envelope(payload)), {}
    parsed = parse_delivery(body, headers, fmt, SIGNED_AT)
    assert (parsed.status, parsed.reason) == ("dead", "no_buddy_id")
    assert parsed.event is None and parsed.buddy_id is None


def test_dead_no_event_type() -> None:
    body, headers = v2({"buddy_id": "b1"}, event=None)
    parsed = parse_delivery(body, headers, "v2", SIGNED_AT)
    assert (parsed.status, parsed.reason, parsed.raw_type) == ("dead", "no_event_type", None)

    envelope = v1_envelope({"buddyId": "b1"})
    del envelope["type"]
    parsed = parse_delivery(compact(envelope), {}, "v1", SIGNED_AT)
    assert (parsed.status, parsed.reason) == ("dead", "no_event_type")


# --- unmapped --------------------------------------------------------------------------------


def test_unmapped_keeps_buddy_id_and_event() -> None:
    body, headers = v2({"buddy_id": "b1", "boxId": "box_1"}, event="mystery_box.opened")
    parsed = parse_delivery(body, headers, "v2", SIGNED_AT)
    assert parsed.status == "unmapped"
    assert parsed.reason == "unknown_event_type:mystery_box.opened"
    assert parsed.buddy_id == "b1"
    assert parsed.event is not None
    assert parsed.event.type == "mystery_box.opened"
    assert parsed.event.data == {"buddy_id": "b1", "box_id": "box_1"}


def test_unmapped_without_buddy_id() -> None:
    envelope = v1_envelope({"leagueId": "l1"}, type="league.promoted")
    parsed = parse_delivery(compact(envelope), {}, "v1", SIGNED_AT)
    assert (parsed.status, parsed.reason) == ("unmapped", "unknown_event_type:league.promoted")
    assert parsed.buddy_id is None and parsed.event is None
    assert parsed.delivery_id == "wh_1"


# --- delivery id, type and time sources ------------------------------------------------------


def test_delivery_hash_is_stable_for_identical_bodies() -> None:
    body, headers = v2({"buddy_id": "b1", "amount": 1}, delivery=None)
    first = parse_delivery(body, headers, "v2", SIGNED_AT)
    second = parse_delivery(body, headers, "v2", LATER)
    other = parse_delivery(body.replace(b"1}", b"2}"), headers, "v2", SIGNED_AT)
    assert first.status == "accepted"
    assert first.delivery_id == second.delivery_id
    assert first.delivery_id.startswith("sha256:") and len(first.delivery_id) == 7 + 64
    assert other.delivery_id != first.delivery_id


def test_v1_delivery_id_sources() -> None:
    envelope = v1_envelope({"buddyId": "b1"})
    headers = {"hatched-delivery-id": "wh_header"}
    assert parse_delivery(compact(envelope), headers, "v1", SIGNED_AT).delivery_id == "wh_1"
    del envelope["deliveryId"]
    body = compact(envelope)
    assert parse_delivery(body, headers, "v1", SIGNED_AT).delivery_id == "wh_header"
    hashed = parse_delivery(body, {}, "v1", SIGNED_AT).delivery_id
    assert hashed.startswith("sha256:")
    assert parse_delivery(body, {}, "v1", LATER).delivery_id == hashed


def test_v1_type_from_header_when_body_has_none() -> None:
    envelope = v1_envelope({"buddyId": "b1"})
    del envelope["type"]
    headers = {"hatched-event-type": "coin.spent"}
    parsed = parse_delivery(compact(envelope), headers, "v1", SIGNED_AT)
    assert parsed.status == "accepted"
    assert parsed.raw_type == "coin.spent"
    assert parsed.event is not None and parsed.event.type == "coins.spent"


def test_v1_body_type_wins_over_header() -> None:
    headers = {"hatched-event-type": "coin.spent"}
    parsed = parse_delivery(compact(v1_envelope({"buddyId": "b1"})), headers, "v1", SIGNED_AT)
    assert parsed.event is not None and parsed.event.type == "coins.earned"


@pytest.mark.parametrize("field", ["type", "event"])
def test_v2_type_from_body_when_header_missing(field: str) -> None:
    body, headers = v2({"buddy_id": "b1", field: "coin.earned"}, event=None)
    parsed = parse_delivery(body, headers, "v2", SIGNED_AT)
    assert parsed.status == "accepted"
    assert parsed.event is not None and parsed.event.type == "coins.earned"


def test_v2_alias_in_header() -> None:
    body, headers = v2({"buddy_id": "b1"}, event="coin.spent")
    parsed = parse_delivery(body, headers, "v2", SIGNED_AT)
    assert parsed.raw_type == "coin.spent"
    assert parsed.event is not None and parsed.event.type == "coins.spent"


def test_v2_occurred_at_field_wins_over_awarded_at() -> None:
    payload = {
        "buddy_id": "b1",
        "awarded_at": "2026-04-22T09:00:00Z",
        "occurred_at": "2026-04-22T08:00:00+02:00",
    }
    body, headers = v2(payload, event="badge.awarded")
    parsed = parse_delivery(body, headers, "v2", SIGNED_AT)
    assert parsed.event is not None
    assert parsed.event.occurred_at == datetime(2026, 4, 22, 6, 0, tzinfo=UTC)
    assert parsed.event.occurred_at.tzinfo == UTC


def test_unparsable_times_fall_back() -> None:
    data: dict[str, Any] = {"buddyId": "b1", "awardedAt": "2026-04-22T09:15:00Z"}
    envelope = v1_envelope(data, type="badge.awarded", createdAt="yesterday")
    parsed = parse_delivery(compact(envelope), {}, "v1", SIGNED_AT)
    assert parsed.event is not None
    assert parsed.event.occurred_at == datetime(2026, 4, 22, 9, 15, tzinfo=UTC)

    data = {"buddyId": "b1", "awardedAt": 12}
    envelope = v1_envelope(data, type="badge.awarded", createdAt=None)
    parsed = parse_delivery(compact(envelope), {}, "v1", LATER)
    assert parsed.event is not None and parsed.event.occurred_at == LATER


def test_created_at_offset_normalised_to_utc() -> None:
    envelope = v1_envelope({"buddyId": "b1"}, createdAt="2026-04-22T12:30:00+02:00")
    parsed = parse_delivery(compact(envelope), {}, "v1", SIGNED_AT)
    assert parsed.event is not None
    assert parsed.event.occurred_at == CREATED
    assert parsed.event.occurred_at.tzinfo == UTC


def test_naive_times_are_taken_as_utc() -> None:
    envelope = v1_envelope({"buddyId": "b1"}, createdAt="2026-04-22T10:30:00")
    naive_signed = datetime(2026, 4, 22, 10, 31)
    parsed = parse_delivery(compact(envelope), {}, "v1", naive_signed)
    assert parsed.event is not None
    assert parsed.event.occurred_at == CREATED
    assert parsed.event.signed_at == naive_signed.replace(tzinfo=UTC)


def test_signed_at_converted_to_utc() -> None:
    body, headers = v2({"buddy_id": "b1"})
    signed = datetime(2026, 4, 22, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    parsed = parse_delivery(body, headers, "v2", signed)
    assert parsed.event is not None
    assert parsed.event.signed_at == SIGNED_AT and parsed.event.signed_at.tzinfo == UTC
    assert parsed.event.occurred_at.tzinfo == UTC


def test_v1_event_id_absent() -> None:
    envelope = v1_envelope({"buddyId": "b1"})
    del envelope["eventId"]
    parsed = parse_delivery(compact(envelope), {}, "v1", SIGNED_AT)
    assert parsed.event is not None and parsed.event.event_id is None
