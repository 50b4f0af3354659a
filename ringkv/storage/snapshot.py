"""Node snapshots and restore (shell): ``nodetool snapshot`` for one ringkv node.

``Snapshots.create`` waits until every write the store accepted so far is in
the engine, takes the engine's point-in-time view (a LevelDB snapshot, cheap
and on the loop), then copies the records ``snapshot_manifest`` allows into a
new LevelDB in a worker thread, in bounded batches, so the node keeps serving
meanwhile. The copy goes to ``snapshots/NAME.partial`` and is renamed to
``snapshots/NAME`` once it and its manifest are on disk: a snapshot either
exists whole or not at all. One at a time per node.

``restore`` runs before a node starts (``ringkv node --restore``): it checks
the snapshot may come back as this node (``restore_refusal``), refuses a data
directory that holds anything but snapshots unless told to overwrite it,
copies the snapshot's LevelDB in, and writes the node's identity (its tokens
and the peers it knew) from the manifest. The node then starts as after any
restart; the eventual tier catches up through hints, read repair and repair.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ringkv.clock import Clock
from ringkv.errors import ConfigError, NotFound, SnapshotRefused, StorageError
from ringkv.storage.engine import Engine, EngineView
from ringkv.storage.snapshot_manifest import (
    COPIED_RANGES,
    DATA_PREFIX,
    GROUP_RECORD_PREFIX,
    LEVELDB_DIR,
    MANIFEST_FILE,
    PARTIAL_SUFFIX,
    PEERS_FILE,
    SNAPSHOTS_DIR,
    Manifest,
    check_name,
    restore_refusal,
)

if TYPE_CHECKING:
    from ringkv.config import Config

log = logging.getLogger(__name__)

BATCH_RECORDS = 1000  # records per write batch of the copy
BATCH_BYTES = 4 * 1024 * 1024  # and at most about this many bytes
MAX_LISTED = 1000  # snapshots ``list`` reads at most


@dataclass(frozen=True)
class NodeEssentials:
    """What a manifest says of the node besides the copy itself."""

    node_id: str
    cluster: str
    tokens: tuple[int, ...]
    dc: str
    rack: str
    keyspaces: dict[str, dict[str, Any]]
    peers: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class CopyCounts:
    records: int
    keys: int
    txn_groups: int


def copy_view(view: EngineView, target: Path, *, batch_records: int = BATCH_RECORDS,
              batch_bytes: int = BATCH_BYTES) -> CopyCounts:
    """Copy the records a snapshot holds from ``view`` into a new LevelDB at ``target``
    (blocking: run it in a worker thread), and count what the view holds."""
    from ringkv.storage.leveldb import LevelDBEngine  # plyvel stays in that module

    out = LevelDBEngine(target, cache_mb=8, write_buffer_mb=4)
    records = keys = 0
    try:
        batch: list[tuple[bytes, bytes]] = []
        size = 0
        for start, stop in COPIED_RANGES:
            for key, value in view.scan(start, stop):
                batch.append((key, value))
                size += len(key) + len(value)
                records += 1
                keys += key[:1] == DATA_PREFIX
                if len(batch) >= batch_records or size >= batch_bytes:
                    out.write(batch, (), sync=False)
                    batch, size = [], 0
        if batch:
            out.write(batch, (), sync=False)
        out.sync()
    finally:
        out.close()
    groups = sum(1 for _ in view.scan(GROUP_RECORD_PREFIX,
                                      bytes([GROUP_RECORD_PREFIX[0] + 1])))
    return CopyCounts(records, keys, groups)


def directory_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass  # compacted away while we looked
    return total


def _write_json_durably(path: Path, doc: Any) -> None:
    with open(path, "w") as handle:
        json.dump(doc, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(snapshot_dir: Path) -> Manifest:
    path = snapshot_dir / MANIFEST_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{snapshot_dir} is not a snapshot: it has no {MANIFEST_FILE}",
                          field="restore", source=str(path)) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", field="restore",
                          source=str(path)) from None
    return Manifest.from_json(doc, str(path))


class Snapshots:
    """A node's snapshots, under ``<node data dir>/snapshots``."""

    def __init__(self, *, node_data_dir: Path, engine: Engine, clock: Clock,
                 flush: Callable[[], Awaitable[None]],
                 essentials: Callable[[], NodeEssentials]) -> None:
        self.root = node_data_dir / SNAPSHOTS_DIR
        self._engine = engine
        self._clock = clock
        self._flush = flush
        self._essentials = essentials
        self.running: str | None = None  # the name being taken now
        self._task: asyncio.Task[Manifest] | None = None

    async def create(self, name: str) -> Manifest:
        """Take snapshot ``name`` (``SnapshotRefused`` if one is being taken, or
        ``name`` exists). It is taken to the end even if the caller goes away."""
        check_name(name)
        if self.running is not None:
            raise SnapshotRefused(f"snapshot {self.running!r} is being taken on this node; "
                                  "one at a time", reason="running", running=self.running)
        if (self.root / name).exists():
            raise SnapshotRefused(f"a snapshot named {name!r} exists on this node",
                                  reason="exists", name=name)
        self.running = name  # claimed before the first await
        self._task = asyncio.get_running_loop().create_task(self._take(name))
        return await asyncio.shield(self._task)

    async def _take(self, name: str) -> Manifest:
        partial = self.root / (name + PARTIAL_SUFFIX)
        view: EngineView | None = None
        loop = asyncio.get_running_loop()
        try:
            # Every write accepted before this point is acknowledged only once it is
            # in the engine; wait for those still on their way, then fix the moment.
            await self._flush()
            essentials = self._essentials()
            created_us = self._clock.wall_us()
            view = self._engine.point_in_time()
            taken = view

            def work() -> Manifest:
                if partial.exists():
                    shutil.rmtree(partial)  # left by a crash mid-copy
                partial.mkdir(parents=True)
                counts = copy_view(taken, partial / LEVELDB_DIR)
                _write_json_durably(partial / PEERS_FILE, essentials.peers)
                manifest = Manifest(
                    name=name, node_id=essentials.node_id, cluster=essentials.cluster,
                    created_us=created_us, keys=counts.keys, records=counts.records,
                    size_bytes=directory_bytes(partial), tokens=essentials.tokens,
                    dc=essentials.dc, rack=essentials.rack, keyspaces=essentials.keyspaces,
                    txn_groups=counts.txn_groups)
                _write_json_durably(partial / MANIFEST_FILE, manifest.to_json())
                os.rename(partial, self.root / name)
                _fsync_dir(self.root)
                return manifest

            manifest = await loop.run_in_executor(None, work)
            log.info("snapshot %s taken: %d keys, %d records, %d bytes", name, manifest.keys,
                     manifest.records, manifest.size_bytes)
            return manifest
        except OSError as exc:
            raise StorageError(f"snapshot {name!r} failed: {exc}") from exc
        finally:
            if view is not None:
                view.close()
            if partial.exists():
                await loop.run_in_executor(None, shutil.rmtree, partial, True)
            self.running = None

    def list(self) -> list[dict[str, Any]]:
        """Every complete snapshot here, oldest first (one that cannot be read says why)."""
        if not self.root.is_dir():
            return []
        found: list[dict[str, Any]] = []
        for entry in sorted(self.root.iterdir())[:MAX_LISTED]:
            if not entry.is_dir() or entry.name.endswith(PARTIAL_SUFFIX):
                continue
            try:
                found.append(read_manifest(entry).summary())
            except ConfigError as exc:
                found.append({"name": entry.name, "error": exc.message})
        return sorted(found, key=lambda s: (s.get("created_us", 0), s["name"]))

    async def delete(self, name: str) -> None:
        check_name(name)
        if name == self.running:
            raise SnapshotRefused(f"snapshot {name!r} is still being taken", reason="running",
                                  running=name)
        path = self.root / name
        if not (path / MANIFEST_FILE).exists():
            raise NotFound(f"no snapshot named {name!r} on this node", name=name)
        try:
            await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, path)
        except OSError as exc:
            raise StorageError(f"cannot delete snapshot {name!r}: {exc}") from exc

    async def stop(self) -> None:
        """Let a snapshot being taken finish (its thread cannot be interrupted)."""
        if self._task is not None and not self._task.done():
            await asyncio.gather(self._task, return_exceptions=True)


