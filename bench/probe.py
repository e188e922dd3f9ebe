"""The freshness probe: time from a delivery's 202 to its change being visible to a reader.

Each probe sends one `coins.earned` whose balance no other delivery carries and whose
`occurred_at` is later than any pre-signed delivery, so the projector must show exactly that
balance once it is applied; the probe then watches the buddy through the SSE stream (opened
before the POST) or by polling GET with If-None-Match every 5 ms.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from bench import wire
from service.dev.samples import build_delivery

POLL_S = 0.005
# Far above any balance the generator produces, so a match can only be this probe's event.
BALANCE_BASE = 1_000_000_000


def _coins(doc: bytes | str) -> object:
    try:
        parsed = orjson.loads(doc)
    except orjson.JSONDecodeError:
        return None
    return parsed.get("coins") if isinstance(parsed, dict) else None


class Prober:
    def __init__(
        self,
        target: wire.Target,
        *,
        secret: str,
        token: str,
        via: str,
        buddies: Sequence[str],
        timeout: float,
        seed: int,
    ) -> None:
        if via not in ("sse", "poll"):
            raise ValueError(f"probe via must be sse or poll, not {via!r}")
        self._target = target
        self._secret = secret
        self._auth = {"Authorization": f"Bearer {token}"}
        self._via = via
        self._timeout = timeout
        # Distinct buddies per probe (as long as there are enough), so probes never overlap.
        self._buddies = list(buddies)
        random.Random(seed + 7).shuffle(self._buddies)
        self._count = 0
        self.delays: list[float] = []
        self.ack: list[float] = []
        self.timeouts = 0
        self.errors: Counter[str] = Counter()
        self._client: httpx.AsyncClient | None = None

    def _delivery(self, buddy_id: str, balance: int) -> bytes:
        now = time.time()
        when = datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")
        headers, body = build_delivery(
            "coins.earned",
            "v2",
            secret=self._secret,
            buddy_id=buddy_id,
            timestamp=int(now),
            data={"amount": 1, "balance": balance, "occurred_at": when},
        )
        return wire.raw_request("POST", "/webhooks/hatched", headers, body)

    async def _post(self, pool: wire.Pool, raw: bytes) -> float | None:
        sent = time.perf_counter()
        status, _, _ = await pool.request(raw)
        acked = time.perf_counter()
        if status != 202:
            self.errors[f"post_{status}"] += 1
            return None
        self.ack.append(acked - sent)
        return acked

    async def open(self) -> None:
        """Before the clock: building an httpx client takes tens of ms (an SSL context even
        for plain HTTP), which would stall the sender and show up as queueing."""
        if self._via == "sse":
            self._client = httpx.AsyncClient(
                base_url=f"http://{self._target.host}:{self._target.port}",
                timeout=httpx.Timeout(self._timeout),
                limits=httpx.Limits(max_connections=500, max_keepalive_connections=50),
            )

    async def probe(self, pool: wire.Pool, due: float) -> None:
        self._count += 1
        buddy_id = self._buddies[self._count % len(self._buddies)]
        balance = BALANCE_BASE + self._count
        try:
            async with asyncio.timeout(self._timeout):
                if self._via == "sse":
                    await self._via_sse(pool, buddy_id, balance)
                else:
                    await self._via_poll(pool, buddy_id, balance)
        except TimeoutError:
            self.timeouts += 1
        except (httpx.HTTPError, wire.ConnectionLost, OSError) as exc:
            self.errors[type(exc).__name__] += 1

    async def _via_sse(self, pool: wire.Pool, buddy_id: str, balance: int) -> None:
        assert self._client is not None, "call open() first"
        url = f"/v1/buddies/{buddy_id}/stream"
        async with self._client.stream("GET", url, headers=self._auth) as response:
            if response.status_code != 200:
                self.errors[f"stream_{response.status_code}"] += 1
                return
            # The stream subscribes before it reads the buddy, so a change applied between
            # here and the subscription still arrives: as the first event.
            acked = await self._post(pool, self._delivery(buddy_id, balance))
            if acked is None:
                return
            async for line in response.aiter_lines():
                if line.startswith("data:") and _coins(line[5:]) == balance:
                    self.delays.append(time.perf_counter() - acked)
                    return

    async def _via_poll(self, pool: wire.Pool, buddy_id: str, balance: int) -> None:
        conn = await self._target.connect()
        try:
            path = f"/v1/buddies/{buddy_id}"
            _, head, _ = await conn.request(wire.raw_request("GET", path, self._auth))
            etag = wire.header(head, b"etag")
            acked = await self._post(pool, self._delivery(buddy_id, balance))
            if acked is None:
                return
            while True:
                headers = dict(self._auth)
                if etag:
                    headers["If-None-Match"] = etag.decode("latin-1")
                status, head, body = await conn.request(wire.raw_request("GET", path, headers))
                if status == 200:
                    etag = wire.header(head, b"etag")
                    if _coins(body) == balance:
                        self.delays.append(time.perf_counter() - acked)
                        return
                await asyncio.sleep(POLL_S)
        finally:
            conn.close()

    async def summary(self) -> dict[str, Any]:
        if self._client is not None:
            await self._client.aclose()
        return {
            "via": self._via,
            "probes": self._count,
            "seen": len(self.delays),
            "timeouts": self.timeouts,
            "errors": dict(self.errors),
            "freshness_ms": wire.percentiles(self.delays),
            "probe_ack_ms": wire.percentiles(self.ack),
        }
