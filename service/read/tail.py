"""`hatched-mirror tail-changes`: the change feed in a terminal, one line per change.

Reads Postgres directly (no API token needed, like `replay` and `rebuild`), with the same
commit-order rule as GET /v1/changes, so a newcomer can watch a `send-test-event` flow through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import click
import orjson

from service import store
from service.apply.changes import FIELD_NAMES

POLL_S = 0.5


def line(change: dict[str, Any]) -> str:
    """`time buddy vN cause: field from -> to; ...  change_id`"""
    cause = change["cause"]
    what = cause["kind"] + (f" {cause['event_type']}" if cause["event_type"] else "")
    moved = "; ".join(
        f"{name} {_short(c['from'])} -> {_short(c['to'])}"
        for name, c in sorted(change["changed"].items())
    )
    return (
        f"{change['committed_at']}  {change['buddy_id']} v{change['version']}  [{what}]  "
        f"{moved}  ({change['change_id']})"
    )


def _short(value: Any, width: int = 60) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= width else text[: width - 1] + "…"


async def tail(
    dsn: str,
    echo: Callable[[str], None],
    *,
    after: store.Position | None = None,
    buddy_id: str | None = None,
    user_id: str | None = None,
    fields: Sequence[str] = (),
    follow: bool = True,
) -> int:
    """Print every change after `after` (default: the oldest retained); with `follow`, keep
    printing new ones until cancelled. Returns how many it printed."""
    pool = await store.create_pool(dsn, size=1, timeout_s=10)
    printed = 0
    try:
        bounds = await store.feed_bounds(pool)
        position = after or bounds.pruned
        while True:
            bounds = await store.feed_bounds(pool)
            rows = await store.changes_page(
                pool,
                position,
                bounds.xmin,
                buddy_id=buddy_id,
                user_id=user_id,
                fields=fields,
                limit=500,
            )
            for row in rows:
                echo(line(orjson.loads(row["doc"])))
                position = store.Position(row["txid"], row["id"])
                printed += 1
            if len(rows) == 500:
                continue
            if not follow:
                return printed
            position = max(position, store.Position(bounds.xmin, 0))
            await asyncio.sleep(POLL_S)
    finally:
        await pool.close()


def run(
    dsn: str,
    *,
    after: str | None,
    buddy_id: str | None,
    user_id: str | None,
    fields: Sequence[str],
    follow: bool,
) -> None:
    """The command's options checked, then `tail` until it ends or Ctrl-C."""
    cursor = store.Cursor.parse(after) if after is not None else None
    if after is not None and cursor is None:
        raise click.BadParameter("not a change_id", param_hint="--after")
    if unknown := sorted(set(fields) - FIELD_NAMES):
        raise click.BadParameter(f"{unknown[0]!r} is not a field of the buddy object")
    job = tail(
        dsn,
        click.echo,
        after=cursor.position if cursor is not None else None,
        buddy_id=buddy_id,
        user_id=user_id,
        fields=sorted(set(fields)),
        follow=follow,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(job)
