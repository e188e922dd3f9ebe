"""The demo page that `hatched-mirror dev` serves at /demo."""

from __future__ import annotations

import base64
import hashlib
import re
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


@cache
def _security_headers() -> dict[str, str]:
    """A strict CSP: the page's own inline script and style by hash, Hatched's widget loader,
    calls to this origin only; never framed (clickjacking), no referrer (the page address may
    hold a token in its fragment, which browsers never send, but be sure)."""
    html = _demo_html()
    hashes = {
        kind: " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
            for body in re.findall(rf"<{kind}>(.*?)</{kind}>", html, re.S)
        )
        for kind in ("script", "style")
    }
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src {hashes['script']} https://cdn.hatched.live",
            f"style-src {hashes['style']}",
            "connect-src 'self'",
            "img-src 'self' https: data:",
            "frame-src https:",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'none'",
        ]
    )
    return {
        "Cache-Control": "no-store",
        "Content-Security-Policy": policy,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


async def demo_page(request: Request) -> Response:
    return HTMLResponse(_demo_html(), headers=_security_headers())


def demo_route() -> Route:
    return Route("/demo", demo_page, methods=["GET"])
