"""Webhook signature verification for both of Hatched's wire formats.

Pure: no I/O. The receiver runs `verify` on the raw body bytes before any JSON parsing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

SignatureFormat = Literal["v1", "v2"]
ErrorCode = Literal["missing_signature", "invalid_signature", "stale_timestamp"]

V2_SIGNATURE = "x-hatched-signature"
V2_TIMESTAMP = "x-hatched-timestamp"
V1_SIGNATURE = "hatched-signature"
# Every header whose value decides what is stored or applied. Two copies of one (or both
# signature schemes at once) could be read two ways (a proxy, Starlette's `.get` and a dict
# built from the headers each pick another copy), so such a request is refused as ambiguous.
SIGNIFICANT_HEADERS = (
    V2_SIGNATURE,
    V2_TIMESTAMP,
    V1_SIGNATURE,
    "x-hatched-delivery",
    "x-hatched-event",
    "hatched-delivery-id",
    "hatched-event-type",
)

# ASCII-only on purpose: `\d` would let non-ASCII digits through, which `int()` happily accepts.
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")


class SignatureError(Exception):
    """Verification failed; `code` is the machine-readable reason, str(exc) the human one."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code


@dataclass(frozen=True, slots=True)
class Verified:
    format: SignatureFormat
    timestamp: int
    digest: str  # the lower-case hex HMAC that matched
    # Position in HATCHED_WEBHOOK_SECRETS of the secret that matched (never the secret): during
    # a rotation the metric of it shows when the old one stops being used.
    secret_index: int = 0

    def replay_key(self) -> bytes:
        """What identifies this signed attempt whatever its unsigned headers say; the same in
        both formats, which sign the same message."""
        return hashlib.sha256(f"{self.timestamp}.{self.digest}".encode("ascii")).digest()


def ambiguous_header(raw_headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The name of a significant header sent more than once (or of the second signature
    scheme), or None. `raw_headers` is the ASGI list, names in lower case."""
    seen: set[bytes] = set()
    for name, _ in raw_headers:
        if name in _SIGNIFICANT_BYTES:
            if name in seen:
                return name.decode("latin-1")
            seen.add(name)
    if V2_SIGNATURE.encode() in seen and V1_SIGNATURE.encode() in seen:
        return V1_SIGNATURE
    return None


_SIGNIFICANT_BYTES = frozenset(name.encode("latin-1") for name in SIGNIFICANT_HEADERS)


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """HMAC-SHA256 over `b"{timestamp}." + body`, lower-case hex."""
    message = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def signature_headers(
    body: bytes, secret: str, timestamp: int, fmt: SignatureFormat
) -> dict[str, str]:
    """The signature-related headers Hatched would send for `body` in format `fmt`."""
    digest = sign(body, secret, timestamp)
    if fmt == "v2":
        return {"X-Hatched-Signature": f"sha256={digest}", "X-Hatched-Timestamp": str(timestamp)}
    return {"Hatched-Signature": f"t={timestamp},v1={digest}"}


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secrets: Sequence[str],
    now: float,
    tolerance_s: int,
) -> Verified:
    """Check the delivery's signature against every live secret, then its timestamp window.

    `headers` is read with lower-case names only. Raises `SignatureError`.
    """
    fmt: SignatureFormat
    v2_signature = headers.get(V2_SIGNATURE)
    if v2_signature is not None:
        fmt = "v2"
        timestamp, candidates = _parse_v2(v2_signature, headers.get(V2_TIMESTAMP))
    else:
        v1_signature = headers.get(V1_SIGNATURE)
        if v1_signature is None:
            raise SignatureError("missing_signature", "no Hatched signature header")
        fmt = "v1"
        timestamp, candidates = _parse_v1(v1_signature)

    matched: tuple[int, str] | None = None
    for index, secret in enumerate(secrets):
        # An empty secret is a configuration slip; HMAC with an empty key is forgeable by anyone.
        if not secret:
            continue
        expected = sign(body, secret, timestamp)
        for candidate in candidates:
            if hmac.compare_digest(expected, candidate) and matched is None:
                matched = index, expected
    if matched is None:
        raise SignatureError("invalid_signature", "signature does not match any configured secret")

    # Signature first: an attacker must not learn anything about the window from a forged request.
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError(
            "stale_timestamp",
            f"timestamp {timestamp} is more than {tolerance_s}s away from now ({int(now)})",
        )
    return Verified(format=fmt, timestamp=timestamp, digest=matched[1], secret_index=matched[0])


def _parse_timestamp(raw: str | None) -> int:
    if raw is None:
        raise SignatureError("missing_signature", "signature timestamp is missing")
    raw = raw.strip()
    if not _TIMESTAMP_RE.fullmatch(raw):
        raise SignatureError("missing_signature", "signature timestamp is not an integer")
    return int(raw)


def _parse_hex(raw: str) -> str:
    raw = raw.strip()
    if not _HEX_RE.fullmatch(raw):
        raise SignatureError("missing_signature", "signature is not 64 hex characters")
    return raw.lower()


def _parse_v2(signature: str, timestamp: str | None) -> tuple[int, list[str]]:
    scheme, sep, digest = signature.strip().partition("=")
    if not sep or scheme.strip().lower() != "sha256":
        raise SignatureError("missing_signature", "X-Hatched-Signature must read sha256=<hex>")
    return _parse_timestamp(timestamp), [_parse_hex(digest)]


def _parse_v1(signature: str) -> tuple[int, list[str]]:
    timestamps: set[str] = set()
    candidates: list[str] = []
    for part in signature.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            continue
        key = key.strip()
        if key == "t":
            timestamps.add(value.strip())
        elif key == "v1":
            candidates.append(_parse_hex(value))
        # Other parts (future schemes such as v2=) are ignored, as Stripe-style headers intend.
    if len(timestamps) > 1:
        raise SignatureError("missing_signature", "Hatched-Signature has conflicting t= parts")
    if not candidates:
        raise SignatureError("missing_signature", "Hatched-Signature has no v1= part")
    return _parse_timestamp(next(iter(timestamps), None)), candidates
