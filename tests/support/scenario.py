"""A plausible day of a learning app, as signed deliveries, and what the mirror must make of it."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from service import store
from service.apply.projector import Buddy, project
from service.dev.samples import build_delivery
from service.ingest.events import Event, parse_delivery
from service.ingest.signatures import verify
from tests.support.config import SECRET

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def learning_day(buddies: int, per_buddy: int, rng: random.Random) -> list[dict[str, Any]]:
    """A plausible stream per buddy, in the order it happened, with consistent balances."""
    out: list[dict[str, Any]] = []
    clock = 0
    for b in range(buddies):
        buddy_id = f"buddy_{b:04d}"
        coins, gems, stage, streak = 0, 0, 1, 0
        clock += 1
        out.append(
            {
                "type": "buddy.hatched",
                "buddy_id": buddy_id,
                "at": clock,
                "data": {"user_id": f"user_{b}", "name": f"Pip {b}", "evolution_stage": 1},
            }
        )
        for _ in range(per_buddy - 1):
            clock += 1
            kind = rng.choice(
                [
                    "coins.earned",
                    "coins.earned",
                    "coins.spent",
                    "token.earned",
                    "skill.leveled",
                    "streak.ticked",
                    "streak.milestone",
                    "badge.awarded",
                    "badge.ready",
                    "buddy.evolved",
                    "marketplace.purchased",
                    "marketplace.equipped",
                    "marketplace.unequipped",
                    "skill.decayed",
                    "token.spent",
                ]
            )
            data: dict[str, Any]
            if kind == "coins.earned":
                amount = rng.randint(1, 50)
                coins += amount
                data = {"amount": amount, "balance": coins, "reason": "lesson_completed"}
            elif kind == "coins.spent":
                amount = rng.randint(0, coins)
                coins -= amount
                data = {"amount": amount, "balance": coins, "reason": "marketplace_purchase"}
            elif kind in ("token.earned", "token.spent"):
                amount = rng.randint(0, 3) if kind == "token.earned" else rng.randint(0, gems)
                gems += amount if kind == "token.earned" else -amount
                data = {"token_type": "gem", "amount": amount, "balance": gems}
            elif kind == "skill.leveled":
                data = {
                    "skill_key": rng.choice(["grammar", "vocabulary"]),
                    "from_level": 1,
                    "to_level": rng.randint(2, 9),
                    "value": rng.randint(1, 99),
                }
            elif kind == "skill.decayed":
                data = {
                    "skill_key": rng.choice(["grammar", "vocabulary"]),
                    "previous_value": 50,
                    "new_value": rng.randint(1, 49),
                }
            elif kind.startswith("streak."):
                streak += 1
                data = {"streak_key": "daily_lesson", "count": streak, "milestone": streak}
            elif kind.startswith("badge."):
                data = {"badge_id": rng.choice(["badge_a", "badge_b"])}
            elif kind == "buddy.evolved":
                stage += 1
                data = {
                    "previous_stage": stage - 1,
                    "new_stage": stage,
                    "image_url": f"https://cdn.example/{buddy_id}/{stage}.png",
                }
            else:
                data = {"item_id": rng.choice(["item_hat", "item_scarf", "item_cape"])}
            out.append({"type": kind, "buddy_id": buddy_id, "at": clock, "data": data})
    return out


def expected_states(deliveries: list[tuple[dict[str, str], bytes]]) -> dict[str, Buddy]:
    """What the projector makes of the events in the order they happened."""
    events: list[Event] = []
    for headers, body in deliveries:
        lower = {k.lower(): v for k, v in headers.items()}
        verified = verify(body, lower, [SECRET], datetime.now(UTC).timestamp(), 3600)
        signed_at = datetime.fromtimestamp(verified.timestamp, UTC)
        parsed = parse_delivery(body, lower, verified.format, signed_at)
        assert parsed.event is not None
        events.append(parsed.event)
    by_buddy: dict[str, list[Event]] = defaultdict(list)
    for event in sorted(events, key=lambda e: e.occurred_at):
        by_buddy[event.buddy_id].append(event)
    return {
        buddy_id: project(None, buddy_id, list(enumerate(evs))).buddy
        for buddy_id, evs in by_buddy.items()
    }


def signed(
    stream: list[dict[str, Any]], fmt: Literal["v1", "v2", "mixed"], rng: random.Random
) -> list[tuple[dict[str, str], bytes]]:
    """Sign each event of `stream`; v2 carries its time in an `occurred_at` payload field."""
    out = []
    for item in stream:
        occurred = T0 + timedelta(seconds=item["at"])
        data = dict(item["data"])
        wire = fmt if fmt != "mixed" else rng.choice(["v1", "v2"])
        if wire == "v2":
            data["occurred_at"] = occurred.isoformat().replace("+00:00", "Z")
        out.append(
            build_delivery(
                item["type"],
                "v1" if wire == "v1" else "v2",
                secret=SECRET,
                buddy_id=item["buddy_id"],
                occurred_at=occurred,
                data=data,
            )
        )
    return out


async def mirrored_states(pool: store.Pool) -> dict[str, Buddy]:
    out = {}
    for buddy_id in [r["buddy_id"] for r in await pool.fetch("SELECT buddy_id FROM buddies")]:
        found = await store.get_buddy(pool, buddy_id)
        assert found is not None
        out[buddy_id] = found[0]
    return out
