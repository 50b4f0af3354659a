"""The user store (shell): the auth document in the ``system_auth`` keyspace,
read and changed through the transactional tier (``txn/service.py``).

One key holds the whole document (``users.py``): a read is one strong read
at its range's leader, a change one compare-and-set on the version read, so
two admins changing users at once at two nodes both land (the loser reads
again and reapplies its change). A login must not cost a Paxos read, so
what was read is kept for ``auth.cache_ttl_s``; one read at a time refreshes
it, and every caller waiting meanwhile shares its answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from ringkv.auth.users import AuthDoc
from ringkv.clock import Clock
from ringkv.config import AUTH_KEYSPACE
from ringkv.errors import ConditionFailed, NotFound, StorageError
from ringkv.txn.requests import Condition, TxnRequest, Write
from ringkv.txn.service import Op

if TYPE_CHECKING:
    from ringkv.txn.service import TxnService

DOC_KEY = b"users"
MAX_CHANGE_ATTEMPTS = 8


class AuthStore:
    def __init__(self, txn: TxnService, clock: Clock, *, cache_ttl_s: float,
                 timeout_s: float) -> None:
        self._txn = txn
        self._clock = clock
        self.cache_ttl_s = cache_ttl_s
        self.timeout_s = timeout_s
        self._cached: tuple[AuthDoc | None, int | None] | None = None
        self._cached_at_s = 0.0
        self._reading: asyncio.Future[tuple[AuthDoc | None, int | None]] | None = None

    @property
    def cached(self) -> bool:
        """Whether ``current`` would answer from the cache now (so maybe a little stale)."""
        return (self._cached is not None
                and self._clock.monotonic_s() - self._cached_at_s < self.cache_ttl_s)

    async def current(self) -> AuthDoc | None:
        """The document, from the cache while it is younger than ``cache_ttl_s``."""
        now = self._clock.monotonic_s()
        if self._cached is not None and now - self._cached_at_s < self.cache_ttl_s:
            return self._cached[0]
        return (await self.read())[0]

    async def read(self) -> tuple[AuthDoc | None, int | None]:
        """The document and its version, read at the leader (None, None: none yet)."""
        if self._reading is not None:
            return await asyncio.shield(self._reading)
        future: asyncio.Future[tuple[AuthDoc | None, int | None]] = (
            asyncio.get_running_loop().create_future())
        self._reading = future
        try:
            result = await self._read_at_leader()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: the waiters, if any, get it too
            raise
        finally:
            self._reading = None
        future.set_result(result)
        self._remember(result)
        return result

    def _remember(self, result: tuple[AuthDoc | None, int | None]) -> None:
        self._cached = result
        self._cached_at_s = self._clock.monotonic_s()

    async def _read_at_leader(self) -> tuple[AuthDoc | None, int | None]:
        try:
            result = await self._txn.execute(Op("get", AUTH_KEYSPACE, key=DOC_KEY),
                                             started_s=self._clock.monotonic_s(),
                                             timeout_s=self.timeout_s)
        except NotFound as exc:
            if "receipt" in exc.details:  # the key holds nothing
                return None, None
            raise
        read = result["reads"][0]
        if read["value"] is None:
            return None, None
        try:
            return AuthDoc.decode(bytes(read["value"])), int(read["version"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"the user store's document is unreadable: {exc}") from None

    async def write(self, doc: AuthDoc, version: int | None, *, txn_id: str | None = None
                    ) -> None:
        """Store ``doc`` if the stored one is still at ``version`` (None: if there is none);
        ConditionFailed otherwise. ``txn_id`` makes a retry the same transaction."""
        condition = (Condition(DOC_KEY, "absent") if version is None
                     else Condition(DOC_KEY, "version", version_us=version))
        request = TxnRequest(AUTH_KEYSPACE, txn_id, (), (condition,),
                             (Write(DOC_KEY, doc.encode()),))
        result = await self._txn.execute(Op("txn", AUTH_KEYSPACE, request),
                                         started_s=self._clock.monotonic_s(),
                                         timeout_s=self.timeout_s)
        self._remember((doc, int(result["commit_ts"])))

    async def change(self, edit: Callable[[AuthDoc], AuthDoc]) -> AuthDoc:
        """Apply ``edit`` to the latest document, again on a concurrent change."""
        for _ in range(MAX_CHANGE_ATTEMPTS):
            doc, version = await self.read()
            if doc is None:
                raise NotFound("the user store is not initialised yet (the first node with "
                               "auth enabled creates it)", reason="no_user_store")
            changed = edit(doc)
            try:
                await self.write(changed, version)
                return changed
            except ConditionFailed:
                continue  # another change landed first: apply ours to it
        raise ConditionFailed("the user store kept changing under this change; try again",
                              attempts=MAX_CHANGE_ATTEMPTS)
