"""REST refreshes: a snapshot from Hatched's API enters the inbox like a delivery.

Stored as format `rest` and applied by the same projector as webhooks, an authoritative
snapshot takes part in last-writer-wins with its fetch time as order key: webhook events that
happened before the fetch cannot undo it, later ones apply on top, and a rebuild replays it.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from service import store
from service.hatched.remote import RemoteBuddy
from service.ingest.events import Event, Parsed
from service.ingest.wakeups import shard_of

REFRESH_EVENT = "buddy.refreshed"


async def store_snapshot(
    conn: store.Executor,
    buddy: RemoteBuddy,
    *,
    shards: int,
    fetched_at: datetime | None = None,
) -> int | None:
    """Put a fetched buddy into the inbox; returns its seq, or None when the buddy was erased
    (nothing stored: its tombstone counted the hit). The caller wakes the shard."""
    fetched_at = fetched_at or datetime.now(UTC)
    micros = int(fetched_at.timestamp() * 1_000_000)
    shard = shard_of(buddy.buddy_id, shards)
    seq = await store.insert_delivery(
        conn,
        store.NewDelivery(
            delivery_id=f"rest:{buddy.buddy_id}:{micros}",
            format="rest",
            event_type=REFRESH_EVENT,
            event_id=None,
            buddy_id=buddy.buddy_id,
            shard=shard,
            occurred_at=fetched_at,
            signed_at=fetched_at,
            headers={},
            body=orjson.dumps(buddy.raw),
            status="accepted",
            reason=None,
        ),
    )
    if seq == store.FORGOTTEN:
        return None
    assert seq is not None  # the id carries the fetch time to the microsecond
    return seq


def parse_snapshot(delivery_id: str, body: bytes, fetched_at: datetime) -> Parsed:
    """The stored snapshot as an event, mapped again from the raw body (so a later mapping
    can re-read old snapshots)."""
    try:
        remote = RemoteBuddy.from_json(orjson.loads(body))
    except (orjson.JSONDecodeError, ValueError) as exc:
        return Parsed(delivery_id, "dead", f"snapshot_unreadable: {exc}", REFRESH_EVENT, None, None)
    data = {name: getattr(remote, name) for name in RemoteBuddy.__dataclass_fields__}
    event = Event(
        delivery_id=delivery_id,
        event_id=None,
        type=REFRESH_EVENT,
        buddy_id=remote.buddy_id,
        occurred_at=fetched_at,
        signed_at=fetched_at,
        data=data,
    )
    return Parsed(delivery_id, "accepted", None, REFRESH_EVENT, remote.buddy_id, event)
