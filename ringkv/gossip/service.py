"""The asyncio shell around the pure ``Gossiper``: timers, frames and events.

Every interval it ticks the gossiper and sends the digests it returns; each
gossip frame that arrives is decoded, handed to the gossiper, and its replies
sent. Gossip frames are one-way internode messages (``gossip.msg``) carrying
the sender's listening address, because replies go to that address.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from ringkv.clock import Clock
from ringkv.errors import ProtocolError
from ringkv.gossip.gossiper import Event, Gossiper, Outgoing
from ringkv.gossip.state import decode_message, parse_address
from ringkv.net.transport import ADDRESS_PEER_PREFIX

log = logging.getLogger(__name__)

VERB = "gossip.msg"


class OneWaySender(Protocol):
    def set_peer_address(self, node_id: str, host: str, port: int) -> None: ...

    def forget_peer(self, node_id: str) -> None: ...

    def send_oneway(self, node_id: str, verb: str, payload: Any) -> None: ...


# Gossip answers a sender it knows only by the address the sender names (a
# node that is joining, say). Such address-only transport peers are kept for
# the most recent senders only, so a peer that names a new address in every
# message can neither grow the transport's peer table nor have this node
# dial more than this many addresses of its choosing. Seeds are always kept.
MAX_ADDRESS_PEERS = 64


def address_peer_id(address: str) -> str:
    """The transport name for a peer known only by address (a seed, before we know its id)."""
    return f"{ADDRESS_PEER_PREFIX}{address}"


class GossipService:
    def __init__(
        self,
        gossiper: Gossiper,
        transport: OneWaySender,
        clock: Clock,
        rng: random.Random,
        *,
        self_address: str,
        interval_s: float,
        on_events: Callable[[list[Event]], None],
    ) -> None:
        self.gossiper = gossiper
        self._transport = transport
        self._clock = clock
        self._rng = rng
        self._self_address = self_address
        self._interval_s = interval_s
        self._on_events = on_events
        self._task: asyncio.Task[None] | None = None
        self._seeds = frozenset(gossiper.seeds)
        self._address_peers: OrderedDict[str, None] = OrderedDict()  # non-seed, oldest first

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def tick_now(self) -> None:
        """One gossip round (also used at start-up to speed up joining)."""
        self._send(self.gossiper.tick(self._clock.monotonic_s(), self._rng))
        self._deliver_events()

    def shadow_round_now(self) -> None:
        """Ask every seed and known peer for everything it knows (``Gossiper.shadow_round``)."""
        self._send(self.gossiper.shadow_round())

    async def _run(self) -> None:
        while True:
            try:
                self.tick_now()
            except Exception:  # noqa: BLE001 - gossip must keep going whatever happens
                log.exception("gossip round failed")
            await self._clock.sleep(self._interval_s)

    async def handle(self, from_node: str, verb: str, payload: Any) -> None:
        """Internode handler for gossip frames. Raises only ProtocolError."""
        if verb != VERB or not isinstance(payload, dict):
            raise ProtocolError(f"bad gossip frame {verb!r}")
        sender = payload.get("from")
        if not isinstance(sender, str):
            raise ProtocolError("gossip frame has no sender address")
        try:
            parse_address(sender)
        except ValueError:
            raise ProtocolError(f"gossip sender address {sender!r} is not host:port") from None
        message = decode_message(payload.get("m"))
        self._send(self.gossiper.handle(sender, message, self._clock.monotonic_s()))
        self._deliver_events()

    def _send(self, outgoing: list[Outgoing]) -> None:
        for out in outgoing:
            peer = self._peer_id_for(out.to_addr)
            self._transport.send_oneway(
                peer, VERB, {"from": self._self_address, "m": out.msg.to_wire()}
            )

    def _peer_id_for(self, address: str) -> str:
        """Gossip addresses peers by address; the transport by node id."""
        for node_id in self.gossiper.endpoint_states():
            if self.gossiper.address_of(node_id) == address:
                return node_id
        peer = address_peer_id(address)
        host, port = parse_address(address)
        self._transport.set_peer_address(peer, host, port)
        if address not in self._seeds:
            self._address_peers[peer] = None
            self._address_peers.move_to_end(peer)
            while len(self._address_peers) > MAX_ADDRESS_PEERS:
                oldest, _ = self._address_peers.popitem(last=False)
                self._transport.forget_peer(oldest)
        return peer

    def _deliver_events(self) -> None:
        events = self.gossiper.drain_events()
        if events:
            self._on_events(events)
