from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.dev.samples import SAMPLE_TYPES, V1_TEMPLATES, V2_TEMPLATES, build_delivery
from service.ingest.events import KNOWN_TYPES, TYPE_ALIASES, Format, Parsed, parse_delivery
from service.ingest.signatures import verify

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hatched"
FIXTURE_FILES = sorted(p.name for p in FIXTURES.glob("*.json"))
SECRET = "whsec_test_fixture_secret"
TS = 1776853800
FIXTURE_TIME = datetime(2026, 4, 22, 10, 30, tzinfo=UTC)
FORMATS: list[Format] = ["v1", "v2"]


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def verify_and_parse(headers: dict[str, str], body: bytes, fmt: Format) -> Parsed:
    low = lower(headers)
    verified = verify(body, low, [SECRET], TS, 300)
    assert verified.format == fmt
    signed_at = datetime.fromtimestamp(verified.timestamp, UTC)
    return parse_delivery(body, low, verified.format, signed_at)


def build(event_type: str, fmt: Format, **kwargs: Any) -> Parsed:
    headers, body = build_delivery(event_type, fmt, secret=SECRET, timestamp=TS, **kwargs)
    return verify_and_parse(headers, body, fmt)


def test_sample_types_cover_known_types() -> None:
    assert tuple(sorted(KNOWN_TYPES)) == SAMPLE_TYPES
    assert set(V1_TEMPLATES) == set(V2_TEMPLATES) == KNOWN_TYPES


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("event_type", SAMPLE_TYPES)
def test_every_sample_verifies_and_parses(event_type: str, fmt: Format) -> None:
    parsed = build(event_type, fmt, buddy_id="buddy_x")
    assert parsed.status == "accepted"
    assert parsed.buddy_id == "buddy_x"
    assert parsed.event is not None
    assert parsed.event.type == event_type
    assert parsed.event.data["buddy_id"] == "buddy_x"
    assert parsed.event.signed_at == FIXTURE_TIME
    if fmt == "v1":
        assert parsed.event.event_id is not None and parsed.event.event_id.startswith("evt_")
        assert parsed.delivery_id.startswith("wh_")
    else:
        assert parsed.event.event_id is None
        assert len(parsed.delivery_id) == 36


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_samples_match_fixtures(name: str) -> None:
    fixture = json.loads((FIXTURES / name).read_text("utf-8"))
    fmt: Format = "v2" if name.startswith("v2_") else "v1"
    fixture_body = orjson.dumps(fixture["body"])
    expected = parse_delivery(fixture_body, lower(fixture["headers"]), fmt, FIXTURE_TIME)
    parsed = build(fixture["event_type"], fmt, occurred_at=FIXTURE_TIME)
    assert expected.event is not None and parsed.event is not None
    assert parsed.raw_type == expected.raw_type
    assert parsed.event.data == expected.event.data
    assert parsed.event.occurred_at == expected.event.occurred_at


@pytest.mark.parametrize("fmt", FORMATS)
def test_alias_names_accepted(fmt: Format) -> None:
    for alias, canonical in TYPE_ALIASES.items():
        parsed = build(alias, fmt)
        assert parsed.event is not None and parsed.event.type == canonical
        assert parsed.raw_type == (alias if fmt == "v1" else canonical)


def test_unknown_type_rejected() -> None:
    with pytest.raises(ValueError, match="league"):
        build_delivery("league.promoted", "v2", secret=SECRET)


@pytest.mark.parametrize("fmt", FORMATS)
def test_overrides_land_in_data(fmt: Format) -> None:
    overrides = {
        "balance": 999,
        "amount": 7,
        "reference_id": "ref_x",
        "is_lucky": True,
        "price_info": {"unit_price": 3},
    }
    parsed = build("coins.earned", fmt, data=overrides)
    assert parsed.event is not None
    for key, value in overrides.items():
        assert parsed.event.data[key] == value, key


