"""Bearer tokens (pure): ``POST /v1/auth/token`` trades credentials for one.

A token is ``rk1.<payload>.<mac>``: the payload (base64url JSON) names the
user, the user's password generation, the expiry (wall clock, µs) and the
generation of the secret that signed it (``k``; a token from before secrets
rotated has none: generation 1); the mac is HMAC-SHA256 under that secret,
which lives in the user store with the users (``users.py``). The payload is
read before the mac is checked only to pick the secret, so a token whose
secret was retired is refused saying so (``retired_secret``), not taken for
a forgery. Stateless, so any node checks a token with what it
already caches - no store read, no Paxos round, no write per login - and a
token outlives no password change (the generation moves on) and no revoke
(grants are read from the store on every request, not carried in the token).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass

PREFIX = "rk1"
MAX_TOKEN_CHARS = 1024


@dataclass(frozen=True)
class TokenClaims:
    user: str
    generation: int
    expires_us: int


class BadToken(ValueError):
    """The token is malformed, forged, expired, or signed with a secret that is not
    listed: ``reason`` is ``bad_token``, ``expired_token``, ``retired_secret`` (older
    than every listed one) or ``unknown_secret`` (newer: the reader's list may be stale)."""

    def __init__(self, message: str, *, reason: str = "bad_token") -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def expired(self) -> bool:
        return self.reason == "expired_token"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, f"{PREFIX}.{payload}".encode(), hashlib.sha256).digest())


def issue(secret: bytes, claims: TokenClaims, secret_generation: int = 1) -> str:
    payload = _b64(json.dumps({"u": claims.user, "g": claims.generation,
                               "exp": claims.expires_us, "k": secret_generation},
                              separators=(",", ":")).encode())
    return f"{PREFIX}.{payload}.{_mac(secret, payload)}"


def verify(secrets: Mapping[int, bytes], token: str, now_us: int) -> TokenClaims:
    """The token's claims if one of ``secrets`` (by generation) signed it and it has not
    expired at ``now_us``."""
    parts = token.split(".")
    if len(token) > MAX_TOKEN_CHARS or len(parts) != 3 or parts[0] != PREFIX:
        raise BadToken("not a ringkv token")
    try:
        raw = json.loads(_unb64(parts[1]))
        secret_generation = int(raw.get("k", 1))
    except (ValueError, TypeError, AttributeError):
        raise BadToken("the token's payload is malformed") from None
    secret = secrets.get(secret_generation)
    if secret is None:
        if secrets and secret_generation < min(secrets):
            raise BadToken(f"the token was signed with token secret generation "
                           f"{secret_generation}, retired since (the oldest still accepted is "
                           f"{min(secrets)}): get a new token", reason="retired_secret")
        raise BadToken(f"the token names token secret generation {secret_generation}, which "
                       "this node does not know", reason="unknown_secret")
    if not hmac.compare_digest(_mac(secret, parts[1]), parts[2]):
        raise BadToken("the token's signature does not match")
    try:
        claims = TokenClaims(str(raw["u"]), int(raw["g"]), int(raw["exp"]))
    except (ValueError, KeyError, TypeError):
        raise BadToken("the token's payload is malformed") from None
    if now_us >= claims.expires_us:
        raise BadToken("the token has expired", reason="expired_token")
    return claims
