"""A subscription's endpoint for the benchmark, as its own process: answers every POST with 204
at once and, when stopped, writes one line per request (webhook-id, committed_at of the change,
time received) to --out.

    python -m bench.endpoint --port P --out FILE
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def app(out: Path) -> Starlette:
    seen: list[tuple[str, float, float]] = []

    async def hook(request: Request) -> Response:
        body = await request.body()
        received = time.time()
        committed = datetime.fromisoformat(orjson.loads(body)["committed_at"]).timestamp()
        seen.append((request.headers.get("webhook-id", ""), committed, received))
        return Response(status_code=204)

    async def healthz(request: Request) -> Response:
        return Response(status_code=200)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        data = b"".join(orjson.dumps(row) + b"\n" for row in seen)
        await asyncio.to_thread(out.write_bytes, data)

    return Starlette(
        routes=[Route("/hook", hook, methods=["POST"]), Route("/healthz", healthz)],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    uvicorn.run(
        app(args.out), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
