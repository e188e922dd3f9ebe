"""The bootstrap routes and their OpenAPI entries."""

from __future__ import annotations

import structlog

from service.bootstrap.endpoints import bootstrap_buddy, stream_user_buddy
from service.bootstrap.schemas import EmbedTokenOut, HatchingOut, WidgetSessionOut
from service.bootstrap.tokens import create_embed_token, create_widget_session
from service.config import Settings
from service.read.openapi import Endpoint, text_param
from service.read.schemas import BuddyOut

log = structlog.get_logger(__name__)


# --- routes --------------------------------------------------------------------------------

USER_ID = text_param("user_id", "path")
NEEDS_HATCHED = {409: "hatched_api_not_configured: HATCHED_API_URL/HATCHED_API_KEY unset"}
HATCHED_ERRORS = {
    402: "hatched_payment_required: Hatched refused for billing reasons (hatched_code says why)",
    409: "hatched_api_not_configured; no_published_config (publish_url); active_egg_limit "
    "(active: the user's unhatched eggs, none reusable); buddy_forgotten (Hatched still holds "
    "the user's erased buddy)",
    429: "hatched_rate_limited: Hatched's (or the shared) request budget is spent; Retry-After",
    502: "hatched_unavailable (timeouts, 5xx; Retry-After) or hatched_error (any other refusal, "
    "with hatched_status and hatched_code)",
    503: "unavailable: Postgres or Redis unreachable",
}
BAD_BODY = {400: "invalid_parameter: the field is named in `detail`"}


def endpoints(settings: Settings) -> list[Endpoint]:
    return [
        Endpoint(
            "POST",
            "/v1/users/{user_id}/buddy",
            bootstrap_buddy,
            "First-user bootstrap: the user's buddy, hatched if there is none (one egg at most)",
            "api",
            {200: BuddyOut, 202: HatchingOut},
            params=[USER_ID],
            errors={**BAD_BODY, **HATCHED_ERRORS},
            request_body='{"audience": string | null}, optional; the body may be empty',
            tag="bootstrap",
            user="user",
        ),
        Endpoint(
            "GET",
            "/v1/users/{user_id}/buddy/stream",
            stream_user_buddy,
            "Server-Sent Events: `progress` while hatching, then the buddy on every change",
            "api",
            {200: "text/event-stream"},
            params=[USER_ID, text_param("audience")],
            errors={
                **BAD_BODY,
                **NEEDS_HATCHED,
                503: "too_many_streams: this process serves its maximum of live streams",
            },
            tag="bootstrap",
            user="user",
        ),
        Endpoint(
            "POST",
            "/v1/users/{user_id}/widget-session",
            create_widget_session,
            "Mint a Hatched widget session for the user's buddy",
            "api",
            {200: WidgetSessionOut},
            params=[USER_ID],
            errors={
                **BAD_BODY,
                404: "buddy_not_found: no buddy mirrored for the user (bootstrap first)",
                **HATCHED_ERRORS,
            },
            request_body='{"scopes": [string], "ttl_seconds": 60-86400 (default 3600), '
            '"audience": string | null}, all optional',
            tag="bootstrap",
            user="user",
        ),
        Endpoint(
            "POST",
            "/v1/users/{user_id}/embed-token",
            create_embed_token,
            "Mint a read-only Hatched embed token for the user's buddy",
            "api",
            {200: EmbedTokenOut},
            params=[USER_ID],
            errors={
                **BAD_BODY,
                404: "buddy_not_found: no buddy mirrored for the user (bootstrap first)",
                **HATCHED_ERRORS,
            },
            request_body='{"audience": string | null}, optional; the body may be empty',
            tag="bootstrap",
            user="user",
        ),
    ]
