"""The first-user bootstrap flow behind `POST /v1/users/{user_id}/buddy` (bootstrap/endpoints.py).

The guard: one row of `bootstraps` per user and audience. Of any number of concurrent or repeated
calls one INSERT wins and runs the flow against Hatched (reuse-or-create the egg, mark it ready,
hatch); the others follow the row, so there is never a second egg. A request that dies mid-flow
is taken over once its lease runs out, and a failed flow is retried by the next call.

The end: the buddy arrives with `buddy.hatched`, and a trigger on `buddies`
(sql/0005_bootstrap.sql) completes the row and NOTIFYs `hatched_mirror_bootstraps` with the user
id. When that delivery is late the worker polls `GET /operations/{id}` (`poll_operation`, every
few seconds, bounded) and mirrors the buddy itself; a cron (`poll_stalled_hatches`) restarts
polling that lost its job."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import structlog

from service import store
from service.apply.projector import iso
from service.bootstrap.repository import Found
from service.hatched.client import HatchedAPI
from service.hatched.errors import HatchedAPIError
from service.hatched.refresh import store_snapshot
from service.hatched.remote import RemoteBuddy
from service.ingest.wakeups import shard_of

log = structlog.get_logger(__name__)


_HATCHABLE = ("ready", "hatching", "hatched")


# --- errors --------------------------------------------------------------------------------


async def find_mirrored(
    pool: store.Pool, user_id: str, audience: str | None, row: asyncpg.Record | None = None
) -> Found | None:
    """The user's buddy in the mirror: the one this bootstrap produced, else the newest."""
    if row is not None and row["buddy_id"]:
        found = await store.get_buddy(pool, row["buddy_id"])
        if found is not None:
            return found
    return await store.user_buddy(pool, user_id, audience)


# --- Hatched's side: an active buddy, or an egg hatching -----------------------------------


async def mirror_remote(
    pool: store.Pool, buddy: RemoteBuddy, shards: int, wake_shard: Callable[[int], Awaitable[Any]]
) -> bool:
    """Into the inbox like any delivery; the worker applies it, and the trigger completes.
    False when the buddy was erased here (nothing stored): Hatched still holds it."""
    if await store_snapshot(pool, buddy, shards=shards) is None:
        return False
    await wake_shard(shard_of(buddy.buddy_id, shards))
    return True


async def start_flow(
    hatched: HatchedAPI,
    user_id: str,
    audience: str | None,
    previous: tuple[str | None, str] | None = None,
) -> RemoteBuddy | tuple[str, str]:
    """Hatched's side of the flow: an active buddy, or (egg id, hatch operation id).

    `previous`: (egg id, operation id) of the attempt before this one. A hatch that outlasted
    MIRROR_BOOTSTRAP_POLL_MAX_S may still be running: Hatched's `ensure=true` returns only
    waiting or ready eggs, so asking for an egg now would make a second one. Its operation is
    asked first, and adopted while it runs."""
    page, _ = await hatched.list_buddies(user_id=user_id, status="active", priority=True)
    mine = [
        b
        for b in page
        if b.user_id in (None, user_id) and (audience is None or b.audience == audience)
    ]
    if mine:
        return max(mine, key=_newest)
    if previous is not None:
        adopted = await _adopt(hatched, *previous)
        if adopted is not None:
            return adopted
    try:
        return await _hatch(hatched, await hatched.ensure_egg(user_id, audience, priority=True))
    except HatchedAPIError as exc:
        if exc.status != 409 or exc.code != "active_egg_limit":
            raise
        limit = exc
    # The user holds as many unhatched eggs as Hatched allows: hatch one of them instead.
    for egg in _reusable_eggs(limit.details, audience):
        try:
            return await _hatch(hatched, egg)
        except HatchedAPIError as exc:
            if exc.status != 409:
                raise
            log.info("bootstrap_egg_not_reusable", egg_id=egg["egg_id"], code=exc.code)
    raise limit


_OPERATION_DONE = ("completed", "succeeded", "success", "done")
_OPERATION_FAILED = ("failed", "error", "cancelled", "canceled", "expired")


