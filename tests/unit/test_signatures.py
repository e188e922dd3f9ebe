from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from starlette.datastructures import Headers

from service.ingest.signatures import SignatureError, sign, signature_headers, verify

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hatched"
FIXTURE_FILES = sorted(p.name for p in FIXTURES.glob("*.json"))
SECRET = "whsec_test_fixture_secret"
TS = 1776853800
TOLERANCE = 300
BODY = b'{"buddy_id":"buddy_1","amount":10}'


def load(name: str) -> dict[str, Any]:
    fixture: dict[str, Any] = json.loads((FIXTURES / name).read_text("utf-8"))
    return fixture


def fixture_body(fixture: dict[str, Any]) -> bytes:
    return json.dumps(fixture["body"], separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def v2_headers(body: bytes = BODY, secret: str = SECRET, ts: int = TS) -> dict[str, str]:
    return lower(signature_headers(body, secret, ts, "v2"))


def v1_headers(body: bytes = BODY, secret: str = SECRET, ts: int = TS) -> dict[str, str]:
    return lower(signature_headers(body, secret, ts, "v1"))


def error_code(body: bytes, headers: dict[str, str], secrets: list[str], now: float) -> str:
    with pytest.raises(SignatureError) as info:
        verify(body, headers, secrets, now, TOLERANCE)
    assert str(info.value)
    return info.value.code


def test_fixtures_present() -> None:
    assert len(FIXTURE_FILES) == 26


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_every_fixture_verifies(name: str) -> None:
    fixture = load(name)
    result = verify(fixture_body(fixture), lower(fixture["headers"]), [SECRET], TS, TOLERANCE)
    assert result.format == ("v2" if name.startswith("v2_") else "v1")
    assert result.timestamp == TS


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_tampered_fixture_body_is_invalid(name: str) -> None:
    fixture = load(name)
    body = fixture_body(fixture).replace(b"buddy_01HXA7Q2M9K3", b"buddy_01HXA7Q2M9K4")
    assert error_code(body, lower(fixture["headers"]), [SECRET], TS) == "invalid_signature"


@pytest.mark.parametrize("make", [v1_headers, v2_headers], ids=["v1", "v2"])
def test_wrong_secret_is_invalid(make: Any) -> None:
    assert error_code(BODY, make(), ["whsec_other"], TS) == "invalid_signature"


@pytest.mark.parametrize("make", [v1_headers, v2_headers], ids=["v1", "v2"])
def test_no_secrets_is_invalid(make: Any) -> None:
    assert error_code(BODY, make(), [], TS) == "invalid_signature"


def test_empty_secret_never_matches() -> None:
    headers = v2_headers(secret="")
    assert error_code(BODY, headers, ["", SECRET], TS) == "invalid_signature"


@pytest.mark.parametrize("make", [v1_headers, v2_headers], ids=["v1", "v2"])
def test_rotation_second_secret_matches(make: Any) -> None:
    headers = make(secret="whsec_new")
    assert verify(BODY, headers, [SECRET, "whsec_new"], TS, TOLERANCE).timestamp == TS


@pytest.mark.parametrize(
    ("now", "ok"),
    [
        (TS + TOLERANCE, True),
        (TS + TOLERANCE + 1, False),
        (TS - TOLERANCE, True),
        (TS - TOLERANCE - 1, False),
        (TS + TOLERANCE + 0.5, False),
    ],
    ids=["old-inside", "old-outside", "future-inside", "future-outside", "old-fraction-outside"],
)
@pytest.mark.parametrize("make", [v1_headers, v2_headers], ids=["v1", "v2"])
def test_timestamp_window(make: Any, now: float, ok: bool) -> None:
    if ok:
        assert verify(BODY, make(), [SECRET], now, TOLERANCE).timestamp == TS
    else:
        assert error_code(BODY, make(), [SECRET], now) == "stale_timestamp"


def test_signature_checked_before_window() -> None:
    headers = v2_headers(secret="whsec_other")
    assert error_code(BODY, headers, [SECRET], TS + 10_000) == "invalid_signature"


GOOD_HEX = sign(BODY, SECRET, TS)

MALFORMED: dict[str, dict[str, str]] = {
    "no-headers": {},
    "v2-no-timestamp": {"x-hatched-signature": f"sha256={GOOD_HEX}"},
    "v2-timestamp-not-int": {
        "x-hatched-signature": f"sha256={GOOD_HEX}",
        "x-hatched-timestamp": "1776853800.5",
    },
    "v2-timestamp-text": {"x-hatched-signature": f"sha256={GOOD_HEX}", "x-hatched-timestamp": "x"},
    "v2-timestamp-negative": {
        "x-hatched-signature": f"sha256={GOOD_HEX}",
        "x-hatched-timestamp": "-1",
    },
    "v2-timestamp-empty": {"x-hatched-signature": f"sha256={GOOD_HEX}", "x-hatched-timestamp": ""},
    "v2-no-prefix": {"x-hatched-signature": GOOD_HEX, "x-hatched-timestamp": str(TS)},
    "v2-wrong-prefix": {"x-hatched-signature": f"sha1={GOOD_HEX}", "x-hatched-timestamp": str(TS)},
    "v2-empty-hex": {"x-hatched-signature": "sha256=", "x-hatched-timestamp": str(TS)},
    "v2-non-hex": {"x-hatched-signature": "sha256=" + "z" * 64, "x-hatched-timestamp": str(TS)},
    "v2-short-hex": {"x-hatched-signature": f"sha256={GOOD_HEX[:-2]}", "x-hatched-timestamp": "1"},
    "v2-long-hex": {"x-hatched-signature": f"sha256={GOOD_HEX}00", "x-hatched-timestamp": str(TS)},
    "v2-empty": {"x-hatched-signature": "", "x-hatched-timestamp": str(TS)},
    "v1-empty": {"hatched-signature": ""},
    "v1-no-timestamp": {"hatched-signature": f"v1={GOOD_HEX}"},
    "v1-timestamp-not-int": {"hatched-signature": f"t=soon,v1={GOOD_HEX}"},
    "v1-conflicting-timestamps": {"hatched-signature": f"t={TS},t={TS + 1},v1={GOOD_HEX}"},
    "v1-no-hex": {"hatched-signature": f"t={TS}"},
    "v1-empty-hex": {"hatched-signature": f"t={TS},v1="},
    "v1-non-hex": {"hatched-signature": f"t={TS},v1={'g' * 64}"},
    "v1-short-hex": {"hatched-signature": f"t={TS},v1={GOOD_HEX[:10]}"},
    "v1-only-other-scheme": {"hatched-signature": f"t={TS},v0={GOOD_HEX}"},
    "v1-garbage": {"hatched-signature": "not a signature"},
}


@pytest.mark.parametrize("headers", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_headers_are_missing_signature(headers: dict[str, str]) -> None:
    assert error_code(BODY, headers, [SECRET], TS) == "missing_signature"


def test_v2_wins_when_both_formats_present() -> None:
    headers = {**v1_headers(), **v2_headers()}
    assert verify(BODY, headers, [SECRET], TS, TOLERANCE).format == "v2"
    headers["x-hatched-signature"] = "garbage"
    assert error_code(BODY, headers, [SECRET], TS) == "missing_signature"


def test_v1_several_signatures_any_order_unknown_parts() -> None:
    other = sign(BODY, "whsec_other", TS)
    headers = {"hatched-signature": f" v0=abc, v1={other} ,scheme=x, v1={GOOD_HEX} , t={TS} ,"}
    result = verify(BODY, headers, [SECRET], TS, TOLERANCE)
    assert (result.format, result.timestamp) == ("v1", TS)


def test_upper_case_hex_accepted() -> None:
    headers = {"x-hatched-signature": f"sha256={GOOD_HEX.upper()}", "x-hatched-timestamp": str(TS)}
    assert verify(BODY, headers, [SECRET], TS, TOLERANCE).format == "v2"


@pytest.mark.parametrize("name", ["v1_envelope__coin.earned.json", "v2_headers__coins.earned.json"])
@pytest.mark.parametrize("case", ["lower", "upper", "as-sent"])
def test_header_names_case_insensitive(name: str, case: str) -> None:
    fixture = load(name)
    raw: dict[str, str] = fixture["headers"]
    if case == "lower":
        raw = {k.lower(): v for k, v in raw.items()}
    elif case == "upper":
        raw = {k.upper(): v for k, v in raw.items()}
    result = verify(fixture_body(fixture), Headers(headers=raw), [SECRET], TS, TOLERANCE)
    assert result.timestamp == TS


def test_sign_known_vector() -> None:
    fixture = load("v2_headers__coins.earned.json")
    expected = fixture["headers"]["X-Hatched-Signature"].removeprefix("sha256=")
    assert sign(fixture_body(fixture), SECRET, TS) == expected


def test_signature_headers_shapes() -> None:
    digest = sign(BODY, SECRET, TS)
    assert signature_headers(BODY, SECRET, TS, "v2") == {
        "X-Hatched-Signature": f"sha256={digest}",
        "X-Hatched-Timestamp": str(TS),
    }
    assert signature_headers(BODY, SECRET, TS, "v1") == {"Hatched-Signature": f"t={TS},v1={digest}"}
