"""Subscriptions' pure rules: which endpoints are allowed, Standard Webhooks signatures (checked
by the standardwebhooks package's own verifier), and the backoff."""

from __future__ import annotations

import random
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from service.apply.changes import FIELD_NAMES
from service.subscriptions.policy import (
    MAX_ERROR_CHARS,
    backoff_s,
    error_text,
    fields_problem,
    new_secret,
    signed_headers,
    url_problem,
)


@pytest.mark.parametrize(
    "url",
    ["http://hooks.internal/changes", "https://10.0.0.7:8443/x?y=1", "http://[::1]:9000/"],
)
def test_internal_http_endpoints_are_allowed(url: str) -> None:
    assert url_problem(url) is None


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://hooks.internal/",
        "file:///etc/passwd",
        "gopher://h/",
        "hooks.internal/changes",
        "http:///nohost",
        "http://u:p@hooks.internal/",
        "http://hooks.internal/#frag",
        "http://hooks.internal:70000/",
        "http://hooks.internal/a b",
        " http://hooks.internal/",
        "http://hooks.internal/\x00",
        "http://h/" + "a" * 2048,
        5,
        None,
    ],
)
def test_other_urls_are_refused(url: object) -> None:
    assert url_problem(url) is not None


def test_fields_are_the_changes_top_level_keys() -> None:
    assert fields_problem(None) is None
    assert fields_problem(sorted(FIELD_NAMES)) is None
    for bad in ([], ["coins", "version"], ["updated_at"], "coins", [1]):
        assert fields_problem(bad) is not None, bad


def test_signatures_verify_with_the_standard_webhooks_library() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and new_secret() != secret
    body = '{"change_id": "abc", "coins": {"from": 1, "to": 2}}'
    headers = signed_headers(secret, "abc", body, time.time())
    assert headers["webhook-id"] == "abc"
    assert Webhook(secret).verify(body, dict(headers)) == {
        "change_id": "abc",
        "coins": {"from": 1, "to": 2},
    }
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, dict(headers))
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace("2", "3"), dict(headers))
    # A stale attempt is refused by receivers: each retry is signed afresh.
    old = signed_headers(secret, "abc", body, time.time() - 3600)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, dict(old))


def test_backoff_grows_is_capped_and_jittered() -> None:
    rng = random.Random(7)
    for attempts in range(1, 80):
        ceiling = min(60.0, 0.5 * 2 ** (attempts - 1))
        waits = {backoff_s(attempts, 0.5, 60.0, rng) for _ in range(20)}
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(waits) > 1  # jittered, so retries spread out
    assert backoff_s(1000, 1.0, 600.0, rng) <= 600.0


def test_errors_are_bounded_single_lines() -> None:
    text = error_text("boom\n" * 1000)
    assert "\n" not in text and len(text) <= MAX_ERROR_CHARS
    assert error_text("HTTP 500") == "HTTP 500"