async def _adopt(
    hatched: HatchedAPI, egg_id: str | None, operation_id: str
) -> RemoteBuddy | tuple[str, str] | None:
    """The previous hatch, when it is still running (resume it) or produced a buddy; None when
    it failed or Hatched does not know it (a new attempt may start)."""
    try:
        operation = await hatched.get_operation(operation_id, priority=True)
    except HatchedAPIError as exc:
        if exc.status == 404:
            return None
        raise
    status = str(operation.get("status") or "").lower()
    if status in _OPERATION_FAILED:
        return None
    if status in _OPERATION_DONE:
        result = operation.get("result")
        buddy_id = result.get("buddy_id") if isinstance(result, Mapping) else None
        if isinstance(buddy_id, str) and buddy_id:
            return await hatched.get_buddy(buddy_id, priority=True)
        return None
    egg = egg_id or operation.get("egg_id")
    if not isinstance(egg, str) or not egg:
        return None
    log.info("bootstrap_hatch_adopted", operation_id=operation_id, status=status)
    return egg, operation_id


def _newest(buddy: RemoteBuddy) -> tuple[float, str]:
    return (buddy.created_at.timestamp() if buddy.created_at else 0.0, buddy.buddy_id)


def _reusable_eggs(details: Any, audience: str | None) -> list[dict[str, Any]]:
    """Eggs named in an active_egg_limit refusal, same audience first, other audiences never."""
    active = details.get("active") if isinstance(details, Mapping) else None
    known: list[dict[str, Any]] = []
    unknown: list[dict[str, Any]] = []
    for item in active if isinstance(active, list) else []:
        if isinstance(item, str) and item:
            unknown.append({"egg_id": item})
        elif isinstance(item, Mapping):
            egg_id = item.get("egg_id") or item.get("eggId") or item.get("id")
            if not isinstance(egg_id, str) or not egg_id:
                continue
            egg = {**item, "egg_id": egg_id}
            if "audience" not in item:
                unknown.append(egg)
            elif item.get("audience") == audience:
                known.append(egg)
    return known + unknown


async def _hatch(hatched: HatchedAPI, egg: Mapping[str, Any]) -> RemoteBuddy | tuple[str, str]:
    egg_id = egg.get("egg_id") or egg.get("id")
    if not isinstance(egg_id, str) or not egg_id:
        raise HatchedAPIError("egg without an id", status=200, code="invalid_response")
    status = egg.get("status")
    buddy_id = egg.get("buddy_id")
    if status == "hatched" and isinstance(buddy_id, str) and buddy_id:
        buddy = await hatched.get_buddy(buddy_id, priority=True)
        if buddy is not None:
            return buddy
    operation_id = egg.get("operation_id")
    if status == "hatching" and isinstance(operation_id, str) and operation_id:
        return egg_id, operation_id
    if status not in _HATCHABLE:
        try:
            await hatched.mark_egg_ready(egg_id, priority=True)
        except HatchedAPIError as exc:
            # An egg known only by id may already be past "ready"; the hatch call decides.
            if status is not None or exc.status != 409:
                raise
    started = await hatched.hatch_egg(egg_id, priority=True)
    operation_id = started.get("operation_id") or started.get("id")
    if not isinstance(operation_id, str) or not operation_id:
        raise HatchedAPIError("hatch answered without an operation id", code="invalid_response")
    return egg_id, operation_id


# --- what a user stream shows --------------------------------------------------------------


def progress(row: asyncpg.Record | None) -> dict[str, Any]:
    """What a stream shows before the buddy exists."""
    if row is None:
        return {
            "status": "none",
            "operation_id": None,
            "egg_id": None,
            "error": None,
            "started_at": None,
        }
    error = row["error"]
    if isinstance(error, Mapping):
        error = {k: v for k, v in error.items() if k != "headers"}
    started = row["hatch_started_at"]
    return {
        "status": row["status"],
        "operation_id": row["operation_id"],
        "egg_id": row["egg_id"],
        "error": error,
        "started_at": iso(started) if started is not None else None,
    }


# --- worker: the polling fallback ----------------------------------------------------------
