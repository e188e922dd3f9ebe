"""Hostile and malformed input, decided without I/O: ids, nesting, times, headers, settings."""

from __future__ import annotations

import io
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest

from service import logs
from service.config import ConfigError, load_settings
from service.hatched.client import _seg
from service.hatched.errors import HatchedAPIError
from service.ids import MAX_ID_CHARS, PREFIX_CHARS
from service.ingest.events import ID_FIELDS, MAX_DEPTH, parse_delivery
from service.ingest.inbox import is_data_error
from service.ingest.signatures import ambiguous_header, signature_headers, verify

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
V2 = {"x-hatched-event": "coins.earned", "x-hatched-delivery": "wh_1"}


def _v2(data: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    return parse_delivery(orjson.dumps(data), headers or V2, "v2", NOW)


def _short_reason(reason: str | None, value: str) -> None:
    assert reason is not None
    assert value not in reason
    assert len(reason) < 200


def test_over_long_delivery_id_is_dead_under_a_stable_substitute_key() -> None:
    long_id = "d" * 4000
    headers = {**V2, "x-hatched-delivery": long_id}
    first = _v2({"buddy_id": "buddy_1", "amount": 1}, headers)
    again = _v2({"buddy_id": "buddy_1", "amount": 1}, headers)
    assert first.status == "dead"
    assert first.reason is not None and first.reason.startswith("invalid_id: delivery id")
    _short_reason(first.reason, long_id)
    assert "d" * PREFIX_CHARS in first.reason
    # Hatched's retry of the same delivery maps to the same stored key: answered duplicate.
    assert first.delivery_id == again.delivery_id
    assert len(first.delivery_id) <= MAX_ID_CHARS


@pytest.mark.parametrize("field", ["buddy_id", *ID_FIELDS])
def test_every_stored_id_is_bounded(field: str) -> None:
    value = "x" * 3000
    data = {"buddy_id": "buddy_1", "user_id": "u", "amount": 1, field: value}
    parsed = _v2(data)
    assert parsed.status == "dead", field
    assert parsed.reason is not None and parsed.reason.startswith(f"invalid_id: {field}")
    _short_reason(parsed.reason, value)


@pytest.mark.parametrize("value", ["a\x00b", "a\nb", "a\u200bb", "a\x7fb"])
def test_ids_with_control_or_invisible_characters_are_dead(value: str) -> None:
    parsed = _v2({"buddy_id": value, "amount": 1})
    assert parsed.status == "dead"
    assert parsed.reason is not None and "non-printable" in parsed.reason


def test_non_ascii_but_printable_ids_are_fine() -> None:
    assert _v2({"buddy_id": "buddy_snow☃", "amount": 1}).status == "accepted"
    assert _v2({"buddy_id": "b" * MAX_ID_CHARS, "amount": 1}).status == "accepted"


def test_over_long_event_type_is_dead_not_quoted_whole() -> None:
    long_type = "t" * 5000
    parsed = _v2({"buddy_id": "b"}, {**V2, "x-hatched-event": long_type})
    assert parsed.status == "dead"
    _short_reason(parsed.reason, long_type)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 600, 1000])
def test_deep_nesting_is_dead_without_recursion(depth: int) -> None:
    body = b'{"buddy_id":"b","x":' + b"[" * depth + b"]" * depth + b"}"
    parsed = parse_delivery(body, V2, "v2", NOW)
    assert parsed.status == "dead"
    assert parsed.reason is not None and parsed.reason.startswith("body_too_deep")


def test_deeper_than_orjson_reads_is_not_json() -> None:
    body = b'{"x":' + b"[" * 3000 + b"]" * 3000 + b"}"
    assert parse_delivery(body, V2, "v2", NOW).reason == "body_not_json"


def test_shallow_enough_nesting_is_accepted() -> None:
    nested: Any = 1
    for _ in range(MAX_DEPTH - 2):
        nested = [nested]
    assert _v2({"buddy_id": "b", "amount": 1, "extra": nested}).status == "accepted"


@pytest.mark.parametrize(
    "value", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "0500-01-01T00:00:00Z"]
)
def test_times_out_of_range_are_dead(value: str) -> None:
    v2 = _v2({"buddy_id": "b", "amount": 1, "occurred_at": value})
    assert v2.status == "dead"
    assert v2.reason is not None and v2.reason.startswith("time_out_of_range: occurred_at")
    envelope = {"deliveryId": "wh_v1", "type": "coins.earned", "createdAt": value}
    v1 = parse_delivery(orjson.dumps({**envelope, "data": {"buddyId": "b"}}), {}, "v1", NOW)
    assert v1.status == "dead"
    assert v1.reason is not None and v1.reason.startswith("time_out_of_range: createdAt")
    awarded = {"buddy_id": "b", "badge_id": "badge_1", "awarded_at": value}
    badge = _v2(awarded, {**V2, "x-hatched-event": "badge.awarded"})
    assert badge.status == "dead"