# -- restore ---------------------------------------------------------------------------

KEPT_ON_OVERWRITE = frozenset({SNAPSHOTS_DIR, "generation"})  # gossip generations only rise


def restore(config: Config, snapshot_dir: Path, *, now_us: int, overwrite: bool) -> Manifest:
    """Make ``config``'s node data directory a copy of the snapshot at ``snapshot_dir``,
    before the node starts. ``ConfigError`` naming the field when it may not."""
    from ringkv.identity import FileIdentity

    snapshot_dir = snapshot_dir.resolve()
    manifest = read_manifest(snapshot_dir)
    refusal = restore_refusal(
        manifest, cluster=config.cluster.name, node_id=config.cluster.node_id,
        replace_node_id=config.cluster.replace_node_id or None,
        transactional_keyspaces=config.transactional_keyspaces(),
        now_us=now_us, gc_grace_s=config.timing.gc_grace_s)
    if refusal is not None:
        raise refusal
    source = snapshot_dir / LEVELDB_DIR
    if not source.is_dir():
        raise ConfigError(f"{snapshot_dir} has no {LEVELDB_DIR} directory", field="restore",
                          source=str(snapshot_dir))
    target = config.node_data_dir.resolve()
    target.mkdir(parents=True, exist_ok=True)
    if target in snapshot_dir.parents and target / SNAPSHOTS_DIR not in snapshot_dir.parents:
        raise ConfigError(f"the snapshot {snapshot_dir} lies inside the data directory it "
                          f"would replace, {target}", field="restore", source=str(snapshot_dir))
    occupied = sorted(p.name for p in target.iterdir() if p.name != SNAPSHOTS_DIR)
    if occupied and not overwrite:
        raise ConfigError(
            f"the data directory {target} is not empty (it holds {', '.join(occupied[:5])}); "
            "restore into an empty one, or pass --restore-overwrite to replace what it holds",
            field="cluster.data_dir", source=str(target))
    for name in occupied:
        if name in KEPT_ON_OVERWRITE:
            continue
        path = target / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    staging = target / (LEVELDB_DIR + ".restoring")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(source, staging)
    os.rename(staging, target / LEVELDB_DIR)
    _fsync_dir(target)
    identity = FileIdentity(config)
    if not config.cluster.replace_node_id:
        # The same node again: its tokens (a restart must not move data) and the
        # peers it knew. A replacement takes the dead node's tokens from the ring.
        identity.save_tokens(manifest.tokens, bootstrapped=True)
        peers_path = snapshot_dir / PEERS_FILE
        try:
            peers = json.loads(peers_path.read_text()) if peers_path.exists() else {}
        except (OSError, ValueError):
            peers = {}
        if isinstance(peers, dict) and peers:
            identity.save_peers(peers)
    log.warning("restored node %s from snapshot %s (%d keys, taken %s); writes since then "
                "reach it through hints, read repair and repair: run `ringkv repair` on it once "
                "it is up", config.cluster.node_id, manifest.name, manifest.keys, manifest.created)
    return manifest
