"""How a coordinator talks to one replica, named by node id.

One naming rule across ringkv: a method whose name ends in ``_future``
returns an ``asyncio.Future`` and never blocks. A coordinator waiting on
several replicas waits on their futures, with no task per replica (on Python
3.11 a task per replica request was a large share of what a request cost).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ringkv.errors import PeerUnreachable, RingKVError
from ringkv.messages import ScanReply
from ringkv.versioning import Cell

T = TypeVar("T")


class ReplicaClient(Protocol):
    """``ReplicaRouter`` implements it for the coordinator (this node locally,
    others remotely); ``InternodeReplicas`` implements it for peers."""

    def write_future(
        self, node_id: str, keyspace: str, token: int, key: bytes, cell: Cell, timeout_s: float
    ) -> asyncio.Future[None]: ...

    def read_future(
        self, node_id: str, keyspace: str, token: int, key: bytes, timeout_s: float
    ) -> asyncio.Future[Cell | None]: ...

    def digest_future(
        self, node_id: str, keyspace: str, token: int, key: bytes, timeout_s: float
    ) -> asyncio.Future[bytes]: ...

    async def scan(
        self,
        node_id: str,
        keyspace: str,
        after: tuple[int, bytes | None],
        end_token: int,
        limit: int,
        timeout_s: float,
    ) -> ScanReply: ...


def unreachable(node_id: str) -> PeerUnreachable:
    return PeerUnreachable(f"no internode transport to reach {node_id}", node_id=node_id)


def failed_future(error: RingKVError) -> asyncio.Future[Any]:
    """A future that already failed with ``error``."""
    answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    answer.set_exception(error)
    return answer


def settled_future(compute: Callable[[], T]) -> asyncio.Future[T]:
    """A future already holding ``compute()``'s result, or its RingKVError."""
    answer: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    try:
        answer.set_result(compute())
    except RingKVError as exc:
        answer.set_exception(exc)
    return answer
