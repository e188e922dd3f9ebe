"""User tokens: HS256 JWTs a customer's backend gives a browser, scoped to one Hatched user.

Claims: `iss` = "hatched-mirror", `sub` = the user id, `exp` (at most MIRROR_USER_TOKEN_MAX_TTL_S
after `iat`, or after now when there is no `iat`), `iat`, optional `audience`. Keys come from
MIRROR_USER_TOKEN_SECRETS: the first signs, any verifies, so a key is rotated by putting the new
one first and dropping the old one once the tokens it signed have expired.

A verified token is remembered until its `exp` (bounded, least recently used first out), so a
browser polling with the same token costs a dictionary lookup, not an HMAC and a JSON parse.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from service.problems import Problem, unauthorized

ISSUER = "hatched-mirror"
# Pinned: `none`, HS384 and every other alg in a token's header are refused by PyJWT itself.
ALGORITHMS = ["HS256"]
DEFAULT_TTL_S = 900
VERDICT_CACHE_SIZE = 10_000
# A token is a header, a few short claims and a signature; anything far longer is not one.
MAX_TOKEN_CHARS = 4096


@dataclass(frozen=True)
class Principal:
    """Who a verified user token speaks for."""

    user_id: str
    audience: str | None
    expires_at: float

    def owns(self, user_id: str | None, audience: str | None) -> bool:
        """A buddy of this user (and of the token's audience, if it names one)."""
        return user_id == self.user_id and (self.audience is None or audience == self.audience)


def token_expired() -> Problem:
    return Problem(
        401,
        "token_expired",
        "Token expired",
        "the user token has expired; ask the backend for a new one",
        {"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


def mint(secret: str, user_id: str, audience: str | None, ttl_s: int, now: int) -> str:
    claims: dict[str, Any] = {"iss": ISSUER, "sub": user_id, "iat": now, "exp": now + ttl_s}
    if audience is not None:
        claims["audience"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")


def _text(value: Any) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= 256 and "\x00" not in value


class UserTokens:
    def __init__(
        self,
        secrets: Sequence[str],
        max_ttl_s: int,
        *,
        cache_size: int = VERDICT_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = [s.encode() for s in secrets]
        self.max_ttl_s = max_ttl_s
        self._clock = clock
        self._max = cache_size
        self._verdicts: OrderedDict[str, Principal] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def mint(self, user_id: str, audience: str | None, ttl_s: int) -> tuple[str, int]:
        now = int(self._clock())
        return mint(self._keys[0].decode(), user_id, audience, ttl_s, now), now + ttl_s

    def remembered(self, token: str) -> Principal | None:
        """The principal of a token verified before and not yet expired; None for any other
        (one never seen, refused or expired), which only `verify` judges."""
        known = self._verdicts.get(token)
        if known is None or known.expires_at <= self._clock():
            return None
        self._verdicts.move_to_end(token)
        return known

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; else `unauthorized`, or `token_expired`."""
        known = self.remembered(token)
        if known is not None:
            return known
        if token in self._verdicts:  # verified once, expired since
            del self._verdicts[token]
            raise token_expired()
        principal = self._decode(token, self._clock())
        self._verdicts[token] = principal
        while len(self._verdicts) > self._max:
            self._verdicts.popitem(last=False)
        return principal

    def _decode(self, token: str, now: float) -> Principal:
        if not self._keys or len(token) > MAX_TOKEN_CHARS:
            raise unauthorized("not a valid user token")
        claims: dict[str, Any] | None = None
        for key in self._keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=ALGORITHMS,
                    issuer=ISSUER,
                    options={"require": ["iss", "sub", "exp"]},
                )
                break
            except jwt.InvalidSignatureError:
                continue  # signed with another key, maybe an older one of the rotation
            except jwt.ExpiredSignatureError:
                # PyJWT checks the signature before the claims: this token was ours.
                raise token_expired() from None
            except jwt.InvalidTokenError:
                raise unauthorized("not a valid user token") from None
        if claims is None:
            raise unauthorized("not a valid user token")
        sub, audience, exp = claims["sub"], claims.get("audience"), claims["exp"]
        issued = claims.get("iat", now)
        if not _text(sub) or not (audience is None or _text(audience)):
            raise unauthorized("`sub` and `audience` must be strings of 1 to 256 characters")
        if not all(isinstance(t, int | float) and not isinstance(t, bool) for t in (exp, issued)):
            raise unauthorized("`exp` and `iat` must be numbers")
        if exp - issued > self.max_ttl_s:
            raise unauthorized(f"`exp` is more than {self.max_ttl_s} s after `iat` (or now)")
        return Principal(sub, audience, float(exp))
