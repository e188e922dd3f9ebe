"""The bootstrap routes' answers, for the OpenAPI document."""

from __future__ import annotations

from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict

log = structlog.get_logger(__name__)


# --- answers -------------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HatchingOut(_Out):
    """The hatch is under way; follow `status_url` (Server-Sent Events) for the buddy."""

    status: Literal["hatching"]
    operation_id: str | None
    status_url: str


class WidgetSessionOut(_Out):
    """A Hatched widget session for the user's buddy: put `token` on widget.js."""

    token: str
    session_id: str | None
    expires_at: str | None
    scopes: list[str]


class EmbedTokenOut(_Out):
    """A read-only embed token for the user's buddy."""

    token: str
    expires_at: str | None
    mode: Literal["read-only"]
