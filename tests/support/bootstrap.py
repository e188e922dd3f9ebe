"""Bootstrap tests' helpers: settings with the fake Hatched as REST API, and its webhooks sent."""

from __future__ import annotations

import httpx

from service import store
from service.config import Settings
from service.dev.samples import build_delivery
from tests.support.config import SECRET, make_settings
from tests.support.fake_hatched import DEFAULT_API_KEY, FakeHatched


def with_knobs(settings: Settings, **knobs: float) -> Settings:
    """These MIRROR_BOOTSTRAP_* values for one test."""
    return settings.model_copy(update={f"bootstrap_{k}": v for k, v in knobs.items()})


async def deliver_outbox(http: httpx.AsyncClient, fake: FakeHatched, start: int = 0) -> int:
    """Send what Hatched queued (buddy.hatched after each hatch), signed, to the receiver."""
    for event in fake.outbox[start:]:
        headers, body = build_delivery(
            event.type,
            "v2",
            secret=SECRET,
            buddy_id=event.buddy_id,
            delivery_id=event.delivery_id,
            occurred_at=event.occurred_at,
            data=event.data,
        )
        response = await http.post("/webhooks/hatched", content=body, headers=headers)
        assert response.status_code == 202, response.text
    return len(fake.outbox)


async def configured(migrated: str, redis_url: str, pool: store.Pool, fake_url: str) -> Settings:
    """Settings with the fake Hatched as REST API, and a clean bootstraps table."""
    await pool.execute("TRUNCATE bootstraps")
    settings = make_settings(
        migrated, redis_url, HATCHED_API_URL=fake_url, HATCHED_API_KEY=DEFAULT_API_KEY
    )
    # The fallback poller stays out of the way unless a test asks for it.
    return with_knobs(settings, poll_after_s=60, poll_every_s=0.2, poll_max_s=120)
