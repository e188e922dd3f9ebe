"""The admin API of subscriptions: POST/GET/DELETE /v1/subscriptions, and enable."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.responses import Response

from service.apply.projector import iso
from service.config import Settings
from service.ids import is_valid_id
from service.ingest.receiver import read_json_object
from service.problems import Problem, invalid_parameter, json_response
from service.read.openapi import Endpoint, text_param
from service.read.routes import admin_state
from service.store import subscriptions as store
from service.subscriptions import schemas
from service.subscriptions.policy import (
    MAX_DESCRIPTION_CHARS,
    fields_problem,
    new_secret,
    url_problem,
)

MAX_BODY = 16_384
MAX_ID_CHARS = 64


def _not_found() -> Problem:
    return Problem(404, "subscription_not_found", "Subscription not found", "no such subscription")


def _subscription_id(request: Request) -> str:
    value: str = request.path_params["subscription_id"]
    if not is_valid_id(value, MAX_ID_CHARS):
        # No subscription has such an id: the same answer as an unknown one.
        raise _not_found()
    return value


def _time(value: datetime | None) -> str | None:
    return iso(value) if value is not None else None


def _view(row: asyncpg.Record) -> dict[str, Any]:
    oldest = row["oldest_pending_at"]
    lag_s = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else 0.0
    return {
        "subscription_id": row["subscription_id"],
        "url": row["url"],
        "fields": row["fields"],
        "description": row["description"],
        "status": row["status"],
        "created_at": iso(row["created_at"]),
        "last_success_at": _time(row["last_success_at"]),
        "last_error": row["last_error"],
        "failing_since": _time(row["failing_since"]),
        "lag": row["lag"],
        "lag_seconds": round(max(0.0, lag_s), 3),
    }


async def create_subscription(request: Request) -> Response:
    state = admin_state(request)
    body = await read_json_object(request, MAX_BODY, state.settings.body_timeout_s)
    url = body.get("url")
    if problem := url_problem(url):
        raise invalid_parameter("url", problem)
    fields = body.get("fields")
    if problem := fields_problem(fields):
        raise invalid_parameter("fields", problem)
    description = body.get("description")
    if description is not None and (
        not isinstance(description, str)
        or len(description) > MAX_DESCRIPTION_CHARS
        or "\x00" in description
    ):
        raise invalid_parameter(
            "description", f"must be a string of at most {MAX_DESCRIPTION_CHARS} characters"
        )
    assert isinstance(url, str)
    limit = state.settings.subscriptions_max
    row = await store.create(
        state.pool,
        f"sub_{secrets.token_hex(12)}",
        url,
        sorted(set(fields)) if fields is not None else None,
        description,
        new_secret(),
        limit,
    )
    if row is None:
        raise Problem(
            409,
            "too_many_subscriptions",
            "Too many subscriptions",
            f"at most {limit} subscriptions (MIRROR_SUBSCRIPTIONS_MAX); delete one first",
        )
    answer = {
        "subscription_id": row["subscription_id"],
        "url": row["url"],
        "fields": row["fields"],
        "description": row["description"],
        "secret": row["secret"],
        "status": row["status"],
        "created_at": iso(row["created_at"]),
    }
    return json_response(answer, 201, {"Cache-Control": "no-store"})


async def list_subscriptions(request: Request) -> Response:
    state = admin_state(request)
    rows = await store.list_all(state.pool)
    return json_response({"data": [_view(r) for r in rows]}, 200)


async def get_subscription(request: Request) -> Response:
    state = admin_state(request)
    subscription_id = _subscription_id(request)
    row = await store.get(state.pool, subscription_id)
    if row is None:
        raise _not_found()
    return json_response(_view(row), 200)


async def delete_subscription(request: Request) -> Response:
    state = admin_state(request)
    subscription_id = _subscription_id(request)
    if not await store.delete(state.pool, subscription_id):
        raise _not_found()
    return Response(status_code=204)


async def enable_subscription(request: Request) -> Response:
    state = admin_state(request)
    subscription_id = _subscription_id(request)
    if not await store.enable(state.pool, subscription_id):
        raise _not_found()
    return json_response({"subscription_id": subscription_id, "status": "active"}, 202)


SUBSCRIPTION_ID = text_param("subscription_id", "path")
NOT_FOUND = {404: "subscription_not_found"}


def endpoints(settings: Settings) -> list[Endpoint]:
    """Admin routes: only when admin tokens are configured (service/app.py)."""
    return [
        Endpoint(
            "POST",
            "/v1/subscriptions",
            create_subscription,
            "Push the change feed to an internal endpoint (signed per Standard Webhooks)",
            "admin",
            {201: schemas.SubscriptionCreated},
            errors={
                400: "invalid_parameter: the field is named in `detail` (url: http(s) only)",
                409: "too_many_subscriptions: MIRROR_SUBSCRIPTIONS_MAX reached",
            },
            request_body='{"url": string, "fields": [string] | null, "description": string}',
            tag="admin",
        ),
        Endpoint(
            "GET",
            "/v1/subscriptions",
            list_subscriptions,
            "The subscriptions, with status and lag",
            "admin",
            {200: schemas.SubscriptionPage},
            tag="admin",
        ),
        Endpoint(
            "GET",
            "/v1/subscriptions/{subscription_id}",
            get_subscription,
            "One subscription, with status and lag",
            "admin",
            {200: schemas.SubscriptionOut},
            params=[SUBSCRIPTION_ID],
            errors=NOT_FOUND,
            tag="admin",
        ),
        Endpoint(
            "DELETE",
            "/v1/subscriptions/{subscription_id}",
            delete_subscription,
            "Delete a subscription (its place in the feed goes with it)",
            "admin",
            {204: None},
            params=[SUBSCRIPTION_ID],
            errors=NOT_FOUND,
            tag="admin",
        ),
        Endpoint(
            "POST",
            "/v1/subscriptions/{subscription_id}/enable",
            enable_subscription,
            "Resume a disabled subscription where it stopped",
            "admin",
            {202: schemas.SubscriptionEnabled},
            params=[SUBSCRIPTION_ID],
            errors=NOT_FOUND,
            tag="admin",
        ),
    ]
