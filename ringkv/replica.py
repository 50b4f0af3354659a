"""What a replica does when a coordinator asks it something.

``LocalReplica`` serves writes, reads, digests and range scans from this
node's ``LocalStore``. The coordinator calls it directly for the node's own
replica; the internode handler calls it for requests from other nodes, so a
local and a remote replica behave exactly alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ringkv.errors import BadRequest, PeerUnreachable, RingKVError
from ringkv.limits import MAX_SCAN_ITEMS, MAX_SCAN_REPLY_BYTES, SCAN_ITEM_OVERHEAD_BYTES
from ringkv.messages import ScanReply
from ringkv.storage.store import LocalStore
from ringkv.versioning import Cell, cell_digest, check_timestamp

T = TypeVar("T")


class LocalReplica:
    def __init__(self, store: LocalStore) -> None:
        self.store = store

    async def write(self, keyspace: str, token: int, key: bytes, cell: Cell) -> Cell:
        winner, committed = self.write_nowait(keyspace, token, key, cell)
        await committed
        return winner

    def write_nowait(
        self, keyspace: str, token: int, key: bytes, cell: Cell
    ) -> tuple[Cell, asyncio.Future[None]]:
        """The stored winner, and a future that resolves once it is committed."""
        try:
            check_timestamp(cell.ts)
        except ValueError as exc:
            raise BadRequest(str(exc), field="timestamp") from None
        return self.store.apply_nowait(keyspace, token, key, cell)

    def read(self, keyspace: str, token: int, key: bytes) -> Cell | None:
        return self.store.read(keyspace, token, key)

    async def scan(
        self,
        keyspace: str,
        after: tuple[int, bytes | None],
        end_token: int,
        limit: int,
    ) -> ScanReply:
        """Cells with (token, key) > ``after`` and token <= ``end_token``, in order.

        ``after = (t, None)`` excludes every key of token t. The reply is
        marked truncated when it stops short of ``limit`` for its own bounds.
        Those bounds hold whatever the caller asks: MAX_SCAN_ITEMS items and
        about MAX_SCAN_REPLY_BYTES, so the reply fits one frame (ringkv.limits).
        """
        capped = max(1, min(limit, MAX_SCAN_ITEMS))
        after_token, after_key = after
        if after_key is not None:
            # Finish the keys that share after_token first, then move on.
            same = await self.store.scan(keyspace, after=(after_token, after_key), limit=capped)
            found = [item for item in same if item.token <= end_token][:capped]
        elif after_token >= end_token:
            found = []
        else:
            found = await self.store.scan_range(keyspace, after_token, end_token, limit=capped)
        items: list[tuple[int, bytes, Cell]] = []
        size = 0
        for item in found:
            size += len(item.key) + len(item.cell.value) + SCAN_ITEM_OVERHEAD_BYTES
            if items and size > MAX_SCAN_REPLY_BYTES:
                return ScanReply(items, truncated=True)
            items.append((item.token, item.key, item.cell))
        return ScanReply(items, truncated=len(items) == capped < limit)


class ReplicaClient(Protocol):
    """How a coordinator talks to one replica, named by node id.

    ``ReplicaRouter`` implements it for the coordinator (this node locally,
    others remotely); ``internode.InternodeReplicas`` implements it for peers.
    Both also offer ``write_soon``, ``read_soon`` and ``digest_soon``: the
    same calls, answered through a future rather than a coroutine, so that a
    coordinator waiting on several replicas needs no task per replica (see
    ``soon_of``).
    """

    async def write(
        self, node_id: str, keyspace: str, token: int, key: bytes, cell: Cell, timeout_s: float
    ) -> None: ...

    async def read(
        self, node_id: str, keyspace: str, token: int, key: bytes, timeout_s: float
    ) -> Cell | None: ...

    async def digest(
        self, node_id: str, keyspace: str, token: int, key: bytes, timeout_s: float
    ) -> bytes: ...

    async def scan(
        self,
        node_id: str,
        keyspace: str,
        after: tuple[int, bytes | None],
        end_token: int,
        limit: int,
        timeout_s: float,
    ) -> ScanReply: ...


def soon_of(client: ReplicaClient, verb: str) -> Callable[..., asyncio.Future[Any]]:
    """``client``'s future-returning form of ``verb`` ("write", "read" or "digest").

    A client without one (a test double, say) is wrapped: its coroutine runs
    in a task, which is also a future.
    """
    soon = getattr(client, f"{verb}_soon", None)
    if soon is not None:
        return soon
    call = getattr(client, verb)

    def in_a_task(*args: Any) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(call(*args))
        # The loop keeps only weak references to tasks; nobody else may hold this one.
        _WRAPPED.add(task)
        task.add_done_callback(_WRAPPED.discard)
        return task

    return in_a_task


_WRAPPED: set[asyncio.Future[Any]] = set()


def _unreachable(node_id: str) -> PeerUnreachable:
    return PeerUnreachable(f"no internode transport to reach {node_id}", node_id=node_id)


def failed_future(error: RingKVError) -> asyncio.Future[Any]:
    """A future that already failed with ``error``."""
    answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    answer.set_exception(error)
    return answer


def _settled_now(compute: Callable[[], T]) -> asyncio.Future[T]:
    """A future already holding ``compute()``'s result, or its RingKVError."""
    answer: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    try:
        answer.set_result(compute())
    except RingKVError as exc:
        answer.set_exception(exc)
    return answer


