"""Reading loosely typed JSON values: integers, text, timestamps, camelCase keys. Pure.

Hatched's two wire formats and its REST API spell the same things differently (numbers as
strings, camelCase keys, epoch or ISO times); every reader of their payloads goes through here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

_ACRONYM_RE = re.compile(r"([A-Z]+)([A-Z][a-z])")
_CAMEL_RE = re.compile(r"([a-z0-9])([A-Z])")


def integer(value: Any) -> int | None:
    """An integer, from an int, a whole float or a decimal string; never from a bool."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def text(value: Any) -> str | None:
    """A non-empty string, else None."""
    return value if isinstance(value, str) and value else None


@functools.lru_cache(maxsize=1024)
def snake_case(key: str) -> str:
    """camelCase (or PascalCase, with acronyms) to snake_case; snake_case keys pass through."""
    if key.islower() or not any(c.isupper() for c in key):
        return key
    return _CAMEL_RE.sub(r"\1_\2", _ACRONYM_RE.sub(r"\1_\2", key)).lower()


def snake_keys(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level keys in snake_case."""
    return {snake_case(k) if isinstance(k, str) else k: v for k, v in obj.items()}


def snake_deep(value: Any) -> Any:
    """Every key at every depth in snake_case."""
    if isinstance(value, Mapping):
        return {snake_case(str(k)): snake_deep(v) for k, v in value.items()}
    if isinstance(value, list):
        return [snake_deep(v) for v in value]
    return value


def as_utc(value: datetime) -> datetime:
    # Hatched sends UTC; a naive value can only have come from our own code assuming the same.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def iso_time(value: Any) -> datetime | None:
    """An ISO 8601 string (`Z` or an offset; naive counts as UTC) as a UTC datetime."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return as_utc(datetime.fromisoformat(value))
    except (ValueError, OverflowError):
        # OverflowError: a valid local time whose UTC instant falls outside year 1..9999.
        return None


def any_time(value: Any) -> datetime | None:
    """`iso_time`, or epoch seconds or milliseconds as a number (the REST API sends both)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = value / 1000 if value > 1e11 else value
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return iso_time(value)
