"""Salted scrypt password hashes (pure; ``hashlib.scrypt``, RFC 7914).

A hash is stored as ``scrypt$N$r$p$salt$key`` (salt and key base64): the
parameters travel with each hash, so they can be raised later (new and
changed passwords take the new ones) while every old hash still verifies.
The caller draws the salt (the shell: ``secrets``), so this stays pure.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

SCHEME = "scrypt"
SALT_BYTES = 16
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024


@dataclass(frozen=True)
class ScryptParams:
    # N=2**14, r=8, p=1: the parameters RFC 7914 §2 suggests for interactive
    # logins (16 MiB, ~50 ms on a server core); key_bytes long enough for 256 bits.
    n: int = 2**14
    r: int = 8
    p: int = 1
    key_bytes: int = 32

    @property
    def maxmem_bytes(self) -> int:
        return 128 * self.r * (self.n + self.p + 2) + 1024 * 1024


DEFAULT_PARAMS = ScryptParams()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def hash_password(password: str, salt: bytes, params: ScryptParams = DEFAULT_PARAMS) -> str:
    key = hashlib.scrypt(password.encode(), salt=salt, n=params.n, r=params.r, p=params.p,
                         dklen=params.key_bytes, maxmem=params.maxmem_bytes)
    return f"{SCHEME}${params.n}${params.r}${params.p}${_b64(salt)}${_b64(key)}"


def parse_hash(encoded: str) -> tuple[ScryptParams, bytes, bytes]:
    """The parameters, salt and key of a stored hash; ValueError when it is not one."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise ValueError("not an scrypt hash")
    n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or n > 2**20:
        raise ValueError("scrypt parameters out of range")
    salt, key = base64.b64decode(parts[4]), base64.b64decode(parts[5])
    return ScryptParams(n, r, p, len(key)), salt, key


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` is the one ``encoded`` was made from (constant-time compare)."""
    try:
        params, salt, key = parse_hash(encoded)
    except (ValueError, TypeError):
        return False
    candidate = hashlib.scrypt(password.encode(), salt=salt, n=params.n, r=params.r, p=params.p,
                               dklen=params.key_bytes, maxmem=params.maxmem_bytes)
    return hmac.compare_digest(candidate, key)


def check_password(password: object, *, field: str = "password") -> str | None:
    """Why ``password`` may not be set (None: it may)."""
    if not isinstance(password, str):
        return f"{field} must be a string"
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        return f"{field} must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters"
    return None