class ReplicaRouter:
    """The coordinator's ``ReplicaClient``: this node locally, others over the network."""

    def __init__(self, node_id: str, local: LocalReplica, remote: ReplicaClient | None) -> None:
        self.node_id = node_id
        self.local = local
        self.remote = remote

    @property
    def remote(self) -> ReplicaClient | None:
        return self._remote_client

    @remote.setter
    def remote(self, client: ReplicaClient | None) -> None:
        # Looked up once here, not on every read.
        self._remote_client = client
        self._remote_soon = (
            {} if client is None
            else {verb: soon_of(client, verb) for verb in ("write", "read", "digest")}
        )

    def _remote(self, node_id: str) -> ReplicaClient:
        if self._remote_client is None:
            raise _unreachable(node_id)
        return self._remote_client

    def _ask_remote(self, verb: str, node_id: str, *args: Any) -> asyncio.Future[Any]:
        soon = self._remote_soon.get(verb)
        if soon is None:
            return failed_future(_unreachable(node_id))
        return soon(node_id, *args)

    async def write(
        self, node_id: str, keyspace: str, token: int, key: bytes, cell: Cell, timeout_s: float
    ) -> None:
        await self.write_soon(node_id, keyspace, token, key, cell, timeout_s)

    async def read(
        self, node_id: str, keyspace: str, token: int, key: bytes, timeout_s: float
    ) -> Cell | None:
        if node_id == self.node_id:
            return self.local.read(keyspace, token, key)  # the ONE fast path: not even a future
        return await self._ask_remote("read", node_id, keyspace, token, key, timeout_s)

    async def digest(
        self, node_id: str, keyspace: str, token: int, key: bytes, timeout_s: float
    ) -> bytes:
        return await self.digest_soon(node_id, keyspace, token, key, timeout_s)

    def write_soon(
        self, node_id: str, keyspace: str, token: int, key: bytes, cell: Cell, timeout_s: float
    ) -> asyncio.Future[None]:
        if node_id == self.node_id:
            # The local write's future is its group commit: no task, no network.
            try:
                return self.local.write_nowait(keyspace, token, key, cell)[1]
            except RingKVError as exc:
                return failed_future(exc)
        return self._ask_remote("write", node_id, keyspace, token, key, cell, timeout_s)

    def read_soon(
        self, node_id: str, keyspace: str, token: int, key: bytes, timeout_s: float
    ) -> asyncio.Future[Cell | None]:
        if node_id == self.node_id:
            return _settled_now(lambda: self.local.read(keyspace, token, key))
        return self._ask_remote("read", node_id, keyspace, token, key, timeout_s)

    def digest_soon(
        self, node_id: str, keyspace: str, token: int, key: bytes, timeout_s: float
    ) -> asyncio.Future[bytes]:
        if node_id == self.node_id:
            return _settled_now(lambda: cell_digest(self.local.read(keyspace, token, key)))
        return self._ask_remote("digest", node_id, keyspace, token, key, timeout_s)

    async def scan(
        self,
        node_id: str,
        keyspace: str,
        after: tuple[int, bytes | None],
        end_token: int,
        limit: int,
        timeout_s: float,
    ) -> ScanReply:
        if node_id == self.node_id:
            return await self.local.scan(keyspace, after, end_token, limit)
        return await self._remote(node_id).scan(
            node_id, keyspace, after, end_token, limit, timeout_s
        )
