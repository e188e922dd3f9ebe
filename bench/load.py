"""The load generator: a learning app's event mix, signed as Hatched signs it.

`python -m bench.load SPEC.json` is the load process. It runs apart from the orchestrator and
the servers so it shares no GIL with them, pre-signs every request before the clock starts (so
HMAC and JSON cost never pollute a measurement) and prints one JSON line of results.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import wire
from bench.probe import Prober
from service.dev.samples import build_delivery

# Relative weights per event type: a language-learning app where most traffic is lesson
# rewards (coins, skills, streak ticks) and the rare events (evolutions, items, hatching)
# still show up often enough to exercise their code paths.
MIX: dict[str, int] = {
    "coins.earned": 30,
    "skill.leveled": 14,
    "streak.ticked": 14,
    "coins.spent": 5,
    "skill.decayed": 4,
    "token.earned": 4,
    "badge.awarded": 4,
    "badge.ready": 3,
    "streak.milestone": 3,
    "marketplace.purchased": 3,
    "marketplace.equipped": 3,
    "token.spent": 2,
    "streak.burned": 2,
    "buddy.evolved": 2,
    "marketplace.unequipped": 1,
    "buddy.hatched": 1,
}
FORMATS = ("v2", "v1", "mixed")
# Share of v1 deliveries in the "mixed" format: Hatched still sends v1 to older endpoints.
V1_SHARE = 0.3
SKILLS = ("pronunciation", "vocabulary", "grammar", "listening", "speaking")
BADGES = tuple(f"badge_{n}" for n in ("first_lesson", "week_warrior", "polyglot", "night_owl"))
ITEMS = ("item_cowboy_hat", "item_scarf", "item_glasses", "item_cape", "item_crown")
NAMES = ("Pip", "Mochi", "Sprout", "Nova", "Biscuit")


def buddy_ids(count: int, start: int = 0) -> list[str]:
    """Stable ids, so the orchestrator, the SQL fill and the load process name the same buddies."""
    return [f"bench_buddy_{i:07d}" for i in range(start, start + count)]


@dataclass
class _Buddy:
    """What the generator remembers per buddy, so balances, streaks and stages stay plausible."""

    coins: int = 100
    gems: int = 3
    streak: int = 0
    stage: int = 1
    skills: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Delivery:
    event_type: str
    buddy_id: str
    headers: dict[str, str]
    body: bytes


class Generator:
    """Deterministic for a seed: the same spec signs the same event sequence (ids aside)."""

    def __init__(self, buddies: Sequence[str], secret: str, fmt: str, seed: int) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
        self._buddies = buddies
        self._secret = secret
        self._fmt = fmt
        self._rng = random.Random(seed)
        self._state: dict[str, _Buddy] = {}
        self._types = list(MIX)
        self._weights = list(MIX.values())
        self._count = 0

    def hatched(self, buddy_id: str, timestamp: int) -> Delivery:
        return self._sign(
            "buddy.hatched", buddy_id, self._data("buddy.hatched", buddy_id), timestamp
        )

    def next(self, timestamp: int) -> Delivery:
        rng = self._rng
        event_type = rng.choices(self._types, self._weights)[0]
        buddy_id = self._buddies[rng.randrange(len(self._buddies))]
        if event_type == "coins.spent" and self._state.setdefault(buddy_id, _Buddy()).coins < 50:
            event_type = "coins.earned"  # nobody spends coins they do not have
        return self._sign(event_type, buddy_id, self._data(event_type, buddy_id), timestamp)

    def _sign(self, event_type: str, buddy_id: str, data: dict[str, Any], ts: int) -> Delivery:
        fmt = self._fmt
        # Every request is signed with the same timestamp: without a field of its own, two
        # events alike (the same badge of the same buddy) would be byte-identical, and the
        # receiver rightly takes a repeated signature for a replay. Hatched's events differ.
        self._count += 1
        data = {**data, "sequence": self._count}
        if fmt == "mixed":
            fmt = "v1" if self._rng.random() < V1_SHARE else "v2"
        headers, body = build_delivery(
            event_type,
            "v1" if fmt == "v1" else "v2",
            secret=self._secret,
            buddy_id=buddy_id,
            timestamp=ts,
            data=data,
        )
        return Delivery(event_type, buddy_id, headers, body)

    def _data(self, event_type: str, buddy_id: str) -> dict[str, Any]:
        rng = self._rng
        b = self._state.setdefault(buddy_id, _Buddy())
        family = event_type.partition(".")[0]
        if event_type == "coins.earned":
            amount = rng.randint(1, 20)
            b.coins += amount
            return {"amount": amount, "balance": b.coins, "reason": "lesson_completed"}
        if event_type == "coins.spent":
            b.coins -= 50
            return {"amount": 50, "balance": b.coins, "reason": "marketplace_purchase"}
        if family == "token":
            amount = 1 if event_type == "token.earned" or b.gems < 2 else 2
            b.gems += amount if event_type == "token.earned" else -amount
            return {"token_type": "gem", "amount": amount, "balance": b.gems}
        if family == "skill":
            key = rng.choice(SKILLS)
            value = b.skills.get(key, 40)
            if event_type == "skill.decayed":
                b.skills[key] = max(0, value - 5)
                return {"skill_key": key, "previous_value": value, "new_value": b.skills[key]}
            b.skills[key] = value + rng.randint(1, 10)
            level = b.skills[key] // 20
            return {"skill_key": key, "from_level": level - 1, "to_level": level, "value": value}
        if family == "streak":
            b.streak = 0 if event_type == "streak.burned" else b.streak + 1
            return {"streak_key": "daily_lesson", "count": b.streak, "milestone": 7}
        if family == "badge":
            return {"badge_id": rng.choice(BADGES)}
        if family == "marketplace":
            return {"item_id": rng.choice(ITEMS)}
        if event_type == "buddy.evolved":
            b.stage = min(b.stage + 1, 5)
            return {"previous_stage": b.stage - 1, "new_stage": b.stage}
        return {"name": rng.choice(NAMES), "user_id": f"user_{buddy_id[-7:]}"}


def make_deliveries(
    count: int,
    buddies: Sequence[str],
    *,
    secret: str,
    fmt: str = "mixed",
    seed: int = 1,
    timestamp: int | None = None,
) -> list[Delivery]:
    gen = Generator(buddies, secret, fmt, seed)
    ts = int(time.time()) if timestamp is None else timestamp
    return [gen.next(ts) for _ in range(count)]


def _post_requests(spec: dict[str, Any]) -> list[bytes]:
    # Closed loop: enough for `max_rate` req/s, well above what one uvicorn process takes here
    # with a database behind it; a run that uses them all up says so ("exhausted").
    count = spec.get("count") or int(
        (spec["duration"] + spec.get("warmup", 0)) * spec.get("max_rate", 12_000)
    )
    deliveries = make_deliveries(
        count,
        buddy_ids(spec["buddies"]),
        secret=spec["secret"],
        fmt=spec.get("format", "mixed"),
        seed=spec.get("seed", 1),
    )
    return [wire.raw_request("POST", "/webhooks/hatched", d.headers, d.body) for d in deliveries]


def _get_requests(spec: dict[str, Any]) -> list[bytes]:
    auth = {"Authorization": f"Bearer {spec['token']}"} if spec.get("token") else {}
    out = []
    for path, etag, *token in orjson.loads(Path(spec["targets_file"]).read_bytes()):
        # A third element is that target's own bearer token (a user token for its buddy's user).
        headers = {"Authorization": f"Bearer {token[0]}"} if token else dict(auth)
        if etag and spec.get("conditional"):
            headers["If-None-Match"] = etag
        out.append(wire.raw_request("GET", path, headers))
    random.Random(spec.get("seed", 1)).shuffle(out)
    return out


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    kind = spec["kind"]
    requests = _post_requests(spec) if kind == "post" else _get_requests(spec)
    prepared_s = time.perf_counter() - started
    expect = (202,) if kind == "post" else (200, 304)
    target = wire.Target(spec["host"], spec["port"], expect)
    if spec["mode"] == "closed":
        result = await wire.closed_loop(
            target,
            requests,
            concurrency=spec["concurrency"],
            duration=spec["duration"],
            warmup=spec.get("warmup", 0.0),
            cycle=spec.get("cycle", kind != "post"),
        )
    else:
        prober = None
        if spec.get("probe_every"):
            prober = Prober(
                target,
                secret=spec["secret"],
                token=spec["token"],
                via=spec.get("probe_via", "sse"),
                buddies=buddy_ids(spec["buddies"]),
                timeout=spec.get("probe_timeout", 10.0),
                seed=spec.get("seed", 1),
            )
            await prober.open()
        result = await wire.open_loop(
            target,
            requests,
            rate=spec["rate"],
            duration=spec["duration"],
            warmup=spec.get("warmup", 0.0),
            max_conns=spec.get("max_conns", 1024),
            pre_open=spec.get("concurrency", 64),
            probe=prober.probe if prober else None,
            probe_every=spec.get("probe_every", 0),
        )
        if prober is not None:
            result["probe"] = await prober.summary()
    result["prepared"] = len(requests)
    result["prepare_s"] = round(prepared_s, 2)
    return result


def main() -> None:
    spec = orjson.loads(Path(sys.argv[1]).read_bytes())
    try:
        import uvloop
    except ImportError:  # the stdlib loop only makes the generator heavier, not wrong
        result = asyncio.run(run(spec))
    else:
        result = uvloop.run(run(spec))
    print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    main()
