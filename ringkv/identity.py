"""A node's identity across restarts: its tokens, the peers it has seen, and
its gossip generation.

A restart must not move data (same tokens), must not believe it is alone
(peers from the last run; see ``membership``), and must announce a higher
gossip generation than before, or peers ignore it. ``FileIdentity`` keeps
these in the node's data directory (Cassandra keeps them in ``system.local``
and ``system.peers``); ``MemoryIdentity`` keeps them in memory, for the
memory engine and the simulator (one per simulated machine).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ringkv.config import Config
from ringkv.errors import ConfigError

log = logging.getLogger(__name__)

IDENTITY_FILE = "node.json"
PEERS_FILE = "peers.json"  # the ring as last seen, so a restart does not start from nothing
GENERATION_FILE = "generation"  # the last gossip generation used, so the next one is higher


class FileIdentity:
    """A node's identity in its data directory: tokens in node.json, peers in
    peers.json, the last gossip generation in ``generation``."""

    def __init__(self, config: Config) -> None:
        self._config = config

    def load_tokens(self) -> tuple[int, ...] | None:
        """This node's tokens from an earlier run; a restart must not move data."""
        path = self._config.node_data_dir / IDENTITY_FILE
        if not path.exists():
            return None
        identity = json.loads(path.read_text())
        cluster = self._config.cluster
        for field, expected in (("cluster", cluster.name), ("node_id", cluster.node_id)):
            if identity.get(field) != expected:
                raise ConfigError(
                    f"{path} belongs to {field} {identity.get(field)!r}, not {expected!r}; "
                    f"refusing to serve another node's data",
                    field=f"cluster.{'name' if field == 'cluster' else 'node_id'}",
                    source=str(path),
                )
        return tuple(int(t) for t in identity["tokens"])

    def save_tokens(self, tokens: tuple[int, ...], *, bootstrapped: bool = True) -> None:
        """``bootstrapped=False``: the tokens are chosen but their ranges are
        still streaming in; a restart streams them again before going NORMAL."""
        cluster = self._config.cluster
        write_atomically(
            self._config.node_data_dir / IDENTITY_FILE,
            json.dumps({"cluster": cluster.name, "node_id": cluster.node_id,
                        "tokens": list(tokens), "bootstrapped": bootstrapped}),
        )

    def load_bootstrapped(self) -> bool:
        """Whether this node's ranges have all arrived (True for files from before streaming)."""
        path = self._config.node_data_dir / IDENTITY_FILE
        return not path.exists() or bool(json.loads(path.read_text()).get("bootstrapped", True))

    def save_left(self, why: str) -> None:
        """This node left the ring (``why``: "decommissioned" or "removed"): its
        data stops being kept up to date, so it must never serve again."""
        path = self._config.node_data_dir / IDENTITY_FILE
        identity = json.loads(path.read_text()) if path.exists() else {}
        write_atomically(path, json.dumps({**identity, "left": why}))

    def load_left(self) -> str | None:
        """Why this node left the ring, or None if it has not."""
        path = self._config.node_data_dir / IDENTITY_FILE
        left = json.loads(path.read_text()).get("left") if path.exists() else None
        return str(left) if left else None

    def load_peers(self) -> dict[str, dict[str, Any]]:
        path = self._config.node_data_dir / PEERS_FILE
        if not path.exists():
            return {}
        try:
            peers = json.loads(path.read_text())
            for peer in peers.values():
                [int(t) for t in peer["tokens"]]
                str(peer["dc"]), str(peer["rack"])
            return peers
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Gossip will rebuild it; a node that knows no peers is only less safe.
            log.error("ignoring unreadable %s: %s", path, exc)
            return {}

    def save_peers(self, peers: dict[str, dict[str, Any]]) -> None:
        write_atomically(self._config.node_data_dir / PEERS_FILE, json.dumps(peers))

    def next_generation(self, now_s: int) -> int:
        path = self._config.node_data_dir / GENERATION_FILE
        last = int(path.read_text()) if path.exists() else 0
        generation = max(now_s, last + 1)
        write_atomically(path, str(generation))
        return generation


class MemoryIdentity:
    """A node's identity held in memory. A fresh one per Node forgets it on restart (the
    memory engine forgets its data too); the simulator keeps one per simulated machine,
    so a restarted node keeps its tokens and peers like a real one."""

    def __init__(self) -> None:
        self._tokens: tuple[int, ...] | None = None
        self._bootstrapped = True
        self._left: str | None = None
        self._peers = "{}"
        self._generation = 0

    def load_tokens(self) -> tuple[int, ...] | None:
        return self._tokens

    def save_tokens(self, tokens: tuple[int, ...], *, bootstrapped: bool = True) -> None:
        self._tokens = tuple(tokens)
        self._bootstrapped = bootstrapped

    def load_bootstrapped(self) -> bool:
        return self._bootstrapped

    def save_left(self, why: str) -> None:
        self._left = why

    def load_left(self) -> str | None:
        return self._left

    def load_peers(self) -> dict[str, dict[str, Any]]:
        return json.loads(self._peers)

    def save_peers(self, peers: dict[str, dict[str, Any]]) -> None:
        self._peers = json.dumps(peers)  # a copy, as a file would be

    def next_generation(self, now_s: int) -> int:
        self._generation = max(now_s, self._generation + 1)
        return self._generation


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
