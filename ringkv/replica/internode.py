"""Replica verbs over the internode transport: the client side and the serving side.

``InternodeReplicas`` is how a coordinator reaches a replica on another node;
``InternodeHandler`` is what a node runs for each request that arrives from a
peer. Both speak the messages in ``ringkv.messages``. Gossip frames are passed
to the gossip service untouched. ``InternodeHandler.answer_future`` is the
transport's fast path (see ``ringkv.net.rpc``): reads, digests and writes are
answered through a future, without a task of their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

from ringkv import messages as m
from ringkv.hlc import HybridLogicalClock
from ringkv.errors import ProtocolError, RingKVError
from ringkv.net.rpc import Requester, resolved_future
from ringkv.replica.client import failed_future
from ringkv.replica.local import LocalReplica
from ringkv.versioning import Cell, cell_digest

T = TypeVar("T")

class InternodeReplicas:
    def __init__(self, transport: Requester) -> None:
        self._transport = transport

    def _future(
        self, node_id: str, verb: str, payload: Any, timeout_s: float, convert: Callable[[Any], T]
    ) -> asyncio.Future[T]:
        """The parsed answer to one request, as a future: no task is needed to wait.

        A request that cannot even be sent fails the future, as a failed
        answer would; cancelling the future abandons the request.
        """
        try:
            return self._transport.request_future(node_id, verb, payload, timeout_s, convert)
        except RingKVError as exc:
            return failed_future(exc)

    def read_future(
        self, node_id: str, keyspace: str, token: int, key: bytes, timeout_s: float
    ) -> asyncio.Future[Cell | None]:
        payload = m.KeyRef(keyspace, token, key).to_wire()
        return self._future(node_id, m.READ, payload, timeout_s, m.cell_from_wire)

    def digest_future(
        self, node_id: str, keyspace: str, token: int, key: bytes, timeout_s: float
    ) -> asyncio.Future[bytes]:
        payload = m.KeyRef(keyspace, token, key).to_wire()
        return self._future(node_id, m.DIGEST, payload, timeout_s, partial(_digest_bytes, node_id))

    def write_future(
        self, node_id: str, keyspace: str, token: int, key: bytes, cell: Cell, timeout_s: float
    ) -> asyncio.Future[None]:
        """Resolves to None once the replica has the write durably (its acknowledgement)."""
        payload = m.KeyRef(keyspace, token, key).to_wire()
        payload["c"] = m.cell_to_wire(cell)
        return self._future(node_id, m.WRITE, payload, timeout_s, _acknowledged)

    async def scan(
        self,
        node_id: str,
        keyspace: str,
        after: tuple[int, bytes | None],
        end_token: int,
        limit: int,
        timeout_s: float,
    ) -> m.ScanReply:
        request = m.ScanRequest(keyspace, after[0], after[1], end_token, limit)
        result = await self._transport.request(node_id, m.SCAN, request.to_wire(), timeout_s)
        return m.ScanReply.from_wire(result)


def _acknowledged(_payload: Any) -> None:
    """A write's answer carries nothing: that it came is the acknowledgement."""
    return None


def _digest_bytes(node_id: str, result: Any) -> bytes:
    if not isinstance(result, bytes):
        raise ProtocolError(f"digest from {node_id} is not bytes")
    return result


GossipHandler = Callable[[str, str, Any], Awaitable[Any]]


class InternodeHandler:
    """Serves replica verbs from the local store; hands gossip verbs to gossip."""

    def __init__(
        self,
        local: LocalReplica,
        hlc: HybridLogicalClock,
        known_keyspace: Callable[[str], bool],
        gossip: GossipHandler | None = None,
        gossip_prefix: str = "gossip.",
        txn: GossipHandler | None = None,
        txn_prefix: str = "txn.",
        repair: GossipHandler | None = None,
    ) -> None:
        self._local = local
        self._hlc = hlc
        self._known_keyspace = known_keyspace
        self._gossip = gossip
        self._gossip_prefix = gossip_prefix
        self._txn = txn  # the transactional tier's verbs (txn/service.py)
        self._txn_prefix = txn_prefix
        self._repair = repair  # anti-entropy repair's verbs (repair/service.py)

    async def __call__(self, from_node: str, verb: str, payload: Any) -> Any:
        if verb.startswith(self._gossip_prefix) and self._gossip is not None:
            return await self._gossip(from_node, verb, payload)
        if verb.startswith(self._txn_prefix) and self._txn is not None:
            return await self._txn(from_node, verb, payload)
        if verb.startswith(m.REPAIR_PREFIX) and self._repair is not None:
            return await self._repair(from_node, verb, payload)
        if verb == m.SCAN:
            request = m.ScanRequest.from_wire(payload)
            self._check_keyspace(request.keyspace)
            reply = await self._local.scan(
                request.keyspace,
                (request.after_token, request.after_key),
                request.end_token,
                request.limit,
            )
            return reply.to_wire()
        answer = self.answer_future(from_node, verb, payload)
        if answer is None:
            raise ProtocolError(f"unknown verb {verb!r}")
        return await answer

    def answer_future(self, from_node: str, verb: str, payload: Any) -> asyncio.Future[Any] | None:
        """The replica verbs that need no task of their own (see ``ringkv.net.rpc``);
        None for the others.

        Reads and digests are local reads that never wait: their future is
        already done, and the transport writes the response at once. A write's
        is the future of its group commit, which resolves to None (the
        acknowledgement) once the write is durable.
        """
        if verb != m.READ and verb != m.DIGEST and verb != m.WRITE:
            return None
        ref = m.KeyRef.from_wire(payload)
        self._check_keyspace(ref.keyspace)
        if verb == m.WRITE:
            cell = m.cell_from_wire(payload.get("c"))
            if cell is None:
                raise ProtocolError("write carries no cell")
            # HLC receive rule: later local writes get later timestamps.
            self._hlc.observe(cell.ts)
            return self._local.write_future(ref.keyspace, ref.token, ref.key, cell)
        cell = self._local.read(ref.keyspace, ref.token, ref.key)
        return resolved_future(m.cell_to_wire(cell) if verb == m.READ else cell_digest(cell))

    def _check_keyspace(self, keyspace: str) -> None:
        if not self._known_keyspace(keyspace):
            raise ProtocolError(f"unknown keyspace {keyspace!r}")
