"""`hatched-mirror doctor`: checks an installation the way an operator would, and says what to
fix for each thing that is wrong. Read-only, except the optional test delivery (--url), which
the receiver stores like any other (as `unmapped`: no buddy changes)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
import httpx
import orjson
import redis.asyncio as aioredis

from service.config import Settings
from service.hatched.client import HatchedAPI
from service.hatched.errors import HatchedAPIError
from service.ingest.signatures import signature_headers
from service.store.migrations import migration_files

# Past this the clock is worth fixing; past HATCHED_SIGNATURE_TOLERANCE_S deliveries fail.
MAX_SKEW_S = 10.0
MIN_SECRET_LENGTH = 16
DOCTOR_EVENT = "doctor.ping"
KEY_PREFIXES = {"staging": "hatch_test_", "production": "hatch_live_"}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def render(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<18} {check.detail}")
        if not check.ok and check.fix:
            lines.append(f"      {'':<18} fix: {check.fix}")
    return "\n".join(lines)


async def run_checks(settings: Settings, url: str | None = None) -> list[Check]:
    checks = await check_postgres(settings)
    checks.append(await check_redis(settings))
    checks.append(check_secrets(settings))
    checks += await check_hatched(settings)
    if url:
        checks.append(await check_receiver(settings, url))
    return checks


async def check_postgres(settings: Settings) -> list[Check]:
    """Reachable; every migration of this release applied; the clock agrees with its now()."""
    if not settings.database_url:
        return [Check("postgres", False, "DATABASE_URL is not set", "set DATABASE_URL")]
    try:
        conn = await asyncpg.connect(settings.postgres_dsn, timeout=settings.db_timeout_s)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        return [
            Check(
                "postgres",
                False,
                f"cannot connect: {exc.__class__.__name__}: {exc}",
                "check DATABASE_URL (host, port, user, password, database) and that it runs",
            )
        ]
    try:
        sent = time.time()
        now = await conn.fetchval("SELECT extract(epoch FROM now())::float8")
        skew = abs((sent + time.time()) / 2 - now)
        version = await conn.fetchval("SHOW server_version")
        try:
            applied = {
                r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")
            }
        except asyncpg.UndefinedTableError:
            applied = set()
    finally:
        await conn.close()
    checks = [Check("postgres", True, f"reachable (PostgreSQL {version})")]
    shipped = {version for version, _, _ in migration_files()}
    pending, unknown = sorted(shipped - applied), sorted(applied - shipped)
    if pending:
        checks.append(
            Check(
                "migrations",
                False,
                f"not applied: {', '.join(pending)}",
                "run `hatched-mirror migrate`",
            )
        )
    elif unknown:
        checks.append(
            Check(
                "migrations",
                False,
                f"the database has migrations this release lacks: {', '.join(unknown)}",
                "run the release that applied them (or newer)",
            )
        )
    else:
        checks.append(Check("migrations", True, f"current ({len(shipped)} applied)"))
    checks.append(
        Check(
            "clock",
            skew <= MAX_SKEW_S,
            f"{skew:.1f} s from Postgres now()",
            "sync the clock (NTP): signatures older than "
            f"{settings.signature_tolerance_s} s are refused as stale",
        )
    )
    return checks


async def check_redis(settings: Settings) -> Check:
    if not settings.redis_url:
        return Check("redis", False, "REDIS_URL is not set", "set REDIS_URL")
    client = aioredis.Redis.from_url(settings.redis_dsn, socket_timeout=2, socket_connect_timeout=2)
    try:
        await client.ping()
    except (OSError, aioredis.RedisError) as exc:
        return Check("redis", False, f"cannot ping: {exc}", "check REDIS_URL and that it runs")
    finally:
        await client.aclose()
    return Check("redis", True, "reachable")


def check_secrets(settings: Settings) -> Check:
    secrets = settings.webhook_secrets
    if not secrets:
        return Check(
            "webhook secrets",
            False,
            "HATCHED_WEBHOOK_SECRETS is empty: every delivery is refused",
            "copy the endpoint secret Hatched showed when you subscribed",
        )
    problems = []
    for index, secret in enumerate(secrets):  # by position: a secret is never printed
        if secret != secret.strip() or any(c.isspace() for c in secret):
            problems.append(f"#{index} holds whitespace")
        elif not secret.isprintable() or not secret.isascii():
            problems.append(f"#{index} holds non-printable or non-ASCII characters")
        elif len(secret) < MIN_SECRET_LENGTH:
            problems.append(f"#{index} is shorter than {MIN_SECRET_LENGTH} characters")
    if len(set(secrets)) != len(secrets):
        problems.append("a secret is listed twice")
    if problems:
        return Check(
            "webhook secrets",
            False,
            "; ".join(problems),
            "paste each secret exactly as Hatched shows it, comma-separated",
        )
    return Check("webhook secrets", True, f"{len(secrets)} configured, well-formed")


def key_environment(key: str) -> str | None:
    return next((env for env, prefix in KEY_PREFIXES.items() if key.startswith(prefix)), None)


def url_environment(url: str) -> str:
    host = urlsplit(url).hostname or ""
    if host in ("localhost", "127.0.0.1", "::1") or host.endswith(".local"):
        return "local"
    return "staging" if any(word in host for word in ("staging", "sandbox")) else "production"


async def check_hatched(settings: Settings) -> list[Check]:
    url, key = settings.hatched_api_url, settings.hatched_api_key
    if not url and not key:
        return [Check("hatched api", True, "not configured (webhooks only; refresh, backfill off)")]
    if not (url and key):
        missing = "HATCHED_API_KEY" if url else "HATCHED_API_URL"
        return [
            Check("hatched api", False, f"{missing} is not set", f"set {missing} too, or neither")
        ]
    checks = []
    key_env, url_env = key_environment(key), url_environment(url)
    if key_env is None:
        checks.append(
            Check(
                "hatched key",
                False,
                "HATCHED_API_KEY is neither a hatch_test_ nor a hatch_live_ key",
                "copy the key from Hatched's dashboard",
            )
        )
    elif url_env not in ("local", key_env):
        checks.append(
            Check(
                "hatched key",
                False,
                f"a {key_env} key ({key[:11]}…) against a {url_env} HATCHED_API_URL",
                f"use the {key_env} API URL, or a {KEY_PREFIXES[url_env]} key",
            )
        )
    else:
        checks.append(Check("hatched key", True, f"{key_env} key, {url_env} URL"))
    api = HatchedAPI(url, key, max_attempts=1, timeout=settings.hatched_api_timeout_s)
    try:
        await api.list_buddies(limit=1)
    except HatchedAPIError as exc:
        refused = exc.status in (401, 403)
        checks.append(
            Check(
                "hatched key works",
                False,
                f"GET /buddies: {exc}",
                "the key is revoked or of another account: create a new one"
                if refused
                else "check HATCHED_API_URL and that this host may reach it",
            )
        )
    else:
        checks.append(Check("hatched key works", True, "GET /buddies accepted the key"))
    finally:
        await api.aclose()
    return checks


async def check_receiver(settings: Settings, url: str) -> Check:
    """POST a delivery signed with the first secret to the running receiver at `url`."""
    if not settings.webhook_secrets:
        return Check(
            "receiver",
            False,
            "no secret to sign a test delivery with",
            "set HATCHED_WEBHOOK_SECRETS",
        )
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/webhooks/hatched"):
        endpoint += "/webhooks/hatched"
    body = orjson.dumps({"buddy_id": "doctor", "note": "hatched-mirror doctor test delivery"})
    headers = {
        "Content-Type": "application/json",
        "X-Hatched-Event": DOCTOR_EVENT,
        "X-Hatched-Delivery": str(uuid.uuid4()),
        **signature_headers(body, settings.webhook_secrets[0], int(time.time()), "v2"),
    }
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(endpoint, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return Check(
            "receiver", False, f"POST {endpoint}: {exc!r}", "check the URL and that serve runs"
        )
    if response.is_success:
        return Check(
            "receiver", True, f"POST {endpoint}: {response.status_code}, test delivery accepted"
        )
    fix = (
        "the server's HATCHED_WEBHOOK_SECRETS differ from this environment's"
        if response.status_code == 401
        else "see the answer's problem code in the README's Problem codes"
    )
    return Check(
        "receiver", False, f"POST {endpoint}: {response.status_code} {response.text[:200]}", fix
    )
