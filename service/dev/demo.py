"""The demo page that `hatched-mirror dev` serves at /demo."""

from __future__ import annotations

from functools import cache
from importlib import resources

import structlog
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

log = structlog.get_logger(__name__)


# --- the demo page (`hatched-mirror dev` only) ---------------------------------------------


@cache
def _demo_html() -> str:
    return resources.files("service.dev.static").joinpath("demo.html").read_text(encoding="utf-8")


async def demo_page(request: Request) -> Response:
    return HTMLResponse(_demo_html(), headers={"Cache-Control": "no-store"})


def demo_route() -> Route:
    return Route("/demo", demo_page, methods=["GET"])
