"""Authentication on a node (shell): credentials in, a ``Principal`` out, or a
typed error; the first superuser; tokens.

Every front end (HTTP's two paths, the native hello) comes here. Basic
credentials are checked against the stored scrypt hash in a worker thread
(scrypt holds no GIL, and ~50 ms must not stall the loop); a check that
passed is remembered (by a keyed digest of user, password and the stored
hash, never the password) for ``VERIFIED_TTL_S``, so a client that sends
Basic on every request pays scrypt once in that window, not per request.
Keyed on the stored hash, it is void the moment a new password is read. Failed logins
count against the source address (``ratelimit.py``) and in the metrics.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import logging
import secrets
import sys
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ringkv.auth import passwords, tokens
from ringkv.auth.permissions import (
    ADMIN, PUBLIC_ROUTES, Principal, authorize, may_manage, needs,
)
from ringkv.auth.ratelimit import FailedLogins
from ringkv.auth.store import AuthStore
from ringkv.auth.users import AuthDoc, UserRecord
from ringkv.clock import Clock
from ringkv.config import Config
from ringkv.errors import (
    ConditionFailed, Forbidden, RingKVError, TooManyAttempts, Unauthenticated,
)
from ringkv.metrics import NodeMetrics

if TYPE_CHECKING:
    from ringkv.txn.service import TxnService

log = logging.getLogger(__name__)

SUPERUSER = "admin"
MAX_VERIFIED = 4096  # remembered credential checks
VERIFIED_TTL_S = 300.0
BOOTSTRAP_RETRY_S = 0.5
MAX_HEADER_CHARS = 4096


@functools.cache
def _dummy_hash(params: passwords.ScryptParams) -> str:
    """Checked against when the user does not exist, so that a missing user costs
    what a wrong password does (no user enumeration by timing)."""
    return passwords.hash_password("not a password", b"\0" * passwords.SALT_BYTES, params)


class AuthService:
    def __init__(self, node_id: str, config: Config, *, clock: Clock, txn: TxnService,
                 metrics: NodeMetrics, params: passwords.ScryptParams = passwords.DEFAULT_PARAMS
                 ) -> None:
        self.node_id = node_id
        self.config = config.auth
        self.clock = clock
        self.metrics = metrics
        self.params = params
        self.store = AuthStore(txn, clock, cache_ttl_s=config.auth.cache_ttl_s,
                               timeout_s=config.timing.write_timeout_ms / 1000)
        self.limiter = FailedLogins(burst=config.auth.login_burst,
                                    refill_per_s=config.auth.login_refill_per_s)
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        self._cache_key = secrets.token_bytes(32)  # this process's, never stored
        self._bootstrap: asyncio.Task[None] | None = None
        self.superuser_created = False

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        if self._bootstrap is None:
            self._bootstrap = asyncio.create_task(self._ensure_superuser())

    async def stop(self) -> None:
        if self._bootstrap is not None:
            self._bootstrap.cancel()
            await asyncio.gather(self._bootstrap, return_exceptions=True)

    async def _ensure_superuser(self) -> None:
        """Create ``admin`` with a generated password when there are no users yet, and
        print the password once. Put-if-absent through the transactional tier: of the
        nodes that try at once, one creates it; a retry of ours keeps its id, so a commit
        whose answer was lost is recognised as ours, not taken for another node's."""
        password = secrets.token_urlsafe(18)
        doc = AuthDoc(secrets.token_bytes(32)).with_user(
            SUPERUSER, await self.hash(password), grants=(ADMIN,))
        txn_id = f"auth-init.{self.node_id[:32]}.{secrets.token_hex(8)}"
        waited = False
        while True:
            try:
                existing, _ = await self.store.read()
                if existing is not None and existing.secret != doc.secret:
                    return  # another node's, or an earlier start's
                if existing is None:
                    await self.store.write(doc, None, txn_id=txn_id)
            except ConditionFailed:
                return  # another node created the store first
            except RingKVError as exc:  # no leader yet, too few nodes yet: try again
                (log.info if not waited else log.debug)(
                    "the user store is not ready yet, the superuser waits: %s", exc.message)
                waited = True
                await self.clock.sleep(BOOTSTRAP_RETRY_S)
                continue
            self.superuser_created = True
            print(f"ringkv: authentication is enabled and there were no users: created the "
                  f"superuser {SUPERUSER!r} with password {password}\nringkv: it is shown "
                  f"this once; change it with `ringkv user passwd {SUPERUSER}`",
                  file=sys.stdout, flush=True)
            log.warning("created the superuser %r; its password was printed on stdout",
                        SUPERUSER)
            return

    # -- credentials -------------------------------------------------------------------

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(passwords.hash_password, password,
                                       secrets.token_bytes(passwords.SALT_BYTES), self.params)

    def _refuse(self, peer: str, reason: str, message: str) -> Unauthenticated:
        self.limiter.failed(peer, self.clock.monotonic_s())
        self.metrics.auth_failures.labels(reason).inc()
        return Unauthenticated(message, reason=reason)

    def _admit(self, peer: str) -> None:
        wait_s = self.limiter.retry_after_s(peer, self.clock.monotonic_s())
        if wait_s is not None:
            self.metrics.auth_failures.labels("rate_limited").inc()
            raise TooManyAttempts(f"too many failed logins from {peer}; try again in "
                                  f"{wait_s:.0f} s", retry_after_s=round(wait_s, 3))

    async def _doc(self) -> AuthDoc:
        doc = await self.store.current()
        if doc is None:
            raise Unauthenticated("the user store is not initialised yet; try again shortly",
                                  reason="not_ready")
        return doc

    async def _doc_at_leader(self) -> AuthDoc:
        doc = (await self.store.read())[0]
        if doc is None:
            raise Unauthenticated("the user store is not initialised yet; try again shortly",
                                  reason="not_ready")
        return doc

    async def authenticate(self, header: str | None, peer: str) -> Principal:
        """The principal of an ``Authorization`` header (``Basic`` or ``Bearer``)."""
        if not header:
            self.metrics.auth_failures.labels("missing").inc()
            raise Unauthenticated("credentials required: HTTP Basic, or a bearer token from "
                                  "POST /v1/auth/token", reason="missing")
        scheme, _, value = header.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            return await self.check_token(value.strip(), peer)
        if scheme == "basic":
            user, password = _basic(value.strip())
            return await self.check_password(user, password, peer)
        self.metrics.auth_failures.labels("malformed").inc()
        raise Unauthenticated("the Authorization header must be Basic or Bearer",
                              reason="malformed")

    async def check_password(self, user: str, password: str, peer: str) -> Principal:
        self._admit(peer)
        from_cache = self.store.cached
        record = (await self._doc()).users.get(user)
        principal = await self._verify(user, password, record)
        if principal is None and from_cache:
            # What the cache holds may predate this user or its password (added at
            # another node): one read at the leader before refusing. The failed-login
            # limit bounds how often a stranger can make a node do this.
            fresh = (await self.store.read())[0]
            again = None if fresh is None else fresh.users.get(user)
            if again != record:
                principal = await self._verify(user, password, again)
        if principal is None:
            raise self._refuse(peer, "bad_credentials", "wrong user name or password")
        return principal

    async def _verify(self, user: str, password: str, record: UserRecord | None
                      ) -> Principal | None:
        stored = _dummy_hash(self.params) if record is None else record.password_hash
        digest = hmac.new(self._cache_key, b"\0".join(
            (user.encode(), password.encode(), stored.encode())), hashlib.sha256).digest()
        now = self.clock.monotonic_s()
        seen = self._verified.get(digest)
        if record is not None and seen is not None and now - seen < VERIFIED_TTL_S:
            return Principal(user, record.grants, record.generation)
        ok = await asyncio.to_thread(passwords.verify_password, password, stored)
        if record is None or not ok:
            return None
        self._verified[digest] = now
        self._verified.move_to_end(digest)
        while len(self._verified) > MAX_VERIFIED:
            self._verified.popitem(last=False)
        return Principal(user, record.grants, record.generation)

    async def check_token(self, token: str, peer: str) -> Principal:
        self._admit(peer)
        from_cache = self.store.cached
        doc = await self._doc()
        try:
            try:
                claims = tokens.verify(doc.token_secrets(), token, self.clock.wall_us())
            except tokens.BadToken as exc:
                if exc.reason != "unknown_secret" or not from_cache:
                    raise
                # Signed after a rotation this node's cache predates: one read at the leader.
                doc = await self._doc_at_leader()
                claims = tokens.verify(doc.token_secrets(), token, self.clock.wall_us())
        except tokens.BadToken as exc:
            reason = "bad_token" if exc.reason == "unknown_secret" else exc.reason
            raise self._refuse(peer, reason, str(exc)) from None
        record = doc.users.get(claims.user)
        if (record is None or record.generation != claims.generation) and from_cache:
            fresh = (await self.store.read())[0]  # the token may be newer than the cache
            record = None if fresh is None else fresh.users.get(claims.user)
        if record is None or record.generation != claims.generation:
            raise self._refuse(peer, "bad_token", "the token's user was removed or changed "
                               "password since it was issued")
        return Principal(claims.user, record.grants, record.generation)

    async def issue_token(self, header: str | None, peer: str) -> dict[str, Any]:
        """A bearer token for Basic credentials (a token does not buy another)."""
        if not header or header.strip().partition(" ")[0].lower() != "basic":
            self.metrics.auth_failures.labels("missing").inc()
            raise Unauthenticated("POST /v1/auth/token takes HTTP Basic credentials",
                                  reason="missing")
        principal = await self.authenticate(header, peer)
        doc = await self._doc()
        ttl_s = self.config.token_ttl_s
        expires_us = self.clock.wall_us() + ttl_s * 1_000_000
        claims = tokens.TokenClaims(principal.name, doc.user(principal.name).generation,
                                    expires_us)
        return {"token": tokens.issue(doc.secret, claims, doc.secret_generation),
                "token_type": "Bearer",
                "user": principal.name, "expires_in_s": ttl_s, "expires_at_us": expires_us}

    async def rotate_secret(self) -> dict[str, Any]:
        """A new token secret signs from now on; the one it replaces and the
        ``auth.previous_secrets`` - 1 before that still verify their tokens, and any older
        is retired. Every node sees it within ``auth.cache_ttl_s``."""
        keep = self.config.previous_secrets
        doc = await self.store.change(
            lambda d: d.with_rotated_secret(secrets.token_bytes(32), keep))
        accepted = [gen for gen, _ in doc.previous_secrets]
        log.info("rotated the token secret: generation %d signs; %s still verify",
                    doc.secret_generation, accepted or "no earlier ones")
        return {"ok": True, "secret_generation": doc.secret_generation,
                "previous_generations": accepted}

    # -- the one check -----------------------------------------------------------------

    async def check(self, route: str, keyspace: str, query: Mapping[str, str], body: bytes,
                    header: str | None, peer: str) -> Principal | None:
        """Authenticate and authorize one request (None: a public route)."""
        if route in PUBLIC_ROUTES:
            return None
        principal = await self.authenticate(header, peer)
        self.authorize(principal, route, keyspace, query, body)
        return principal

    async def authorize_session(self, principal: Principal | None, route: str, keyspace: str,
                                query: Mapping[str, str], body: bytes) -> Principal | None:
        """Authorize one request of a connection that logged in once (the native hello),
        with the user's grants as they are now: a revoke reaches open connections too,
        and a password change or removal ends what they may do. The principal with those
        grants (None: a public route)."""
        if route in PUBLIC_ROUTES:
            return None
        if principal is None:
            raise Unauthenticated("this connection has not logged in", reason="missing")
        record = (await self._doc()).users.get(principal.name)
        if record is None or record.generation != principal.generation:
            self.metrics.auth_failures.labels("credentials_changed").inc()
            raise Unauthenticated(f"user {principal.name!r} was removed or changed password "
                                  "since this connection logged in", reason="credentials_changed")
        current = Principal(principal.name, record.grants, record.generation)
        self.authorize(current, route, keyspace, query, body)
        return current

    def may_manage(self, principal: Principal, target: str, grant: str | None) -> None:
        """``permissions.may_manage``, its refusals counted."""
        try:
            may_manage(principal, target, grant)
        except Forbidden:
            self.metrics.auth_forbidden.inc()
            raise

    def authorize(self, principal: Principal, route: str, keyspace: str,
                  query: Mapping[str, str], body: bytes) -> None:
        try:
            authorize(principal, needs(route, keyspace, query, body))
        except Forbidden:
            self.metrics.auth_forbidden.inc()
            raise


def _basic(value: str) -> tuple[str, str]:
    if len(value) > MAX_HEADER_CHARS:
        raise Unauthenticated("the Basic credentials are too long", reason="malformed")
    try:
        user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, ValueError):
        raise Unauthenticated("the Basic credentials are not base64 of user:password",
                              reason="malformed") from None
    if not sep:
        raise Unauthenticated("the Basic credentials are not base64 of user:password",
                              reason="malformed")
    return user, password