@pytest.mark.parametrize("fmt", FORMATS)
def test_mapped_key_overrides(fmt: Format) -> None:
    overrides = {
        "image_url": "https://example.test/s3.png",
        "evolution_stage": 3,
        "new_stage": 3,
        "previous_stage": 2,
    }
    parsed = build("buddy.evolved", fmt, data=overrides)
    assert parsed.event is not None
    for key, value in overrides.items():
        assert parsed.event.data[key] == value, key

    parsed = build("token.spent", fmt, data={"token_type": "ruby", "balance": 0})
    assert parsed.event is not None
    assert (parsed.event.data["token_type"], parsed.event.data["balance"]) == ("ruby", 0)


def test_v1_wire_uses_camel_case_for_overrides() -> None:
    _, body = build_delivery(
        "coins.earned",
        "v1",
        secret=SECRET,
        timestamp=TS,
        data={"balance": 5, "token_type": "gem", "reference_id": "r", "image_url": "u"},
    )
    wire = orjson.loads(body)
    assert wire["type"] == "coin.earned"
    assert wire["data"]["balanceAfter"] == 5
    assert wire["data"]["tokenKey"] == "gem"
    assert wire["data"]["referenceId"] == "r"
    assert wire["data"]["image"] == {"url": "u"}
    assert "balance" not in wire["data"]


def test_v1_snake_case_template_overrides_stay_snake_case() -> None:
    headers, body = build_delivery(
        "skill.decayed", "v1", secret=SECRET, timestamp=TS, buddy_id="b9", data={"new_value": 1}
    )
    wire = orjson.loads(body)
    assert wire["data"]["buddy_id"] == "b9"
    assert wire["data"]["new_value"] == 1
    assert "buddyId" not in wire["data"] and "newValue" not in wire["data"]
    parsed = verify_and_parse(headers, body, "v1")
    assert parsed.event is not None and parsed.event.data["new_value"] == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_delivery_id_and_occurred_at(fmt: Format) -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    for event_type in ("badge.awarded", "badge.ready"):
        parsed = build(event_type, fmt, delivery_id="fixed-id", occurred_at=when)
        assert parsed.delivery_id == "fixed-id"
        assert parsed.event is not None
        assert parsed.event.occurred_at == when
        assert parsed.event.data["awarded_at"] == "2026-01-02T03:04:05Z"


def test_v2_occurred_at_ignored_without_time_field() -> None:
    parsed = build("coins.earned", "v2", occurred_at=datetime(2026, 1, 1, tzinfo=UTC))
    assert parsed.event is not None
    assert parsed.event.occurred_at == FIXTURE_TIME


@pytest.mark.parametrize("fmt", FORMATS)
def test_awarded_at_override_wins(fmt: Format) -> None:
    when = datetime(2026, 1, 2, tzinfo=UTC)
    parsed = build(
        "badge.awarded", fmt, occurred_at=when, data={"awarded_at": "2025-12-31T00:00:00Z"}
    )
    assert parsed.event is not None
    assert parsed.event.data["awarded_at"] == "2025-12-31T00:00:00Z"


@pytest.mark.parametrize("fmt", FORMATS)
def test_defaults_are_fresh(fmt: Format) -> None:
    first_headers, first_body = build_delivery("streak.ticked", fmt, secret=SECRET)
    second_headers, second_body = build_delivery("streak.ticked", fmt, secret=SECRET)
    assert first_body != second_body or first_headers != second_headers
    low = lower(first_headers)
    verified = verify(first_body, low, [SECRET], time.time(), 300)
    signed_at = datetime.fromtimestamp(verified.timestamp, UTC)
    one = parse_delivery(first_body, low, fmt, signed_at)
    two = parse_delivery(second_body, lower(second_headers), fmt, signed_at)
    assert one.delivery_id != two.delivery_id


def test_templates_not_mutated() -> None:
    before = orjson.dumps([V1_TEMPLATES, V2_TEMPLATES])
    build_delivery("buddy.evolved", "v1", secret=SECRET, data={"image_url": "x"}, buddy_id="b")
    build_delivery("buddy.evolved", "v2", secret=SECRET, data={"image_url": "x"}, buddy_id="b")
    assert orjson.dumps([V1_TEMPLATES, V2_TEMPLATES]) == before
