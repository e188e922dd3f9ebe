"""One settings object, read from the environment (and `.env`), built once and passed in."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Comma-separated lists arrive as plain strings; NoDecode stops pydantic-settings from
# trying to read them as JSON first.
CsvList = Annotated[list[str], NoDecode]
# The shortest webhook secret or bearer token accepted.
MIN_SECRET_CHARS = 16


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every variable of the contract, plus the bounds the service runs within."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    redis_url: str | None = Field(default=None, alias="REDIS_URL")
    webhook_secrets: CsvList = Field(default_factory=list, alias="HATCHED_WEBHOOK_SECRETS")
    signature_tolerance_s: int = Field(default=300, ge=1, alias="HATCHED_SIGNATURE_TOLERANCE_S")
    api_tokens: CsvList = Field(default_factory=list, alias="MIRROR_API_TOKENS")
    admin_tokens: CsvList = Field(default_factory=list, alias="MIRROR_ADMIN_TOKENS")
    hatched_api_url: str | None = Field(default=None, alias="HATCHED_API_URL")
    hatched_api_key: str | None = Field(default=None, alias="HATCHED_API_KEY")
    hatched_api_rate_per_min: int = Field(default=100, ge=1, alias="HATCHED_API_RATE_PER_MIN")
    hatched_api_timeout_s: float = Field(default=10.0, gt=0, alias="HATCHED_API_TIMEOUT_S")
    cors_origins: CsvList = Field(default_factory=list, alias="MIRROR_CORS_ORIGINS")
    max_body_bytes: int = Field(default=1_048_576, ge=1024, alias="MIRROR_MAX_BODY_BYTES")
    changes_retention_days: float = Field(default=7.0, gt=0, alias="MIRROR_CHANGES_RETENTION_DAYS")
    user_token_secrets: CsvList = Field(default_factory=list, alias="MIRROR_USER_TOKEN_SECRETS")
    user_token_max_ttl_s: int = Field(default=86_400, ge=1, alias="MIRROR_USER_TOKEN_MAX_TTL_S")

    # Additions to the contract (documented in the README).
    shards: int = Field(default=32, ge=1, le=4096, alias="MIRROR_SHARDS")
    apply_batch_size: int = Field(default=500, ge=1, le=10_000, alias="MIRROR_APPLY_BATCH_SIZE")
    apply_max_attempts: int = Field(default=8, ge=1, le=100, alias="MIRROR_APPLY_MAX_ATTEMPTS")
    apply_backoff_s: float = Field(default=2.0, ge=0, alias="MIRROR_APPLY_BACKOFF_S")
    # Off: the apply path writes no change-feed entries (nor computes their diffs); versions
    # and live buddy streams are unchanged, the feed routes answer with an empty feed.
    changes_enabled: bool = Field(default=True, alias="MIRROR_CHANGES_ENABLED")
    retention_days: float = Field(default=30.0, gt=0, alias="MIRROR_RETENTION_DAYS")
    prune_batch_size: int = Field(default=5000, ge=1, alias="MIRROR_PRUNE_BATCH_SIZE")
    worker_metrics_port: int = Field(
        default=9101, ge=0, le=65535, alias="MIRROR_WORKER_METRICS_PORT"
    )
    refresh_settle_s: float = Field(default=30.0, ge=0, alias="MIRROR_REFRESH_SETTLE_S")
    reconcile_after_s: float = Field(default=0.0, ge=0, alias="MIRROR_RECONCILE_AFTER_S")
    bootstrap_poll_after_s: float = Field(default=10.0, ge=0, alias="MIRROR_BOOTSTRAP_POLL_AFTER_S")
    bootstrap_poll_every_s: float = Field(
        default=2.0, ge=0.5, alias="MIRROR_BOOTSTRAP_POLL_EVERY_S"
    )
    bootstrap_poll_max_s: float = Field(default=120.0, gt=0, alias="MIRROR_BOOTSTRAP_POLL_MAX_S")
    sweep_after_s: float = Field(default=2.0, gt=0, alias="MIRROR_SWEEP_AFTER_S")
    worker_poll_s: float = Field(default=0.02, gt=0, le=5, alias="MIRROR_WORKER_POLL_S")
    db_pool_size: int = Field(default=10, ge=1, le=200, alias="MIRROR_DB_POOL_SIZE")
    db_timeout_s: float = Field(default=2.0, gt=0, alias="MIRROR_DB_TIMEOUT_S")
    redis_timeout_s: float = Field(default=0.5, gt=0, alias="MIRROR_REDIS_TIMEOUT_S")
    queue_name: str = Field(default="hatched-mirror", min_length=1, alias="MIRROR_QUEUE_NAME")
    read_cache_size: int = Field(default=10_000, ge=0, alias="MIRROR_READ_CACHE_SIZE")
    stream_max_clients: int = Field(default=1000, ge=1, alias="MIRROR_STREAM_MAX_CLIENTS")
    stream_ping_s: float = Field(default=15.0, gt=0, alias="MIRROR_STREAM_PING_S")
    log_format: str = Field(default="json", pattern="^(json|console)$", alias="MIRROR_LOG_FORMAT")
    # Server limits `serve` enforces itself, so a bare `serve` exposed directly stays bounded.
    max_header_bytes: int = Field(
        default=65_536, ge=4096, le=16_777_216, alias="MIRROR_MAX_HEADER_BYTES"
    )
    body_timeout_s: float = Field(default=10.0, gt=0, le=300, alias="MIRROR_BODY_TIMEOUT_S")
    keepalive_timeout_s: int = Field(default=5, ge=1, le=600, alias="MIRROR_KEEPALIVE_TIMEOUT_S")
    max_connections: int = Field(default=2048, ge=1, alias="MIRROR_MAX_CONNECTIONS")
    forwarded_allow_ips: str = Field(default="127.0.0.1", alias="MIRROR_FORWARDED_ALLOW_IPS")
    # Subscriptions (the change feed pushed to internal endpoints; service/subscriptions/).
    subscriptions_max: int = Field(default=100, ge=0, le=10_000, alias="MIRROR_SUBSCRIPTIONS_MAX")
    subscription_timeout_s: float = Field(
        default=10.0, gt=0, le=120, alias="MIRROR_SUBSCRIPTION_TIMEOUT_S"
    )
    subscription_max_in_flight: int = Field(
        default=64, ge=1, le=1000, alias="MIRROR_SUBSCRIPTION_MAX_IN_FLIGHT"
    )
    subscription_backoff_s: float = Field(
        default=1.0, gt=0, le=3600, alias="MIRROR_SUBSCRIPTION_BACKOFF_S"
    )
    subscription_backoff_max_s: float = Field(
        default=600.0, gt=0, le=86_400, alias="MIRROR_SUBSCRIPTION_BACKOFF_MAX_S"
    )
    subscription_disable_after_s: float = Field(
        default=86_400.0, gt=0, alias="MIRROR_SUBSCRIPTION_DISABLE_AFTER_S"
    )

    @field_validator("webhook_secrets", "api_tokens", "admin_tokens", "cors_origins", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("user_token_secrets", mode="before")
    @classmethod
    def _user_token_secrets(cls, value: Any) -> Any:
        secrets = _split_csv(value)
        # RFC 7518 3.2: an HS256 key must be at least as long as the hash, 32 bytes.
        if isinstance(secrets, list) and any(len(str(s).encode()) < 32 for s in secrets):
            raise ValueError("every key must be at least 32 bytes")
        return secrets

    @field_validator("webhook_secrets", "api_tokens", "admin_tokens")
    @classmethod
    def _long_enough(cls, value: list[str]) -> list[str]:
        # A short secret or token can be guessed; the field name is added by load_settings.
        short = [i + 1 for i, v in enumerate(value) if len(v) < MIN_SECRET_CHARS]
        if short:
            entries = ", ".join(f"#{i}" for i in short)
            raise ValueError(f"entry {entries} is shorter than {MIN_SECRET_CHARS} characters")
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_dsn(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgres://", "postgresql://")):
            raise ValueError("must be a postgresql:// DSN")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_dsn(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// URL")
        return value

    @property
    def bootstrap_stalled_after_s(self) -> float:
        """A hatch whose poll is this overdue lost its job; the cron polls it."""
        return max(3 * self.bootstrap_poll_every_s, 5.0)

    @property
    def postgres_dsn(self) -> str:
        """DATABASE_URL, for code that only runs once a command has required it."""
        if self.database_url is None:
            raise ConfigError("DATABASE_URL is not set")
        return self.database_url

    @property
    def redis_dsn(self) -> str:
        """REDIS_URL, for code that only runs once a command has required it."""
        if self.redis_url is None:
            raise ConfigError("REDIS_URL is not set")
        return self.redis_url

    @property
    def hatched_api_enabled(self) -> bool:
        return bool(self.hatched_api_url and self.hatched_api_key)


# What each command cannot run without; checked before anything starts.
REQUIRED = {
    "serve": ("DATABASE_URL", "REDIS_URL", "HATCHED_WEBHOOK_SECRETS", "MIRROR_API_TOKENS"),
    "worker": ("DATABASE_URL", "REDIS_URL"),
    "migrate": ("DATABASE_URL",),
}


class ConfigError(Exception):
    """A missing or malformed variable; the message names it."""


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        aliases = {n: f.alias for n, f in Settings.model_fields.items() if f.alias}
        for err in exc.errors():
            name = ".".join(aliases.get(str(part), str(part)) for part in err["loc"])
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def require(settings: Settings, command: str) -> None:
    """Refuse to start half-configured: name every variable the command still needs."""
    fields = {f.alias: name for name, f in Settings.model_fields.items() if f.alias}
    missing = [var for var in REQUIRED.get(command, ()) if not getattr(settings, fields[var])]
    if missing:
        raise ConfigError(f"`{command}` needs {', '.join(missing)} (missing or empty)")
