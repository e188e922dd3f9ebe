"""The shapes the HTTP API answers with. /openapi.json is generated from these models, and the
tests check every answer against them, so the document and the code cannot drift apart."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.ingest.events import DeliveryStatus


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Skill(_Out):
    value: int | None
    level: int | None


class Badge(_Out):
    status: Literal["ready", "awarded"]
    awarded_at: str | None


class Streak(_Out):
    count: int | None
    last_milestone: int | None


class Items(_Out):
    owned: list[str]
    equipped: list[str]


class BuddyOut(_Out):
    """The buddy object of the contract."""

    buddy_id: str
    user_id: str | None
    audience: str | None
    egg_id: str | None
    name: str | None
    status: str | None
    config_version_id: str | None
    evolution_stage: int | None
    image_url: str | None
    thumb_url: str | None
    base_image_url: str | None
    coins: int | None
    tokens: dict[str, int]
    skills: dict[str, Skill]
    badges: dict[str, Badge]
    streaks: dict[str, Streak]
    items: Items
    appearance: dict[str, Any] | None
    progression: dict[str, Any] | None
    hatched_at: str | None
    last_event_at: str | None
    refreshed_at: str | None
    updated_at: str
    version: int


class BuddyPage(_Out):
    data: list[BuddyOut]
    next_cursor: str | None


class LedgerEntryOut(_Out):
    delivery_id: str
    currency: str
    amount: int
    balance_after: int | None
    reason: str | None
    reference_id: str | None
    ledger_id: str | None
    is_lucky: bool | None
    occurred_at: str


class LedgerPage(_Out):
    data: list[LedgerEntryOut]
    next_cursor: str | None


class EventOut(_Out):
    delivery_id: str
    event_id: str | None
    type: str | None
    format: Literal["v1", "v2", "rest"]
    occurred_at: str | None
    received_at: str
    applied_at: str | None


class EventPage(_Out):
    data: list[EventOut]
    next_cursor: str | None


class FieldChange(BaseModel):
    # `from` is a Python keyword: the attribute has another name, the JSON key is `from`.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: Any = Field(alias="from")
    to: Any


class ChangeCause(_Out):
    kind: Literal["delivery", "refresh", "rebuild", "replay"]
    delivery_id: str | None
    event_type: str | None


class ChangeOut(_Out):
    """One entry of the change feed."""

    change_id: str
    buddy_id: str
    user_id: str | None
    audience: str | None
    version: int
    committed_at: str
    cause: ChangeCause
    changed: dict[str, FieldChange]


class ChangePage(_Out):
    data: list[ChangeOut]
    next_cursor: str


class DeliveryOut(_Out):
    delivery_id: str
    status: DeliveryStatus
    reason: str | None
    attempts: int
    type: str | None
    buddy_id: str | None
    format: Literal["v1", "v2", "rest"]
    occurred_at: str | None
    received_at: str
    applied_at: str | None


class DeliveryPage(_Out):
    data: list[DeliveryOut]
    next_cursor: str | None


class ReceiverAnswer(_Out):
    delivery_id: str
    status: Literal["accepted", "duplicate", "dead", "unmapped", "forgotten"]


class UserForgotten(_Out):
    """DELETE /v1/users/{user_id}: the user's buddies (how many) and their data are erased."""

    user_id: str
    status: Literal["forgotten"]
    buddies: int


class Queued(_Out):
    status: Literal["queued"]
    delivery_id: str | None = None
    buddy_id: str | None = None


class UserTokenOut(_Out):
    """A user token for one end user's browser (an HS256 JWT), and what it is scoped to."""

    token: str
    user_id: str
    audience: str | None
    expires_at: str


class ProblemOut(BaseModel):
    """RFC 9457 problem details with a stable `code`."""

    type: str
    title: str
    status: int
    detail: str
    code: str = Field(description="stable machine-readable error code")


class Health(BaseModel):
    status: str
    postgres: bool | None = None
    redis: bool | None = None
