"""Hinted handoff as a whole (Dynamo §4.6): the coordinator's hint sink, and
the replay of hints when their replica comes back.

``HintStore`` keeps hints durably and ``HintReplayer`` delivers them
(``hints``); ``HintWindow`` decides whether a replica still gets hints
(``hint_window``). ``HintedHandoff`` ties them to gossip's UP/DOWN events and
to the replica the hints are delivered to, so the node only wires it in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ringkv.clock import Clock
from ringkv.metrics import NodeMetrics
from ringkv.repair.hint_window import HintWindow
from ringkv.repair.hints import HintReplayer, HintStore
from ringkv.replica.client import ReplicaClient
from ringkv.versioning import Cell

log = logging.getLogger(__name__)


class HintedHandoff:
    def __init__(
        self,
        hints: HintStore,
        replicas: ReplicaClient,
        is_alive: Callable[[str], bool],
        clock: Clock,
        metrics: NodeMetrics,
        *,
        max_hint_window_s: float,
        replay_rate_per_s: int,
        write_timeout_s: float,
    ) -> None:
        self.hints = hints
        self._replicas = replicas
        self._is_alive = is_alive
        self._clock = clock
        self._metrics = metrics
        self._write_timeout_s = write_timeout_s
        self.window = HintWindow(max_hint_window_s)
        self.replayer = HintReplayer(
            hints,
            self._deliver,
            is_alive,
            rate_per_s=replay_rate_per_s,
            on_replayed=lambda n: metrics.hints_replayed.inc(n),
            on_expired=lambda n: metrics.hints_expired.inc(n),
        )

    # -- the coordinator's HintSink --------------------------------------------

    async def store_hint(
        self, target: str, keyspace: str, token: int, key: bytes, cell: Cell
    ) -> bool:
        if not self.window.accepts(target, self._clock.monotonic_s()):
            # Down longer than the hint window: stop collecting hints for it
            # (as Cassandra does); repair, not hints, brings it up to date.
            self._metrics.hints_not_stored.inc()
            return False
        stored = await self.hints.store_hint(target, keyspace, token, key, cell)
        if stored:
            self._metrics.hints_stored.inc()
        return stored

    # -- gossip events and chores ------------------------------------------------

    def peer_up(self, node_id: str) -> None:
        self.window.up(node_id)
        self.replayer.kick(node_id)

    def peer_down(self, node_id: str) -> None:
        self.window.down(node_id, self._clock.monotonic_s())

    async def chores(self) -> None:
        """Retry hints that are still waiting; drop expired ones for replicas still down."""
        self.replayer.kick_all()
        for target in list(self.hints.targets):
            if not self._is_alive(target):
                await self.replayer.drop_expired(target)

    async def stop(self) -> None:
        await self.replayer.stop()

    async def _deliver(
        self, target: str, keyspace: str, token: int, key: bytes, cell: Cell
    ) -> None:
        await self._replicas.write_future(
            target, keyspace, token, key, cell, self._write_timeout_s
        )
