"""A subscription's endpoint for the tests: records every POST, verifies it as a Standard
Webhooks receiver would, and answers as told (fail for a while, slowly, redirect)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@dataclass
class Received:
    webhook_id: str
    change: dict[str, Any]
    status: int
    at: float


@dataclass
class Subscriber:
    """`answer`: the status to answer with now; `delay_s`: how long each answer takes."""

    secret: str = ""
    answer: int = 200
    delay_s: float = 0.0
    location: str | None = None
    requests: list[Received] = field(default_factory=list)
    # Per buddy, the version last acknowledged: a change may only come after its predecessor.
    acked: dict[str, int] = field(default_factory=dict)
    out_of_order: list[str] = field(default_factory=list)
    # webhook-ids being answered right now, and any that arrived while already in flight.
    in_flight: Counter[str] = field(default_factory=Counter)
    concurrent: list[str] = field(default_factory=list)
    unverified: int = 0
    redirected_to: int = 0

    def delivered(self) -> dict[str, dict[str, Any]]:
        """The changes acknowledged, by webhook-id."""
        return {r.webhook_id: r.change for r in self.requests if 200 <= r.status < 300}

    def app(self) -> Starlette:
        async def receive(request: Request) -> Response:
            body = await request.body()
            headers = dict(request.headers)
            webhook_id = headers.get("webhook-id", "")
            try:
                Webhook(self.secret).verify(body, headers)
            except Exception:
                self.unverified += 1
                return Response(status_code=400)
            self.in_flight[webhook_id] += 1
            if self.in_flight[webhook_id] > 1:
                self.concurrent.append(webhook_id)
            try:
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                change = orjson.loads(body)
                status = self.answer
                if 200 <= status < 300:
                    buddy, version = change["buddy_id"], change["version"]
                    last = self.acked.get(buddy)
                    if last is not None and version not in (last, last + 1):
                        self.out_of_order.append(f"{buddy}: {version} after {last}")
                    self.acked[buddy] = max(version, last or 0)
                self.requests.append(Received(webhook_id, change, status, time.time()))
                headers_out = {"location": self.location} if self.location else None
                return Response(status_code=status, headers=headers_out)
            finally:
                self.in_flight[webhook_id] -= 1

        async def elsewhere(request: Request) -> Response:
            self.redirected_to += 1
            return Response(status_code=200)

        return Starlette(
            routes=[
                Route("/hook", receive, methods=["POST"]),
                Route("/elsewhere", elsewhere, methods=["POST", "GET"]),
            ]
        )
