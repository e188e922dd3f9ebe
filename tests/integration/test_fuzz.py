"""Fuzzing the receiver: random headers and bodies, signed and unsigned. Never a 5xx, and
nothing is stored (so nothing can change state) without a valid signature."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Literal

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import store
from service.ingest.signatures import signature_headers
from tests.support.config import SECRET
from tests.support.harness import serve, service_env

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
    with serve(service_env(migrated, redis_url, MIRROR_MAX_BODY_BYTES="4096"), log) as url:
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
    counts = {"signed": 0, "unsigned": 0}
    with httpx.Client(base_url=receiver, timeout=10) as http:

        @given(
            headers=st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=6),
            body=st.one_of(
                st.binary(max_size=300), JSON_BODIES.map(lambda v: json.dumps(v).encode())
            ),
            sign=st.sampled_from(["none", "v1", "v2", "wrong", "stale"]),
            event_type=EVENT_TYPES,
            delivery=st.text(
                st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30
            ),
        )
        @settings(
            max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def one(
            headers: dict[str, str], body: bytes, sign: str, event_type: str, delivery: str
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
            response = http.post("/webhooks/hatched", content=body, headers=headers)
            assert response.status_code < 500, (response.status_code, response.text)
            valid = sign in ("v1", "v2")
            if valid:
                counts["signed"] += 1
                assert response.status_code in (200, 202), response.text
                accepted.add(response.json()["delivery_id"])
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
    assert _stored(migrated) == accepted
