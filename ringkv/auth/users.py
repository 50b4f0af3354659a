"""The user store's one document (pure): users, their password hashes and grants,
and the cluster's token secrets.

It is kept as one JSON value under one key of the ``system_auth`` keyspace,
so every change is one compare-and-set on its version through the
transactional tier (``store.py``): users are few and change rarely, and a
login reads one key. Each change returns a new document; a user's
``generation`` moves on with each password change, which retires the tokens
issued before it (``tokens.py``).

The token secret rotates (``with_rotated_secret``): the current secret signs,
and up to ``auth.previous_secrets`` earlier ones still verify the tokens they
signed until those expire, each known by its generation (a token names the
generation that signed it). A document written before rotation existed
holds one secret and no generation: it reads as generation 1.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ringkv.errors import BadRequest, NotFound

USER_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
DOC_VERSION = 1
MAX_USERS = 10_000
MIN_SECRET_BYTES = 32


@dataclass(frozen=True)
class UserRecord:
    password_hash: str
    generation: int = 1
    grants: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, Any]:
        return {"hash": self.password_hash, "gen": self.generation, "grants": sorted(self.grants)}


@dataclass(frozen=True)
class AuthDoc:
    secret: bytes  # the current token secret: it signs every new token
    users: dict[str, UserRecord] = field(default_factory=dict)
    secret_generation: int = 1
    # The secrets before it that still verify, newest first: (generation, secret).
    previous_secrets: tuple[tuple[int, bytes], ...] = ()

    def encode(self) -> bytes:
        raw: dict[str, Any] = {
            "v": DOC_VERSION, "secret": _b64(self.secret),
            "users": {n: u.to_json() for n, u in sorted(self.users.items())}}
        if self.secret_generation != 1 or self.previous_secrets:
            raw["secret_gen"] = self.secret_generation
            raw["previous"] = [[gen, _b64(secret)] for gen, secret in self.previous_secrets]
        return json.dumps(raw, separators=(",", ":"), sort_keys=True).encode()

    @staticmethod
    def decode(raw: bytes | Any) -> AuthDoc:
        doc = json.loads(raw) if isinstance(raw, (bytes, bytearray, str)) else raw
        users = {str(name): UserRecord(str(u["hash"]), int(u["gen"]), frozenset(u["grants"]))
                 for name, u in doc["users"].items()}
        previous = tuple((int(gen), base64.b64decode(secret))
                         for gen, secret in doc.get("previous", ()))
        return AuthDoc(base64.b64decode(doc["secret"]), users, int(doc.get("secret_gen", 1)),
                       previous)

    def token_secrets(self) -> dict[int, bytes]:
        """Every secret that verifies a token, by generation (the current one included)."""
        return {self.secret_generation: self.secret, **dict(self.previous_secrets)}

    def with_rotated_secret(self, secret: bytes, keep: int) -> AuthDoc:
        """``secret`` signs from now on; the current one and the ``keep`` - 1 newest
        before it still verify; any older is retired (its tokens refused)."""
        if len(secret) < MIN_SECRET_BYTES:
            raise BadRequest(f"a token secret is at least {MIN_SECRET_BYTES} bytes",
                             field="secret")
        previous = ((self.secret_generation, self.secret), *self.previous_secrets)[:keep]
        return replace(self, secret=secret, secret_generation=self.secret_generation + 1,
                       previous_secrets=previous)

    def user(self, name: str) -> UserRecord:
        record = self.users.get(name)
        if record is None:
            raise NotFound(f"no user {name!r}", user=name)
        return record

    def with_user(self, name: str, password_hash: str, grants: Iterable[str] = ()) -> AuthDoc:
        check_name(name)
        if name in self.users:
            raise BadRequest(f"user {name!r} exists already", field="name", reason="exists")
        if len(self.users) >= MAX_USERS:
            raise BadRequest(f"at most {MAX_USERS} users", field="name")
        return replace(self, users={**self.users, name: UserRecord(password_hash, 1,
                                                                   frozenset(grants))})

    def without_user(self, name: str) -> AuthDoc:
        self.user(name)
        return replace(self, users={n: u for n, u in self.users.items() if n != name})

    def with_password(self, name: str, password_hash: str) -> AuthDoc:
        record = self.user(name)
        changed = replace(record, password_hash=password_hash, generation=record.generation + 1)
        return replace(self, users={**self.users, name: changed})

    def with_grants(self, name: str, add: Iterable[str] = (), remove: Iterable[str] = ()
                    ) -> AuthDoc:
        record = self.user(name)
        grants = (record.grants | frozenset(add)) - frozenset(remove)
        return replace(self, users={**self.users, name: replace(record, grants=grants)})

    def listing(self) -> list[dict[str, Any]]:
        return [{"name": n, "grants": sorted(u.grants)} for n, u in sorted(self.users.items())]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def check_name(name: object) -> str:
    if not isinstance(name, str) or not USER_NAME.fullmatch(name):
        raise BadRequest("a user name is 1-64 letters, digits and _ . @ -", field="name")
    return name
