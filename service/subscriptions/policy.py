"""What a subscription may be, how its deliveries are signed and how failures back off. Pure.

Signing follows Standard Webhooks (the `standardwebhooks` package signs): `webhook-id` is the
change_id, so a receiver that dedupes by it sees each change once however often it is retried.
"""

from __future__ import annotations

import base64
import random
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import urlsplit

from standardwebhooks.webhooks import Webhook

from service.apply.changes import FIELD_NAMES

MAX_URL_CHARS = 2048
MAX_DESCRIPTION_CHARS = 1000
# How much of an endpoint's failure is kept as `last_error` (and logged).
MAX_ERROR_CHARS = 300
SECRET_BYTES = 24


def url_problem(url: object) -> str | None:
    """Why `url` cannot be a subscription's endpoint, or None. Only absolute http(s) URLs with
    a host: subscriptions are for the customer's internal endpoints, not for any scheme the
    HTTP client happens to speak."""
    if not isinstance(url, str) or not url:
        return "must be a non-empty string"
    if len(url) > MAX_URL_CHARS:
        return f"must be at most {MAX_URL_CHARS} characters"
    if not url.isprintable() or url != url.strip() or " " in url:
        return "must not hold whitespace or control characters"
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port out of range or not a number raises here
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "must name a host"
    if parts.username is not None or parts.password is not None:
        return "must not hold credentials (put them in the endpoint's own configuration)"
    if parts.fragment:
        return "must not have a fragment"
    return None


def fields_problem(fields: object) -> str | None:
    """Why `fields` is not a list of the buddy's top-level fields a change can hold."""
    if fields is None:
        return None
    if not isinstance(fields, list) or not fields:
        return "must be a non-empty list of field names, or absent"
    unknown = [f for f in fields if not isinstance(f, str) or f not in FIELD_NAMES]
    if unknown:
        known = ", ".join(sorted(FIELD_NAMES))
        return f"names no field a change holds (one of: {known})"
    return None


def new_secret() -> str:
    """`whsec_` + base64 of random bytes, the form Standard Webhooks libraries take."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def signed_headers(secret: str, change_id: str, body: str, now: float) -> Mapping[str, str]:
    """The Standard Webhooks headers of one attempt (signed afresh with its own timestamp)."""
    timestamp = int(now)
    signature = Webhook(secret).sign(change_id, datetime.fromtimestamp(timestamp, UTC), body)
    return {
        "webhook-id": change_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def backoff_s(
    attempts: int, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """The wait before the next try after `attempts` failures: exponential, capped, with
    jitter (uniform over the upper half of it), so the retries of many changes do not all
    arrive at once at an endpoint that is coming back."""
    ceiling = min(max_s, base_s * 2 ** min(max(attempts - 1, 0), 62))
    return (rng or random).uniform(ceiling / 2, ceiling)


def error_text(text: str) -> str:
    """A failure as `last_error` keeps it: bounded and on one line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_ERROR_CHARS else flat[: MAX_ERROR_CHARS - 1] + "…"
