"""Fuzzing the receiver and the read API: random headers and bodies, signed and unsigned, long
and odd ids, repeated headers, deep nesting, odd times, numerals, cursors and path ids. Never a
5xx, nothing is stored (so nothing can change state) without a valid signature, and an
ambiguous request stores nothing either."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any, Literal
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import store
from service.ingest.signatures import signature_headers
from tests.support.config import API_TOKEN, SECRET
from tests.support.harness import serve, service_env

MAX_BODY = 4096
HEADER_NAMES = st.sampled_from(
    [
        "X-Hatched-Signature",
        "X-Hatched-Timestamp",
        "X-Hatched-Delivery",
        "X-Hatched-Event",
        "Hatched-Signature",
        "Hatched-Delivery-Id",
        "Hatched-Event-Type",
        "Content-Type",
        "Content-Length",
        "hatched-signature",
        "X-Other",
    ]
)
HEADER_VALUES = st.one_of(
    # What an HTTP client can send at all: printable ASCII without surrounding blanks.
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80)
    .map(str.strip)
    .filter(bool),
    st.sampled_from(["sha256=", "t=1,v1=", "t=abc,v1=00", "sha256=" + "0" * 64, "-1", "1e9"]),
    st.integers(-(2**40), 2**40).map(str),
)
JSON_BODIES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
# Ids of every kind a careless or hostile sender produces: long ones (random, so compression
# cannot bring them under Postgres's index limit), control characters, non-latin-1, NUL.
ODD_IDS = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), min_size=200, max_size=4000),
    st.binary(min_size=150, max_size=3000).map(lambda b: base64.b64encode(b).decode()),
    st.sampled_from(["a\x00b", "buddy_snow\u2603", " padded ", "a\nb", "\u200b"]),
)
ODD_TIMES = st.one_of(
    st.sampled_from(
        [
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59-14:00",
            "0001-01-01T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "yesterday",
            "",
        ]
    ),
    st.datetimes().map(lambda d: d.isoformat()),
    st.integers(),
)


def nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


HOSTILE_BODIES = st.builds(
    lambda buddy, key, field, when, depth: json.dumps(
        {
            "buddy_id": buddy,
            field: key,
            "amount": 1,
            "balance": 2,
            "occurred_at": when,
            "x": nested(depth),
        }
    ).encode(),
    ODD_IDS,
    ODD_IDS,
    st.sampled_from(["user_id", "egg_id", "token_type", "skill_key", "badge_id", "item_id"]),
    ODD_TIMES,
    st.integers(0, 1200),
)
EVENT_TYPES = st.sampled_from(
    [
        "coins.earned",
        "coin.spent",
        "buddy.hatched",
        "badge.awarded",
        "unknown.thing",
        "",
        "token.earned",
        "skill.decayed",
    ]
)


@pytest.fixture(scope="module")
def receiver(
    migrated: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    with serve(service_env(migrated, redis_url, MIRROR_MAX_BODY_BYTES=str(MAX_BODY)), log) as url:
        yield url
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


def _stored(url: str) -> set[str]:
    async def fetch() -> set[str]:
        pool = await store.create_pool(url, size=1, timeout_s=5)
        try:
            return {
                r["delivery_id"] for r in await pool.fetch("SELECT delivery_id FROM deliveries")
            }
        finally:
            await pool.close()

    return asyncio.run(fetch())


def test_fuzzed_deliveries_never_500_and_never_store_unsigned(
    receiver: str, migrated: str, db: store.Pool
) -> None:
    accepted: set[str] = set()
    counts = {"signed": 0, "unsigned": 0, "ambiguous": 0, "dead": 0}
    with httpx.Client(base_url=receiver, timeout=10) as http:

        @given(
            headers=st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=6),
            body=st.one_of(
                st.binary(max_size=300),
                JSON_BODIES.map(lambda v: json.dumps(v).encode()),
                HOSTILE_BODIES,
            ),
            sign=st.sampled_from(["none", "v1", "v2", "wrong", "stale"]),
            event_type=EVENT_TYPES,
            delivery=st.one_of(
                st.text(
                    st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30
                ),
                # Long header values, as printable ASCII (what an HTTP client can send).
                st.binary(min_size=200, max_size=3000).map(lambda b: base64.b64encode(b).decode()),
            ),
            repeat=st.sampled_from([None, None, None, "X-Hatched-Delivery", "X-Hatched-Event"]),
        )
        @settings(
            max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def one(
            headers: dict[str, str],
            body: bytes,
            sign: str,
            event_type: str,
            delivery: str,
            repeat: str | None,
        ) -> None:
            headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
            if sign in ("v1", "v2", "stale"):
                ts = int(time.time()) - (400 if sign == "stale" else 0)
                fmt: Literal["v1", "v2"] = "v1" if sign == "v1" else "v2"
                headers = {
                    k: v
                    for k, v in headers.items()
                    if "signature" not in k.lower() and "timestamp" not in k.lower()
                }
                headers.update(signature_headers(body, SECRET, ts, fmt))
                headers["X-Hatched-Event" if fmt == "v2" else "Hatched-Event-Type"] = event_type
                headers["X-Hatched-Delivery" if fmt == "v2" else "Hatched-Delivery-Id"] = delivery
            elif sign == "wrong":
                headers.update(signature_headers(body, "whsec_not_ours", int(time.time()), "v2"))
            sent: list[tuple[str, str]] = list(headers.items())
            if repeat is not None:
                sent.append((repeat, "a-second-copy"))
            response = http.post("/webhooks/hatched", content=body, headers=sent)
            assert response.status_code < 500, (response.status_code, response.text)
            names = [k.lower() for k, _ in sent]
            significant = [n for n in names if n.startswith(("x-hatched-", "hatched-"))]
            ambiguous = len(significant) != len(set(significant)) or (
                "x-hatched-signature" in names and "hatched-signature" in names
            )
            if ambiguous:
                counts["ambiguous"] += 1
                assert response.status_code == 400, response.text
                assert response.json()["code"] == "ambiguous_header"
            elif len(body) > MAX_BODY:
                assert response.status_code == 413, response.text
                assert response.json()["code"] == "payload_too_large"
            elif sign in ("v1", "v2"):
                counts["signed"] += 1
                assert response.status_code in (200, 202), response.text
                if response.status_code == 202:
                    accepted.add(response.json()["delivery_id"])
                    counts["dead"] += response.json()["status"] == "dead"
            else:
                counts["unsigned"] += 1
                assert response.status_code in (401, 413), response.text
                assert response.json()["code"] in (
                    "missing_signature",
                    "invalid_signature",
                    "stale_timestamp",
                    "payload_too_large",
                )

        one()
    assert counts["signed"] > 300 and counts["unsigned"] > 300
    assert counts["ambiguous"] > 50 and counts["dead"] > 50, counts
    # Only 202s stored something: a 200 duplicate (same delivery id, or a replayed signature)
    # and every refusal stored nothing.
    assert _stored(migrated) == accepted


READ_PATHS = st.sampled_from(
    [
        "/v1/buddies/{id}",
        "/v1/buddies/{id}/ledger",
        "/v1/buddies/{id}/events",
        "/v1/buddies/{id}/stream",
        "/v1/users/{id}/buddy",
        "/v1/buddies",
    ]
)
NUMERALS = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["\u00b2", "\u0663", "1e3", "+1", "-1", "0x10", " 5", "1_0", "9" * 30]),
    st.integers(-5, 500).map(str),
)
CURSORS = st.one_of(
    st.text(max_size=60),
    JSON_BODIES.map(lambda v: base64.urlsafe_b64encode(json.dumps(v).encode()).decode()),
    st.lists(
        st.one_of(st.text(max_size=40), st.integers(-(2**70), 2**70), ODD_TIMES), max_size=3
    ).map(lambda v: base64.urlsafe_b64encode(json.dumps(v).encode()).decode().rstrip("=")),
)


def test_fuzzed_reads_never_500(receiver: str, db: store.Pool) -> None:
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    with httpx.Client(base_url=receiver, timeout=10) as http:

        @given(
            path=READ_PATHS,
            ident=ODD_IDS,
            limit=st.none() | NUMERALS,
            cursor=st.none() | CURSORS,
        )
        @settings(
            max_examples=600, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def one(path: str, ident: str, limit: str | None, cursor: str | None) -> None:
            params = {k: v for k, v in (("limit", limit), ("cursor", cursor)) if v is not None}
            url = path.replace("{id}", quote(ident, safe="") or "x")
            if url.endswith("/stream"):
                with http.stream("GET", url, params=params, headers=auth) as response:
                    assert response.status_code < 500, response.status_code
                    if response.status_code == 200:
                        return
                    response.read()
            else:
                response = http.get(url, params=params, headers=auth)
            assert response.status_code < 500, (url, params, response.text)
            if response.status_code >= 400:
                assert response.headers["content-type"] == "application/problem+json"

        one()
