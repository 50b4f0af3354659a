"""Bearer tokens (pure): ``POST /v1/auth/token`` trades credentials for one.

A token is ``rk1.<payload>.<mac>``: the payload (base64url JSON) names the
user, the user's password generation and the expiry (wall clock, µs); the
mac is HMAC-SHA256 under the cluster's auth secret, which lives in the user
store with the users. Stateless, so any node checks a token with what it
already caches - no store read, no Paxos round, no write per login - and a
token outlives no password change (the generation moves on) and no revoke
(grants are read from the store on every request, not carried in the token).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

PREFIX = "rk1"
MAX_TOKEN_CHARS = 1024


@dataclass(frozen=True)
class TokenClaims:
    user: str
    generation: int
    expires_us: int


class BadToken(ValueError):
    """The token is malformed, forged, or expired (``expired``)."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, f"{PREFIX}.{payload}".encode(), hashlib.sha256).digest())


def issue(secret: bytes, claims: TokenClaims) -> str:
    payload = _b64(json.dumps({"u": claims.user, "g": claims.generation,
                               "exp": claims.expires_us}, separators=(",", ":")).encode())
    return f"{PREFIX}.{payload}.{_mac(secret, payload)}"


def verify(secret: bytes, token: str, now_us: int) -> TokenClaims:
    """The token's claims if ``secret`` signed it and it has not expired at ``now_us``."""
    parts = token.split(".")
    if len(token) > MAX_TOKEN_CHARS or len(parts) != 3 or parts[0] != PREFIX:
        raise BadToken("not a ringkv token")
    if not hmac.compare_digest(_mac(secret, parts[1]), parts[2]):
        raise BadToken("the token's signature does not match")
    try:
        raw = json.loads(_unb64(parts[1]))
        claims = TokenClaims(str(raw["u"]), int(raw["g"]), int(raw["exp"]))
    except (ValueError, KeyError, TypeError):
        raise BadToken("the token's payload is malformed") from None
    if now_us >= claims.expires_us:
        raise BadToken("the token has expired", expired=True)
    return claims
