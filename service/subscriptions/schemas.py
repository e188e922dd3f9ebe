"""The subscription routes' answers, for the OpenAPI document and the tests that hold every
answer to it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Status = Literal["active", "failing", "disabled"]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubscriptionCreated(_Out):
    """A new subscription. `secret` signs its deliveries (Standard Webhooks) and is shown only
    in this answer."""

    subscription_id: str
    url: str
    fields: list[str] | None
    description: str | None
    secret: str
    status: Status
    created_at: str


class SubscriptionOut(_Out):
    """A subscription and how far its endpoint has acknowledged the feed."""

    subscription_id: str
    url: str
    fields: list[str] | None
    description: str | None
    status: Status
    created_at: str
    last_success_at: str | None
    last_error: str | None
    failing_since: str | None
    lag: int
    lag_seconds: float


class SubscriptionPage(_Out):
    data: list[SubscriptionOut]


class SubscriptionEnabled(_Out):
    subscription_id: str
    status: Literal["active"]
