"""Fixtures of the integration tests: the service serving, a client for it, a fake Hatched."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from tests.support.fake_hatched import FakeHatched, serve_fake
from tests.support.running import serving


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[str]:
    """The HTTP app for `settings` on a real uvicorn server; its base URL."""
    async with serving(create_app(settings)) as url:
        yield url


@pytest.fixture
async def http(server: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server, timeout=10) as client:
        yield client


@pytest.fixture
def fake() -> FakeHatched:
    """A fake Hatched holding the ground truth; mutate it freely, also while it serves."""
    return FakeHatched()


@pytest.fixture
async def fake_url(fake: FakeHatched) -> AsyncIterator[str]:
    async with serve_fake(fake) as url:
        yield url
