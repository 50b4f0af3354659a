"""The coordinator's ``ReplicaClient``: this node locally, others over the network."""

from __future__ import annotations

import asyncio

from ringkv.errors import RingKVError
from ringkv.messages import ScanReply
from ringkv.replica.client import ReplicaClient, failed_future, settled_future, unreachable
from ringkv.replica.local import LocalReplica
from ringkv.versioning import Cell, cell_digest


class ReplicaRouter:
    def __init__(self, node_id: str, local: LocalReplica, remote: ReplicaClient | None) -> None:
        self.node_id = node_id
        self.local = local
        self.remote = remote

    def write_future(
        self, node_id: str, keyspace: str, token: int, key: bytes, cell: Cell, timeout_s: float
    ) -> asyncio.Future[None]:
        if node_id == self.node_id:
            # The local write's future is its group commit: no task, no network.
            try:
                return self.local.write_future(keyspace, token, key, cell)
            except RingKVError as exc:
                return failed_future(exc)
        if self.remote is None:
            return failed_future(unreachable(node_id))
        return self.remote.write_future(node_id, keyspace, token, key, cell, timeout_s)

    def read_future(
        self, node_id: str, keyspace: str, token: int, key: bytes, timeout_s: float
    ) -> asyncio.Future[Cell | None]:
        if node_id == self.node_id:
            return settled_future(lambda: self.local.read(keyspace, token, key))
        if self.remote is None:
            return failed_future(unreachable(node_id))
        return self.remote.read_future(node_id, keyspace, token, key, timeout_s)

    def digest_future(
        self, node_id: str, keyspace: str, token: int, key: bytes, timeout_s: float
    ) -> asyncio.Future[bytes]:
        if node_id == self.node_id:
            return settled_future(lambda: cell_digest(self.local.read(keyspace, token, key)))
        if self.remote is None:
            return failed_future(unreachable(node_id))
        return self.remote.digest_future(node_id, keyspace, token, key, timeout_s)

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
        if self.remote is None:
            raise unreachable(node_id)
        return await self.remote.scan(node_id, keyspace, after, end_token, limit, timeout_s)
