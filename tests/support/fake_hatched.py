"""A fake of Hatched's REST API for tests: a ground-truth world served over real HTTP.

`FakeHatched` holds buddies (as REST JSON), eggs, operations and widget sessions, and serves
them the way `service.hatched_api` expects Hatched to: bearer auth, the `{"error": {...}}`
envelope, cursor pagination, its own per-minute rate limit with 429 + Retry-After. Knobs make it
misbehave on purpose (`fail_next`, `delay_s`, `rate_limit_per_min`, `no_published_config`, ...).
Every request is counted per route in `calls` and logged with its status in `log`.

Hatching is asynchronous as on Hatched: `POST /eggs/{id}/hatch` returns an operation that
completes after `hatch_delay_s`, creating the buddy in the world and queueing the matching
`buddy.hatched` webhook in `outbox` for the test to deliver (e.g. with `build_delivery`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

DEFAULT_API_KEY = "hk_test_fake_hatched"
PUBLISH_URL = "https://app.hatched.live/configs/cfg_draft/publish"
CDN = "https://cdn.hatched.live/buddies"
# Eggs in these states still count against the per-user limit and are reused by `ensure`.
UNHATCHED = ("incubating", "ready", "hatching")

Handler = Callable[[Request], Awaitable[Response]]


def now_iso(at: datetime | None = None) -> str:
    return (at or datetime.now(UTC)).astimezone(UTC).isoformat().replace("+00:00", "Z")


def buddy_json(buddy_id: str, user_id: str = "user_1", **overrides: Any) -> dict[str, Any]:
    """A complete buddy in the assumed REST shape (hatched-webhooks.md, rule 7)."""
    stamp = now_iso()
    buddy: dict[str, Any] = {
        "buddy_id": buddy_id,
        "user_id": user_id,
        "audience": None,
        "egg_id": f"egg_{buddy_id}",
        "name": "Pip",
        "status": "active",
        "config_version_id": "cfg_v1",
        "evolution_stage": 1,
        "image_url": f"{CDN}/{buddy_id}/stage1.png",
        "thumb_url": f"{CDN}/{buddy_id}/stage1_thumb.png",
        "base_image_url": None,
        "coins": 0,
        "tokens": {},
        "skills": {},
        "badges": [],
        "streaks": {},
        "equipped_item_ids": [],
        "appearance": None,
        "progression": None,
        "created_at": stamp,
        "updated_at": stamp,
    }
    buddy.update(overrides)
    return buddy


@dataclass(frozen=True)
class OutboxEvent:
    """A webhook Hatched would send; v2 payload in `data` (without `buddy_id`)."""

    type: str
    delivery_id: str
    buddy_id: str
    data: dict[str, Any]
    occurred_at: datetime


@dataclass(frozen=True)
class CallRecord:
    at: float  # time.monotonic()
    route: str
    status: int


@dataclass
class _Failure:
    remaining: int
    status: int
    code: str | None
    details: Any
    route: str | None
    retry_after: float | None
    body: str | None


@dataclass
class FakeHatched:
    """Ground truth plus knobs; mutate freely between (or during) requests."""

    api_key: str = DEFAULT_API_KEY
    # Fixed-window limit: at most this many requests per `rate_window_s` (None: unlimited).
    rate_limit_per_min: int | None = None
    rate_window_s: float = 60.0
    # Every request sleeps this long before answering (to provoke client timeouts).
    delay_s: float = 0.0
    # Single objects come as {"data": {...}} when True, bare when False.
    wrap_data: bool = True
    max_page_size: int = 100
    hatch_delay_s: float = 0.2
    # The hatch operation ends in status "failed" instead of creating a buddy.
    fail_hatch: bool = False
    # POST /eggs answers 409 no_published_config (details.publish_url) while set.
    no_published_config: bool = False
    publish_url: str = PUBLISH_URL
    # Unhatched eggs a user may hold; beyond it POST /eggs answers 409 active_egg_limit.
    max_active_eggs: int | None = None
    # Hatches left on the plan (None: unlimited); at 0 a hatch answers 402 insufficient_credits.
    credits: int | None = None

    buddies: dict[str, dict[str, Any]] = field(default_factory=dict)
    eggs: dict[str, dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    widget_sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    embed_tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    outbox: list[OutboxEvent] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    log: list[CallRecord] = field(default_factory=list)

    _failures: list[_Failure] = field(default_factory=list, init=False, repr=False)
    # (window index, requests counted in it)
    _window: tuple[int, int] = field(default=(0, 0), init=False, repr=False)
    # Pending hatch operations: op id -> time.monotonic() when it completes.
    _due: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    # --- world helpers ---------------------------------------------------------------------

    def set_buddy(self, buddy: dict[str, Any]) -> dict[str, Any]:
        """Insert or replace a buddy (REST JSON); missing fields get defaults."""
        full = buddy_json(buddy["buddy_id"], buddy.get("user_id") or "user_1")
        full.update(copy.deepcopy(buddy))
        self.buddies[full["buddy_id"]] = full
        return full

    def update_buddy(self, buddy_id: str, **changes: Any) -> dict[str, Any]:
        buddy = self.buddies[buddy_id]
        buddy.update(copy.deepcopy(changes))
        buddy["updated_at"] = now_iso()
        return buddy

    def bump_coins(self, buddy_id: str, amount: int) -> int:
        """Change the balance as an earn (+) or spend (-) would; returns the new balance."""
        buddy = self.buddies[buddy_id]
        self.update_buddy(buddy_id, coins=int(buddy.get("coins") or 0) + amount)
        return int(self.buddies[buddy_id]["coins"])

    def set_token(self, buddy_id: str, token_type: str, balance: int) -> None:
        tokens = dict(self.buddies[buddy_id].get("tokens") or {})
        tokens[token_type] = balance
        self.update_buddy(buddy_id, tokens=tokens)

    def award_badge(self, buddy_id: str, badge_id: str, awarded_at: str | None = None) -> None:
        badges = [b for b in self.buddies[buddy_id]["badges"] if b["badge_id"] != badge_id]
        badges.append({"badge_id": badge_id, "awarded_at": awarded_at or now_iso()})
        self.update_buddy(buddy_id, badges=badges)

    def add_egg(
        self, user_id: str, audience: str | None = None, status: str = "incubating"
    ) -> dict[str, Any]:
        egg_id = f"egg_{uuid.uuid4().hex[:12]}"
        egg = {
            "egg_id": egg_id,
            "user_id": user_id,
            "audience": audience,
            "status": status,
            "buddy_id": None,
            "operation_id": None,
            "created_at": now_iso(),
        }
        self.eggs[egg_id] = egg
        return egg

    # --- misbehaviour ----------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        *,
        code: str | None = None,
        details: Any = None,
        route: str | None = None,
        retry_after: float | None = None,
        body: str | None = None,
    ) -> None:
        """The next `n` requests (of `route`, e.g. "GET /buddies/{buddy_id}", if given) fail.

        A 429 carries `Retry-After: retry_after` (default 1). `body` replaces the error
        envelope with a non-JSON text body.
        """
        if status == 429 and retry_after is None:
            retry_after = 1
        self._failures.append(_Failure(n, status, code, details, route, retry_after, body))

    def settle(self) -> None:
        """Complete every pending hatch operation now, whatever its delay."""
        for op_id in list(self._due):
            self._complete(op_id)

    def statuses(self, route: str | None = None) -> Counter[int]:
        return Counter(r.status for r in self.log if route is None or r.route == route)

    # --- the app ---------------------------------------------------------------------------

    def app(self) -> Starlette:
        def route(method: str, path: str, handler: Handler) -> Route:
            return Route(path, self._guard(f"{method} {path}", handler), methods=[method])

        return Starlette(
            routes=[
                route("GET", "/buddies/{buddy_id}", self._get_buddy),
                route("GET", "/buddies", self._list_buddies),
                route("POST", "/eggs", self._create_egg),
                route("PATCH", "/eggs/{egg_id}/status", self._egg_status),
                route("POST", "/eggs/{egg_id}/hatch", self._hatch),
                route("GET", "/operations/{operation_id}", self._get_operation),
                route("POST", "/widget-sessions", self._widget_session),
                route("POST", "/embed-tokens", self._embed_token),
            ]
        )

    def _guard(self, name: str, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            self.calls[name] += 1
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            response = await self._gate(name, request)
            if response is None:
                self._complete_due()
                response = await handler(request)
            self.log.append(CallRecord(time.monotonic(), name, response.status_code))
            return response

        return endpoint

    async def _gate(self, name: str, request: Request) -> Response | None:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "unauthorized", "missing or invalid API key")
        if self.rate_limit_per_min is not None:
            now = time.time()
            index = int(now // self.rate_window_s)
            count = self._window[1] + 1 if self._window[0] == index else 1
            self._window = (index, count)
            if count > self.rate_limit_per_min:
                wait = max(1, math.ceil((index + 1) * self.rate_window_s - now))
                return _error(
                    429,
                    "rate_limited",
                    f"more than {self.rate_limit_per_min} requests in this window",
                    {"limit": self.rate_limit_per_min},
                    headers={"Retry-After": str(wait)},
                )
        for failure in self._failures:
            if failure.remaining > 0 and failure.route in (None, name):
                failure.remaining -= 1
                headers = {}
                if failure.retry_after is not None:
                    headers["Retry-After"] = f"{failure.retry_after:g}"
                if failure.body is not None:
                    return Response(
                        failure.body, failure.status, headers=headers, media_type="text/html"
                    )
                code = failure.code or ("rate_limited" if failure.status == 429 else "internal")
                return _error(failure.status, code, "injected failure", failure.details, headers)
        self._failures = [f for f in self._failures if f.remaining > 0]
        return None

    def _object(self, obj: dict[str, Any], status: int = 200) -> JSONResponse:
        body = {"data": obj} if self.wrap_data else obj
        return JSONResponse(body, status, headers={"X-Request-Id": _request_id()})

    # --- routes ----------------------------------------------------------------------------

    async def _get_buddy(self, request: Request) -> Response:
        buddy = self.buddies.get(request.path_params["buddy_id"])
        if buddy is None:
            return _error(404, "buddy_not_found", "no such buddy")
        return self._object(copy.deepcopy(buddy))

    async def _list_buddies(self, request: Request) -> Response:
        q = request.query_params
        try:
            limit = int(q.get("limit", "20"))
        except ValueError:
            return _error(422, "validation_error", "limit must be an integer")
        limit = max(1, min(limit, self.max_page_size))
        after = None
        if cursor := q.get("cursor"):
            try:
                after = base64.urlsafe_b64decode(cursor.encode()).decode()
            except ValueError:
                return _error(400, "invalid_cursor", "cursor not recognised")
        status = q.get("status")
        rows = [
            b
            for _, b in sorted(self.buddies.items())
            if (after is None or b["buddy_id"] > after)
            and ("user_id" not in q or b.get("user_id") == q["user_id"])
            and ("audience" not in q or b.get("audience") == q["audience"])
            and (status in (None, "all") or b.get("status") == status)
        ]
        page, more = rows[:limit], len(rows) > limit
        next_cursor = (
            base64.urlsafe_b64encode(page[-1]["buddy_id"].encode()).decode() if more else None
        )
        return JSONResponse(
            {"data": copy.deepcopy(page), "meta": {"next_cursor": next_cursor, "has_more": more}},
            headers={"X-Request-Id": _request_id()},
        )

    async def _create_egg(self, request: Request) -> Response:
        body = await _json(request)
        user_id = body.get("user_id")
        if not isinstance(user_id, str) or not user_id:
            return _error(422, "validation_error", "user_id is required")
        audience = body.get("audience")
        if self.no_published_config:
            return _error(
                409,
                "no_published_config",
                "publish a buddy configuration before creating eggs",
                {"publish_url": self.publish_url},
            )
        if request.query_params.get("ensure") == "true":
            mine = [
                e
                for e in self.eggs.values()
                # As Hatched does: never an egg that is hatching (nor a failed one).
                if e["user_id"] == user_id
                and e["audience"] == audience
                and e["status"] not in ("failed", "hatching")
            ]
            if mine:
                return self._object(dict(mine[-1]))
        active = [
            e["egg_id"]
            for e in self.eggs.values()
            if e["user_id"] == user_id and e["status"] in UNHATCHED
        ]
        if self.max_active_eggs is not None and len(active) >= self.max_active_eggs:
            return _error(
                409,
                "active_egg_limit",
                f"user already holds {len(active)} unhatched eggs",
                {"active": active, "limit": self.max_active_eggs},
            )
        return self._object(dict(self.add_egg(user_id, audience)), 201)

    async def _egg_status(self, request: Request) -> Response:
        egg = self.eggs.get(request.path_params["egg_id"])
        if egg is None:
            return _error(404, "egg_not_found", "no such egg")
        body = await _json(request)
        if body.get("status") != "ready":
            return _error(422, "validation_error", "status must be 'ready'")
        if egg["status"] not in ("incubating", "ready"):
            return _error(409, "invalid_egg_state", f"egg is {egg['status']}")
        egg["status"] = "ready"
        return self._object(dict(egg))

    async def _hatch(self, request: Request) -> Response:
        egg = self.eggs.get(request.path_params["egg_id"])
        if egg is None:
            return _error(404, "egg_not_found", "no such egg")
        if egg["operation_id"] is not None:
            op = self.operations[egg["operation_id"]]
            return self._object({"operation_id": op["operation_id"], "status": op["status"]}, 202)
        if egg["status"] != "ready":
            return _error(409, "egg_not_ready", f"egg is {egg['status']}, not ready")
        if self.credits is not None:
            if self.credits <= 0:
                return _error(402, "insufficient_credits", "no hatch credits left on the plan")
            self.credits -= 1
        op_id = f"op_{uuid.uuid4().hex[:12]}"
        self.operations[op_id] = {
            "operation_id": op_id,
            "type": "egg.hatch",
            "status": "pending",
            "egg_id": egg["egg_id"],
            "result": None,
            "error": None,
            "created_at": now_iso(),
        }
        egg["status"], egg["operation_id"] = "hatching", op_id
        self._due[op_id] = time.monotonic() + self.hatch_delay_s
        asyncio.get_running_loop().call_later(self.hatch_delay_s, self._complete, op_id)
        return self._object({"operation_id": op_id, "status": "pending"}, 202)

    async def _get_operation(self, request: Request) -> Response:
        op = self.operations.get(request.path_params["operation_id"])
        if op is None:
            return _error(404, "operation_not_found", "no such operation")
        return self._object(copy.deepcopy(op))

    async def _widget_session(self, request: Request) -> Response:
        body = await _json(request)
        problem = self._owner_problem(body)
        if problem is not None:
            return problem
        scopes, ttl = body.get("scopes"), body.get("ttl_seconds")
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            return _error(422, "validation_error", "scopes must be a list of strings")
        if not isinstance(ttl, int) or not 60 <= ttl <= 86_400:
            return _error(422, "validation_error", "ttl_seconds must be within 60..86400")
        session_id = f"wss_{uuid.uuid4().hex[:12]}"
        session = {
            "token": f"wst_{uuid.uuid4().hex}",
            "session_id": session_id,
            "expires_at": now_iso(datetime.now(UTC) + timedelta(seconds=ttl)),
            "scopes": scopes,
        }
        self.widget_sessions[session_id] = {**session, "buddy_id": body["buddy_id"]}
        return self._object(session, 201)

    async def _embed_token(self, request: Request) -> Response:
        body = await _json(request)
        problem = self._owner_problem(body)
        if problem is not None:
            return problem
        token = {
            "token": f"emb_{uuid.uuid4().hex}",
            "expires_at": now_iso(datetime.now(UTC) + timedelta(hours=1)),
        }
        self.embed_tokens[token["token"]] = {**token, "buddy_id": body["buddy_id"]}
        return self._object(token, 201)

    def _owner_problem(self, body: dict[str, Any]) -> Response | None:
        buddy = self.buddies.get(body.get("buddy_id") or "")
        if buddy is None:
            return _error(404, "buddy_not_found", "no such buddy")
        if buddy.get("user_id") != body.get("user_id"):
            return _error(403, "forbidden", "the buddy belongs to another user")
        return None

    # --- hatching --------------------------------------------------------------------------

    def _complete_due(self) -> None:
        # Timers are the normal path; this covers a loop that was busy when one was due.
        now = time.monotonic()
        for op_id, due in list(self._due.items()):
            if due <= now:
                self._complete(op_id)

    def _complete(self, op_id: str) -> None:
        if self._due.pop(op_id, None) is None:
            return
        op = self.operations[op_id]
        egg = self.eggs[op["egg_id"]]
        if self.fail_hatch:
            op["status"] = "failed"
            op["error"] = {"code": "hatch_failed", "message": "image generation failed"}
            egg["status"], egg["operation_id"] = "ready", None
            return
        buddy_id = f"buddy_{uuid.uuid4().hex[:12]}"
        buddy = self.set_buddy(
            buddy_json(buddy_id, egg["user_id"], egg_id=egg["egg_id"], audience=egg["audience"])
        )
        egg["status"], egg["buddy_id"] = "hatched", buddy_id
        op["status"], op["result"] = "completed", {"buddy_id": buddy_id}
        data = {
            k: buddy[k]
            for k in ("egg_id", "user_id", "name", "image_url", "thumb_url", "evolution_stage")
        }
        if buddy["audience"] is not None:
            data["audience"] = buddy["audience"]
        self.outbox.append(
            OutboxEvent(
                type="buddy.hatched",
                delivery_id=str(uuid.uuid4()),
                buddy_id=buddy_id,
                data=data,
                occurred_at=datetime.now(UTC),
            )
        )


def _request_id() -> str:
    return f"req_{uuid.uuid4().hex[:16]}"


def _error(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    request_id = _request_id()
    body = {
        "error": {
            "code": code,
            "message": message,
            "details": details if details is not None else {},
            "requestId": request_id,
        }
    }
    return JSONResponse(body, status, headers={"X-Request-Id": request_id, **(headers or {})})


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


@contextlib.asynccontextmanager
async def serve_fake(fake: FakeHatched) -> AsyncIterator[str]:
    """Serve `fake` with a real uvicorn on a free port of 127.0.0.1; yields its base URL."""
    from tests.support.running import serving

    async with serving(fake.app()) as url:
        yield url
