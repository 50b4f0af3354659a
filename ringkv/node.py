"""The composition root: one ringkv node built from config, a clock and an engine.

Everything a node is made of is wired together here and nowhere else, so the
simulator can build the very same node on a virtual clock and a memory engine.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ringkv.clock import Clock, HybridLogicalClock, SystemClock
from ringkv.config import Config
from ringkv.coordinator import Coordinator, KeyspaceSettings, ReadResult, WriteResult
from ringkv.errors import ConfigError
from ringkv.metrics import NodeMetrics
from ringkv.quorum import ConsistencyLevel
from ringkv.replica import LocalReplica, ReplicaRouter
from ringkv.ring import NodeInfo, TokenRing, allocate_tokens, token_for
from ringkv.storage.engine import Engine
from ringkv.storage.memory import MemoryEngine
from ringkv.storage.store import LocalStore
from ringkv.versioning import Cell, tombstone

log = logging.getLogger(__name__)

IDENTITY_FILE = "node.json"


def open_engine(config: Config) -> Engine:
    if config.storage.engine == "memory":
        return MemoryEngine()
    # Imported here so that nodes on the memory engine never load plyvel.
    from ringkv.storage.leveldb import LevelDBEngine

    return LevelDBEngine(
        config.node_data_dir / "leveldb",
        cache_mb=config.storage.leveldb_cache_mb,
        write_buffer_mb=config.storage.leveldb_write_buffer_mb,
    )


class Node:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        engine: Engine | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.node_id = config.cluster.node_id
        self.clock = clock or SystemClock()
        self.hlc = HybridLogicalClock(self.clock)
        self._rng = rng or random.Random()
        self.metrics = NodeMetrics(self.node_id)
        self.draining = False
        self.engine = engine or open_engine(config)
        self.store = LocalStore(
            self.engine,
            self.clock,
            sync_mode=config.storage.commit_sync,
            periodic_sync_interval_ms=config.storage.periodic_sync_interval_ms,
            gc_grace_s=config.timing.gc_grace_s,
            sweep_interval_s=config.timing.tombstone_sweep_interval_s,
        )
        self.local_replica = LocalReplica(self.store)
        self.router = ReplicaRouter(self.node_id, self.local_replica, remote=None)
        self.info = NodeInfo(self.node_id, dc=config.cluster.dc, rack=config.cluster.rack)
        self.tokens: tuple[int, ...] = ()
        self.ring = TokenRing({})
        self._keyspaces = {
            name: KeyspaceSettings(name, ks.replication_factor, ks.default_consistency)
            for name, ks in config.keyspaces.items()
        }
        self.coordinator = Coordinator(
            self.node_id,
            ring=lambda: self.ring,
            is_alive=self.is_alive,
            replicas=self.router,
            keyspaces=lambda: self._keyspaces,
            clock=self.clock,
            hlc=self.hlc,
            read_timeout_s=config.timing.read_timeout_ms / 1000,
            write_timeout_s=config.timing.write_timeout_ms / 1000,
            speculative_retry_percentile=config.timing.speculative_retry_percentile,
            speculative_retry_min_s=config.timing.speculative_retry_min_ms / 1000,
        )
        self.metrics.gauge(
            "ringkv_storage_bytes", "Bytes used by this node's storage engine", self.store.size_bytes
        )

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self.tokens = self._load_or_allocate_tokens()
        self.ring = TokenRing({self.node_id: self.tokens}, {self.node_id: self.info})
        await self.store.start()
        log.info("node %s started with %d tokens", self.node_id, len(self.tokens))

    async def stop(self) -> None:
        """Flush and close storage. The HTTP server has already drained by now."""
        self.draining = True
        await self.store.close()
        log.info("node %s stopped", self.node_id)

    def _load_or_allocate_tokens(self) -> tuple[int, ...]:
        """Reuse this node's tokens across restarts; a restart must not move data."""
        if isinstance(self.engine, MemoryEngine):
            return tuple(allocate_tokens(None, self.config.cluster.num_tokens, self._rng))
        path = self.config.node_data_dir / IDENTITY_FILE
        if path.exists():
            identity = json.loads(path.read_text())
            for field, expected in (("cluster", self.config.cluster.name), ("node_id", self.node_id)):
                if identity.get(field) != expected:
                    raise ConfigError(
                        f"{path} belongs to {field} {identity.get(field)!r}, not {expected!r}; "
                        f"refusing to serve another node's data",
                        field=f"cluster.{'name' if field == 'cluster' else 'node_id'}",
                        source=str(path),
                    )
            return tuple(int(t) for t in identity["tokens"])
        tokens = tuple(allocate_tokens(None, self.config.cluster.num_tokens, self._rng))
        _write_atomically(
            path,
            json.dumps({"cluster": self.config.cluster.name, "node_id": self.node_id,
                        "tokens": list(tokens)}),
        )
        return tokens

    # -- membership -------------------------------------------------------------

    def is_alive(self, node_id: str) -> bool:
        return node_id == self.node_id

    # -- operations ------------------------------------------------------------

    async def put(
        self,
        keyspace: str,
        key: bytes,
        value: bytes,
        ttl_s: int | None,
        consistency: ConsistencyLevel | None,
    ) -> WriteResult:
        ts = self.hlc.now()
        ttl_s = ttl_s if ttl_s is not None else (self.config.timing.default_ttl_s or None)
        expires = ts.wall_us + ttl_s * 1_000_000 if ttl_s else None
        return await self._write(keyspace, key, Cell(value, ts, False, expires), consistency)

    async def delete(
        self, keyspace: str, key: bytes, consistency: ConsistencyLevel | None
    ) -> WriteResult:
        return await self._write(keyspace, key, tombstone(self.hlc.now()), consistency)

    async def _write(
        self, keyspace: str, key: bytes, cell: Cell, consistency: ConsistencyLevel | None
    ) -> WriteResult:
        return await self.coordinator.write(keyspace, key, cell, consistency)

    async def get(
        self, keyspace: str, key: bytes, consistency: ConsistencyLevel | None
    ) -> ReadResult:
        return await self.coordinator.read(keyspace, key, consistency)

    def read_local(self, keyspace: str, key: bytes) -> Cell | None:
        """What this node's own replica holds, with no coordination."""
        self.coordinator.keyspace(keyspace)
        return self.local_replica.read(keyspace, token_for(key), key)

    # -- introspection ---------------------------------------------------------

    def status(self) -> dict[str, Any]:
        ownership = self.ring.ownership(1) if len(self.ring) else {}
        return {
            "node_id": self.node_id,
            "cluster": self.config.cluster.name,
            "nodes": [
                {
                    "node_id": self.node_id,
                    "address": f"{self.config.cluster.listen_host}:{self.config.cluster.client_port}",
                    "liveness": "UP",
                    "status": "NORMAL",
                    "load_bytes": self.store.size_bytes(),
                    "tokens": len(self.tokens),
                    "owns": ownership.get(self.node_id, 0.0),
                    "dc": self.info.dc,
                    "rack": self.info.rack,
                }
            ],
            "keyspaces": self._keyspace_json(),
            "storage": {"sync_mode": self.config.storage.commit_sync,
                        **vars(self.store.stats)},
        }

    def ring_info(self) -> dict[str, Any]:
        return {
            "partitioner": "murmur3",
            "nodes": [
                {
                    "node_id": node_id,
                    "client_address": self._client_address(node_id),
                    "tokens": list(self.ring.tokens_of(node_id)),
                    "up": self.is_alive(node_id),
                }
                for node_id in self.ring.node_ids
            ],
            "keyspaces": self._keyspace_json(),
        }

    def _client_address(self, node_id: str) -> str:
        return f"{self.config.cluster.listen_host}:{self.config.cluster.client_port}"

    def _keyspace_json(self) -> Mapping[str, Any]:
        return {
            name: {"replication_factor": ks.replication_factor,
                   "default_consistency": ks.default_consistency.value}
            for name, ks in self._keyspaces.items()
        }


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
