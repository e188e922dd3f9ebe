"""User tokens without a server: verification, the verdict memory, settings, log redaction, and
the cached read path's own check."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace
from typing import Any

import jwt
import orjson
import pytest
import structlog
from starlette.types import Message

from service import logs
from service.auth.bearer import PRINCIPAL
from service.auth.user_tokens import Principal, UserTokens, mint
from service.config import ConfigError, load_settings
from service.problems import Problem
from service.read.cache import BuddyCache
from service.read.cached import CachedBuddyReads

KEY = "unit-test-user-token-key-" + "u" * 39
OLD = "unit-test-retired-token-key-" + "r" * 36
# Module import time: only for values no clock is checked against.
NOW = int(time.time())


class Clock:
    def __init__(self, now: int) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now


def claims(now: int | None = None, **extra: Any) -> dict[str, Any]:
    now = int(time.time()) if now is None else now
    return {"iss": "hatched-mirror", "sub": "user_a", "iat": now, "exp": now + 60, **extra}


def code_of(tokens: UserTokens, token: str) -> str:
    with pytest.raises(Problem) as raised:
        tokens.verify(token)
    return raised.value.code


def test_a_valid_token_gives_its_user_and_audience() -> None:
    now = int(time.time())
    tokens = UserTokens([KEY], 3600, clock=Clock(now))
    principal = tokens.verify(jwt.encode(claims(now, audience="kids"), KEY, algorithm="HS256"))
    assert principal == Principal("user_a", "kids", now + 60)
    assert principal.owns("user_a", "kids")
    assert not principal.owns("user_a", None) and not principal.owns("user_b", "kids")
    assert Principal("user_a", None, 0).owns("user_a", "anything")


def test_the_verdict_is_remembered_until_exp_and_bounded() -> None:
    now = int(time.time())
    clock = Clock(now)
    tokens = UserTokens([KEY], 3600, clock=clock, cache_size=2)
    first = jwt.encode(claims(now), KEY, algorithm="HS256")
    tokens.verify(first)
    clock.now = now + 59
    assert tokens.verify(first).user_id == "user_a"
    clock.now = now + 60  # at exp, the remembered verdict no longer holds
    assert code_of(tokens, first) == "token_expired"
    clock.now = float(now)
    many = [jwt.encode(claims(now, n=i), KEY, algorithm="HS256") for i in range(5)]
    for t in many:
        tokens.verify(t)
    assert len(tokens._verdicts) == 2


def test_the_first_key_signs_any_key_verifies() -> None:
    tokens = UserTokens([KEY, OLD], 3600)
    minted, _ = tokens.mint("user_a", None, 60)
    assert jwt.decode(minted, KEY, algorithms=["HS256"])["sub"] == "user_a"
    old = jwt.encode(claims(), OLD, "HS256")
    assert tokens.verify(old).user_id == "user_a"
    assert code_of(UserTokens([KEY], 3600), old) == "unauthorized"


def test_exp_is_capped_after_iat_or_now() -> None:
    now = int(time.time())
    tokens = UserTokens([KEY], 100)
    ok = jwt.encode(claims(now, exp=now + 100), KEY, algorithm="HS256")
    assert tokens.verify(ok).expires_at == now + 100
    too_long = jwt.encode(claims(now, exp=now + 101), KEY, algorithm="HS256")
    assert code_of(tokens, too_long) == "unauthorized"
    no_iat = {k: v for k, v in claims(now, exp=now + 130).items() if k != "iat"}
    assert code_of(tokens, jwt.encode(no_iat, KEY, algorithm="HS256")) == "unauthorized"


def test_without_keys_nothing_verifies() -> None:
    token = mint(KEY, "user_a", None, 60, NOW)
    assert not UserTokens([], 60).enabled
    assert code_of(UserTokens([], 60), token) == "unauthorized"


@pytest.mark.parametrize("secrets", ["short", f"{KEY},too-short-for-hs256"])
def test_a_short_key_refuses_to_start_naming_the_variable(secrets: str) -> None:
    with pytest.raises(ConfigError, match="MIRROR_USER_TOKEN_SECRETS"):
        load_settings(MIRROR_USER_TOKEN_SECRETS=secrets)


def test_settings_defaults() -> None:
    settings = load_settings(MIRROR_USER_TOKEN_SECRETS=f" {KEY} , {OLD} ")
    assert settings.user_token_secrets == [KEY, OLD]
    assert settings.user_token_max_ttl_s == 86_400
    assert load_settings().user_token_secrets == []


def test_query_tokens_are_redacted_from_log_lines() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/v1/buddies/b/stream?x=1&access_token=eyJ.secret.sig", "1.1", 200),
        None,
    )
    assert logs.RedactQueryTokens().filter(record)
    line = record.getMessage()
    assert "eyJ.secret.sig" not in line and "access_token=[redacted]" in line and "x=1" in line


def test_the_log_handler_redacts() -> None:
    """Every stdlib line (uvicorn's access log in `dev`) goes through the redacting handler."""
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    try:
        logs.configure("json")
        assert any(isinstance(f, logs.RedactQueryTokens) for f in root.handlers[0].filters)
    finally:
        root.handlers = handlers
        root.setLevel(level)
        structlog.configure(**config)


def _cached_read(cache: BuddyCache, principal: Principal | None) -> list[Message]:
    """GET /v1/buddies/b1 through CachedBuddyReads alone, with `principal` admitted."""
    connected = asyncio.Event()
    connected.set()
    state = SimpleNamespace(
        broadcaster=SimpleNamespace(cache=cache, connected=connected),
        settings=SimpleNamespace(api_tokens=["api"]),
    )
    app = SimpleNamespace(state=SimpleNamespace(mirror=state))
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/v1/buddies/b1",
        "headers": [],
        "app": app,
    }
    if principal is not None:
        scope[PRINCIPAL] = principal
    sent: list[Message] = []

    async def router(scope: Any, receive: Any, send: Any) -> None:
        sent.append({"type": "routed"})

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(CachedBuddyReads(router)(scope, receive, send))
    return sent


def test_the_cached_path_checks_the_owner_of_what_it_serves() -> None:
    """Even past the guard (here: no guard at all), a cached buddy of user_a is never sent to
    user_b's token: the answer is the one for a missing buddy."""
    cache = BuddyCache(10)
    body = orjson.dumps({"buddy_id": "b1", "user_id": "user_a"})
    cache.put("b1", cache.token("b1"), '"b1.1"', body, ("user_a", None))
    served = _cached_read(cache, Principal("user_a", None, NOW))
    assert served[0]["status"] == 200 and served[1]["body"] == body
    refused = _cached_read(cache, Principal("user_b", None, NOW))
    assert refused[0]["status"] == 404
    assert orjson.loads(refused[1]["body"])["code"] == "buddy_not_found"
    assert _cached_read(cache, Principal("user_a", "kids", NOW))[0]["status"] == 404
    # No token at all: the router answers (its 401).
    assert _cached_read(cache, None) == [{"type": "routed"}]
