"""The user store's one document (pure): users, their password hashes and grants,
and the cluster's token secret.

It is kept as one JSON value under one key of the ``system_auth`` keyspace,
so every change is one compare-and-set on its version through the
transactional tier (``store.py``): users are few and change rarely, and a
login reads one key. Each change returns a new document; a user's
``generation`` moves on with each password change, which retires the tokens
issued before it (``tokens.py``).
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


@dataclass(frozen=True)
class UserRecord:
    password_hash: str
    generation: int = 1
    grants: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, Any]:
        return {"hash": self.password_hash, "gen": self.generation, "grants": sorted(self.grants)}


@dataclass(frozen=True)
class AuthDoc:
    secret: bytes
    users: dict[str, UserRecord] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps({"v": DOC_VERSION, "secret": base64.b64encode(self.secret).decode(),
                           "users": {n: u.to_json() for n, u in sorted(self.users.items())}},
                          separators=(",", ":"), sort_keys=True).encode()

    @staticmethod
    def decode(raw: bytes | Any) -> AuthDoc:
        doc = json.loads(raw) if isinstance(raw, (bytes, bytearray, str)) else raw
        users = {str(name): UserRecord(str(u["hash"]), int(u["gen"]), frozenset(u["grants"]))
                 for name, u in doc["users"].items()}
        return AuthDoc(base64.b64decode(doc["secret"]), users)

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
        return AuthDoc(self.secret, {**self.users, name: UserRecord(password_hash, 1,
                                                                    frozenset(grants))})

    def without_user(self, name: str) -> AuthDoc:
        self.user(name)
        return AuthDoc(self.secret, {n: u for n, u in self.users.items() if n != name})

    def with_password(self, name: str, password_hash: str) -> AuthDoc:
        record = self.user(name)
        changed = replace(record, password_hash=password_hash, generation=record.generation + 1)
        return AuthDoc(self.secret, {**self.users, name: changed})

    def with_grants(self, name: str, add: Iterable[str] = (), remove: Iterable[str] = ()
                    ) -> AuthDoc:
        record = self.user(name)
        grants = (record.grants | frozenset(add)) - frozenset(remove)
        return AuthDoc(self.secret, {**self.users, name: replace(record, grants=grants)})

    def listing(self) -> list[dict[str, Any]]:
        return [{"name": n, "grants": sorted(u.grants)} for n, u in sorted(self.users.items())]


def check_name(name: object) -> str:
    if not isinstance(name, str) or not USER_NAME.fullmatch(name):
        raise BadRequest("a user name is 1-64 letters, digits and _ . @ -", field="name")
    return name
