"""The one rule for every id the service stores or looks up. Pure.

Delivery, event, buddy, user and egg ids, token types and skill, badge, streak and item keys
all come from outside (Hatched's payloads, a client's URL). Each must be 1 to `MAX_ID_CHARS`
characters, printable (no control, format or separator character other than the ASCII space;
so no NUL, which Postgres cannot store in text), without surrounding whitespace. The bound
keeps every value far below Postgres's ~2.7 KB btree entry limit (256 characters are at most
1 KB of UTF-8), so an indexed id can never make an INSERT fail, and keeps log lines short.
"""

from __future__ import annotations

MAX_ID_CHARS = 256
# Event types are names from Hatched's catalogue ("coins.earned"); far shorter in practice.
MAX_TYPE_CHARS = 128
# How much of a refused value a log line or a stored reason may quote.
PREFIX_CHARS = 16


def id_problem(value: str, max_chars: int = MAX_ID_CHARS) -> str | None:
    """Why `value` is not a valid id, or None when it is."""
    if not value:
        return "is empty"
    if len(value) > max_chars:
        return f"is {len(value)} characters long (at most {max_chars})"
    if not value.isprintable():
        return "holds a control or other non-printable character"
    if value != value.strip():
        return "has surrounding whitespace"
    return None


def is_valid_id(value: object, max_chars: int = MAX_ID_CHARS) -> bool:
    return isinstance(value, str) and id_problem(value, max_chars) is None


def prefix(value: str) -> str:
    """A short, printable quotation of a refused value, safe for a log line or a reason."""
    shown = repr(value[:PREFIX_CHARS])
    return shown + ("…" if len(value) > PREFIX_CHARS else "")
