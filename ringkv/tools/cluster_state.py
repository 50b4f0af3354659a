"""The state file of a detached local cluster: `ringkv cluster up --detach`
writes it, `ringkv cluster add` extends it, `ringkv cluster down` reads it to
stop every node and then removes it.

It lives at DATA_DIR/cluster.json and records, per node, its pid, ports, data
and log paths and config file, plus the flags `cluster up` was given, so that
a later command, run from any shell, can find and stop the processes. A pid
counts as one of our nodes only while /proc says it runs `ringkv.cli node
--id NODE_ID`: a pid the kernel has reused since for something else is never
signalled.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ringkv.clock import SystemClock

STATE_FILE = "cluster.json"
LOCK_FILE = "cluster.lock"
FORMAT_VERSION = 1
_CLOCK = SystemClock()


@dataclass
class NodeRecord:
    node_id: str
    pid: int
    host: str
    client_port: int
    internode_port: int
    native_port: int
    url: str
    data_dir: str  # this node's own directory: the cluster's data dir / node_id
    log_path: str
    config_path: str


@dataclass
class ClusterState:
    data_dir: str
    flags: dict[str, Any]  # what `cluster up` was given: nodes, rf, base_port, tls
    nodes: list[NodeRecord] = field(default_factory=list)
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(raw: Any) -> ClusterState:
        if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a version {FORMAT_VERSION} cluster state")
        return ClusterState(
            data_dir=str(raw["data_dir"]), flags=dict(raw.get("flags", {})),
            nodes=[NodeRecord(**node) for node in raw["nodes"]])

    def live(self) -> list[NodeRecord]:
        return [node for node in self.nodes if is_node_process(node.pid, node.node_id)]


def state_path(data_dir: Path) -> Path:
    return data_dir / STATE_FILE


@contextmanager
def locked(data_dir: Path) -> Iterator[None]:
    """Hold the data dir's state lock: two `cluster add` or `down` commands at once
    each read, change and write the state file in turn, and lose no node."""
    if not data_dir.is_dir():
        yield  # no data dir, no state file: nothing to guard (and nothing created)
        return
    with open(data_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def load_state(data_dir: Path) -> ClusterState | None:
    """The state in ``data_dir``, or None if there is none. ValueError if it is unreadable."""
    path = state_path(data_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return ClusterState.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a cluster state file ({exc}); remove it if no "
                         "node of that cluster runs any more") from None


def save_state(state: ClusterState) -> Path:
    """Write the state atomically: a reader sees the old file or the new one, never half."""
    path = state_path(Path(state.data_dir))
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    os.replace(partial, path)
    return path


def remove_state(data_dir: Path) -> None:
    state_path(data_dir).unlink(missing_ok=True)


def is_node_process(pid: int, node_id: str) -> bool:
    """Whether ``pid`` runs, not as a zombie, the node ``node_id`` (its command line says so)."""
    proc = Path(f"/proc/{pid}")
    if not Path("/proc/self").exists():  # no /proc: only ask whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        stat = (proc / "stat").read_text()
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # The state is the field after the command name, which is in parentheses.
    if stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X"):
        return False  # exited; its parent has not reaped it yet
    words = [word.decode(errors="replace") for word in argv]
    return "ringkv.cli" in words and "node" in words and _flag(words, "--id") == node_id


def _flag(words: list[str], name: str) -> str | None:
    try:
        return words[words.index(name) + 1]
    except (ValueError, IndexError):
        return None


def stop_nodes(nodes: list[NodeRecord], *, deadline_s: float) -> list[str]:
    """SIGTERM each node that still runs, wait up to ``deadline_s`` for all of them,
    then SIGKILL the rest. Returns the ids of the nodes that had to be killed."""
    running = [node for node in nodes if is_node_process(node.pid, node.node_id)]
    for node in running:
        _signal(node.pid, signal.SIGCONT)  # a paused process cannot handle SIGTERM
        _signal(node.pid, signal.SIGTERM)
    give_up_at_s = _CLOCK.monotonic_s() + deadline_s
    while running and _CLOCK.monotonic_s() < give_up_at_s:
        running = [node for node in running if is_node_process(node.pid, node.node_id)]
        if running:
            _CLOCK.sleep_s(0.1)
    for node in running:
        _signal(node.pid, signal.SIGKILL)
    return [node.node_id for node in running]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # it exited meanwhile
