"""`hatched-mirror doctor`: one test per check, each made to pass and to fail for real (a
closed port, an unmigrated database, a key the fake Hatched refuses, a receiver with other
secrets), and the command's exit status."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service import doctor
from service.app import create_app
from service.config import Settings
from tests.support.config import make_settings
from tests.support.databases import scratch_database
from tests.support.fake_hatched import FakeHatched
from tests.support.harness import free_port, run_command, service_env
from tests.support.running import serving

KEY = "hatch_test_doctor_key_0001"


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {check.name: check for check in checks}


@pytest.fixture
def configured(settings: Settings, fake: FakeHatched, fake_url: str) -> Settings:
    fake.api_key = KEY
    return settings.model_copy(update={"hatched_api_url": fake_url, "hatched_api_key": KEY})


async def test_everything_passes_on_a_good_installation(configured: Settings, server: str) -> None:
    checks = await doctor.run_checks(configured, server)
    assert [c for c in checks if not c.ok] == []
    assert set(by_name(checks)) == {
        "postgres",
        "migrations",
        "clock",
        "redis",
        "webhook secrets",
        "hatched key",
        "hatched key works",
        "receiver",
    }


async def test_postgres_unreachable(settings: Settings) -> None:
    dead = settings.model_copy(
        update={"database_url": f"postgresql://postgres@127.0.0.1:{free_port()}/x"}
    )
    (check,) = await doctor.check_postgres(dead)
    assert not check.ok and "cannot connect" in check.detail and "DATABASE_URL" in check.fix


@pytest.fixture
async def empty_database(database_url: str) -> AsyncIterator[str]:
    async with scratch_database(database_url, "hm_doctor") as dsn:
        yield dsn


async def test_migrations_not_applied(empty_database: str, redis_url: str) -> None:
    checks = by_name(await doctor.check_postgres(make_settings(empty_database, redis_url)))
    assert checks["postgres"].ok
    assert not checks["migrations"].ok
    assert "0001_core" in checks["migrations"].detail
    assert "hatched-mirror migrate" in checks["migrations"].fix


async def test_migrations_current(settings: Settings) -> None:
    assert by_name(await doctor.check_postgres(settings))["migrations"].ok


async def test_clock_skew_against_postgres(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert by_name(await doctor.check_postgres(settings))["clock"].ok
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 120)  # this host 2 min ahead
    clock = by_name(await doctor.check_postgres(settings))["clock"]
    assert not clock.ok and clock.detail.startswith("12") and "NTP" in clock.fix


async def test_redis(settings: Settings) -> None:
    assert (await doctor.check_redis(settings)).ok
    dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    check = await doctor.check_redis(dead)
    assert not check.ok and "REDIS_URL" in check.fix


@pytest.mark.parametrize(
    ("secrets", "problem"),
    [
        ([], "empty"),
        (["whsec_x1"], "shorter"),
        ([" whsec_with_a_space_around "], "whitespace"),
        (["whsec_same_secret_twice", "whsec_same_secret_twice"], "twice"),
    ],
)
def test_webhook_secrets_malformed(settings: Settings, secrets: list[str], problem: str) -> None:
    check = doctor.check_secrets(settings.model_copy(update={"webhook_secrets": secrets}))
    assert not check.ok and problem in check.detail
    for secret in secrets:
        assert secret.strip() not in check.detail  # named by position, never printed


def test_webhook_secrets_well_formed(settings: Settings) -> None:
    assert doctor.check_secrets(settings).ok


@pytest.mark.parametrize(
    ("key", "url", "ok"),
    [
        ("hatch_test_abc", "https://api.staging.hatched.example", True),
        ("hatch_live_abc", "https://api.hatched.example", True),
        ("hatch_live_abc", "https://api.staging.hatched.example", False),
        ("hatch_test_abc", "https://api.hatched.example", False),
        ("sk_abc", "https://api.hatched.example", False),
    ],
)
def test_key_environment_against_the_url(key: str, url: str, ok: bool) -> None:
    key_env, url_env = doctor.key_environment(key), doctor.url_environment(url)
    assert (key_env is not None and key_env == url_env) is ok


async def test_hatched_key_of_unknown_form(configured: Settings, fake: FakeHatched) -> None:
    fake.api_key = "sk_other_form"
    checks = by_name(
        await doctor.check_hatched(
            configured.model_copy(update={"hatched_api_key": "sk_other_form"})
        )
    )
    assert not checks["hatched key"].ok and "hatch_test_" in checks["hatched key"].detail
    assert checks["hatched key works"].ok


async def test_hatched_key_refused(configured: Settings, fake: FakeHatched) -> None:
    fake.api_key = "hatch_test_the_real_one"
    checks = by_name(await doctor.check_hatched(configured))
    assert checks["hatched key"].ok
    refused = checks["hatched key works"]
    assert not refused.ok and "401" in refused.detail and "revoked" in refused.fix


async def test_hatched_half_configured(settings: Settings) -> None:
    (check,) = await doctor.check_hatched(
        settings.model_copy(update={"hatched_api_url": "http://127.0.0.1:1"})
    )
    assert not check.ok and "HATCHED_API_KEY" in check.detail


async def test_receiver_refuses_other_secrets(settings: Settings, server: str) -> None:
    other = settings.model_copy(update={"webhook_secrets": ["whsec_not_what_serve_has_0001"]})
    check = await doctor.check_receiver(other, server)
    assert not check.ok and "401" in check.detail and "HATCHED_WEBHOOK_SECRETS" in check.fix
    closed = await doctor.check_receiver(settings, f"http://127.0.0.1:{free_port()}")
    assert not closed.ok


async def test_receiver_accepts_the_test_delivery(settings: Settings, db: Any) -> None:
    async with serving(create_app(settings)) as url:
        check = await doctor.check_receiver(settings, url)
    assert check.ok, check.detail
    stored = await db.fetchval(
        "SELECT count(*) FROM deliveries WHERE event_type = $1", "doctor.ping"
    )
    assert stored == 1
    assert await db.fetchval("SELECT count(*) FROM buddies") == 0  # no buddy changed


async def test_the_command_exits_1_and_says_what_to_fix(migrated: str, redis_url: str) -> None:
    good = await run_command(service_env(migrated, redis_url), "doctor")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "FAIL" not in good.stdout
    env = service_env(migrated, f"redis://127.0.0.1:{free_port()}/0")
    bad = await run_command(env, "doctor")
    assert bad.returncode == 1
    assert "FAIL  redis" in bad.stdout and "fix: check REDIS_URL" in bad.stdout
