"""Hatched's refusals during a bootstrap, as problems the client can act on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from service.hatched.errors import BudgetExhausted, HatchedAPIError, HatchedUnavailable, RateLimited
from service.problems import Problem, retry_after

log = structlog.get_logger(__name__)


def stored(problem: Problem) -> dict[str, Any]:
    """A problem as the `bootstraps` row keeps it, so a later call answers the same."""
    return {**problem.body(), "headers": problem.headers}


def from_stored(stored: Mapping[str, Any]) -> Problem:
    core = {"type", "title", "status", "detail", "code", "headers"}
    return Problem(
        int(stored.get("status") or 502),
        str(stored.get("code") or "hatched_error"),
        str(stored.get("title") or "Hatched error"),
        str(stored.get("detail") or ""),
        stored.get("headers") or {},
        {k: v for k, v in stored.items() if k not in core},
    )


def buddy_forgotten() -> Problem:
    """Hatched answered with the user's buddy, which was erased here (a tombstone keeps it out):
    the bootstrap cannot complete with it. No id in the detail: the row keeps this problem."""
    return Problem(
        409,
        "buddy_forgotten",
        "Buddy erased",
        "Hatched still holds this user's buddy, which was erased from the mirror; "
        "erase it at Hatched too, then retry",
    )


def hatched_problem(exc: HatchedAPIError) -> Problem:
    """Hatched's refusal as this API's problem, with a stable code and Hatched's own details."""
    extra: dict[str, Any] = {"hatched_code": exc.code, "hatched_status": exc.status}
    if exc.request_id:
        extra["hatched_request_id"] = exc.request_id
    details = exc.details if isinstance(exc.details, Mapping) else {}
    if isinstance(exc, RateLimited | BudgetExhausted):
        wait = exc.retry_after_s if isinstance(exc, RateLimited) else 5.0
        seconds = max(1, int(wait + 0.999))
        return Problem(
            429,
            "hatched_rate_limited",
            "Hatched rate limit reached",
            f"Hatched's request budget is spent ({exc.message}); retry after {seconds}s",
            retry_after(seconds),
            {**extra, "retry_after_s": seconds},
        )
    if isinstance(exc, HatchedUnavailable) or (exc.status or 0) >= 500:
        return Problem(
            502,
            "hatched_unavailable",
            "Hatched unavailable",
            f"Hatched did not answer usably: {exc.message}; retry later",
            retry_after(),
            extra,
        )
    if exc.status == 402:
        return Problem(
            402,
            "hatched_payment_required",
            "Hatched plan exhausted",
            f"Hatched refused for billing reasons ({exc.code}): {exc.message}",
            extra=extra,
        )
    if exc.status == 409 and exc.code == "no_published_config":
        publish_url = details.get("publish_url") or details.get("publishUrl")
        hint = f"; publish one at {publish_url}" if publish_url else ""
        return Problem(
            409,
            "no_published_config",
            "No published buddy configuration",
            f"Hatched has no published buddy configuration to hatch from{hint}",
            extra={**extra, "publish_url": publish_url},
        )
    if exc.status == 409 and exc.code == "active_egg_limit":
        return Problem(
            409,
            "active_egg_limit",
            "Too many unhatched eggs",
            f"the user holds the most unhatched eggs Hatched allows and none could be reused: "
            f"{exc.message}",
            extra={**extra, "active": details.get("active")},
        )
    return Problem(
        502,
        "hatched_error",
        "Hatched refused the request",
        f"Hatched answered {exc.status} {exc.code}: {exc.message}",
        extra=extra,
    )