def test_unreadable_time_still_falls_back_to_the_signature_time() -> None:
    parsed = _v2({"buddy_id": "b", "amount": 1, "occurred_at": "yesterday"})
    assert parsed.status == "accepted"
    assert parsed.event is not None and parsed.event.occurred_at == NOW


def test_replay_key_is_the_same_in_both_formats_and_ignores_unsigned_headers() -> None:
    body = b'{"buddy_id":"b","amount":5}'
    ts = int(NOW.timestamp())
    v2 = {k.lower(): v for k, v in signature_headers(body, "s" * 20, ts, "v2").items()}
    v1 = {k.lower(): v for k, v in signature_headers(body, "s" * 20, ts, "v1").items()}
    a = verify(body, {**v2, "x-hatched-delivery": "one"}, ["s" * 20], ts, 300)
    b = verify(body, {**v2, "x-hatched-delivery": "two"}, ["s" * 20], ts, 300)
    c = verify(body, v1, ["s" * 20], ts, 300)
    d = verify(body, {**v2, "x-hatched-timestamp": f"00{ts}"}, ["s" * 20], ts, 300)
    assert a.replay_key() == b.replay_key() == c.replay_key() == d.replay_key()
    other = signature_headers(body, "s" * 20, ts + 1, "v2")
    e = verify(body, {k.lower(): v for k, v in other.items()}, ["s" * 20], ts, 300)
    assert e.replay_key() != a.replay_key()


@pytest.mark.parametrize(
    ("headers", "ambiguous"),
    [
        ([(b"x-hatched-delivery", b"a"), (b"x-hatched-delivery", b"b")], "x-hatched-delivery"),
        ([(b"x-hatched-event", b"a"), (b"x-hatched-event", b"a")], "x-hatched-event"),
        ([(b"x-hatched-signature", b"a"), (b"x-hatched-signature", b"b")], "x-hatched-signature"),
        ([(b"x-hatched-timestamp", b"1"), (b"x-hatched-timestamp", b"2")], "x-hatched-timestamp"),
        ([(b"hatched-signature", b"t=1"), (b"hatched-signature", b"t=2")], "hatched-signature"),
        ([(b"x-hatched-signature", b"a"), (b"hatched-signature", b"b")], "hatched-signature"),
        ([(b"x-hatched-delivery", b"a"), (b"x-other", b"1"), (b"x-other", b"2")], None),
    ],
)
def test_ambiguous_headers(headers: list[tuple[bytes, bytes]], ambiguous: str | None) -> None:
    assert ambiguous_header(headers) == ambiguous


@pytest.mark.parametrize(
    "variable", ["HATCHED_WEBHOOK_SECRETS", "MIRROR_API_TOKENS", "MIRROR_ADMIN_TOKENS"]
)
def test_short_secrets_and_tokens_are_refused_naming_the_variable(variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(**{variable: "long-enough-entry-0001,x"})
    assert load_settings(**{variable: "long-enough-entry-0001"})


@pytest.mark.parametrize("segment", ["", ".", ".."])
def test_dot_segments_never_reach_hatched(segment: str) -> None:
    with pytest.raises(HatchedAPIError):
        _seg(segment)


def test_path_segments_are_percent_encoded() -> None:
    assert _seg("a/b?c#d%") == "a%2Fb%3Fc%23d%25"
    assert _seg("...") == "..."


@pytest.mark.parametrize(
    ("exc", "data"),
    [
        (asyncpg.exceptions.CharacterNotInRepertoireError("NUL"), True),
        (asyncpg.exceptions.ProgramLimitExceededError("index row size"), True),
        (asyncpg.exceptions.CheckViolationError("check"), True),
        (asyncpg.exceptions._base.DataError("invalid input for query argument"), True),
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed"), False),
        (asyncpg.exceptions.CannotConnectNowError("starting up"), False),
        (asyncpg.exceptions.AdminShutdownError("shutdown"), False),
        (asyncpg.InterfaceError("pool is closing"), False),
        (OSError("refused"), False),
        (TimeoutError(), False),
    ],
)
def test_only_data_errors_isolate_a_row(exc: BaseException, data: bool) -> None:
    """A refused value costs one delivery; anything else is the connection (503 for all)."""
    assert is_data_error(exc) is data


def test_stdlib_errors_keep_their_traceback_in_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn logs through the standard library; its tracebacks must survive the JSON log."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logs.configure("json")
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    finally:
        root.handlers, root.level = saved[0], saved[1]
    line = json.loads(out.getvalue().strip().splitlines()[-1])
    assert line["event"] == "Exception in ASGI application"
    assert "Traceback" in line["exception"] and "ZeroDivisionError" in line["exception"]
