"""Test settings: fixed secrets and tokens, and `make_settings` that reads nothing else.

`make_settings` builds Settings from its arguments alone: neither the developer's environment
(HATCHED_*, MIRROR_*, DATABASE_URL ...) nor a `.env` file in the working directory can change
what a test runs with.
"""

from __future__ import annotations

from typing import Any

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from service.config import Settings

SECRET = "whsec_test_fixture_secret"
SECOND_SECRET = "whsec_second_during_rotation"
API_TOKEN = "test-api-token-0001"
ADMIN_TOKEN = "test-admin-token"
# Fixtures were signed at this time; tests that replay them as recorded pin `now` to it.
FIXTURE_TIME = 1776853800


class _ArgumentsOnly(Settings):
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def make_settings(database_url: str, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "HATCHED_WEBHOOK_SECRETS": f"{SECRET},{SECOND_SECRET}",
        "MIRROR_API_TOKENS": API_TOKEN,
        "MIRROR_ADMIN_TOKENS": ADMIN_TOKEN,
        "MIRROR_SHARDS": "8",
        "MIRROR_SWEEP_AFTER_S": "1",
        "MIRROR_LOG_FORMAT": "console",
    }
    values.update(overrides)
    return _ArgumentsOnly(**values)
