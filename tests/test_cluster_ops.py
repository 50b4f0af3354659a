"""Operating a local cluster from the shell (issue #16 §3).

`ringkv cluster up --detach` leaves its nodes running and records them in
DATA_DIR/cluster.json; `cluster add` grows that cluster by one node;
`cluster down` stops it, and is safe to run again. A node that cannot bind a
port stops with one line and leaves no row in the others' status. `cluster
up` stops its nodes on SIGINT even when started with SIGINT ignored, as a
shell's background job is.

Every test stops what it started: the nodes a CLI recorded in the state file
are SIGKILLed in ``finally`` if they still run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringkv.tools.cluster_state import (
    STATE_FILE,
    ClusterState,
    NodeRecord,
    is_node_process,
    save_state,
)
from ringkv.tools.launcher import NodeProcess, free_port_block
from ringkv.tools.local_cluster import NO_STREAMING, LocalCluster, node_view
from tests.procs import REPO, wait_until

pytestmark = pytest.mark.cluster


def ringkv(*args: str, timeout_s: float = 60.0,
           **popen: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ringkv.cli", *args], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=timeout_s, **popen)


def recorded_pids(data_dir: Path) -> dict[str, int]:
    path = data_dir / STATE_FILE
    if not path.exists():
        return {}
    return {node["node_id"]: node["pid"] for node in json.loads(path.read_text())["nodes"]}


def kill_all(pids: dict[str, int]) -> None:
    for node_id, pid in pids.items():
        if is_node_process(pid, node_id):
            os.kill(pid, signal.SIGKILL)


def test_up_detach_then_add_then_down_twice(tmp_path: Path) -> None:
    data = tmp_path / "data"
    base = free_port_block(203)  # client ports at base+i, internode +100, native +200
    seen: dict[str, int] = {}
    try:
        up = ringkv("cluster", "up", "--nodes", "1", "--rf", "1", "--data-dir", str(data),
                    "--base-port", str(base), "--detach")
        seen.update(recorded_pids(data))
        assert up.returncode == 0, up.stdout + up.stderr
        assert "detached" in up.stdout
        state = json.loads((data / STATE_FILE).read_text())
        assert state["flags"]["nodes"] == 1 and state["flags"]["base_port"] == base
        [node1] = state["nodes"]
        assert node1["url"] == f"http://127.0.0.1:{base}"
        assert node1["internode_port"] == base + 100 and node1["native_port"] == base + 200
        # The CLI has exited; its node runs on, in a session of its own (the
        # terminal's Ctrl-C and hang-up do not reach it), logging to the data dir.
        assert is_node_process(node1["pid"], "node1")
        assert os.getsid(node1["pid"]) == node1["pid"]
        assert Path(node1["log_path"]).parent == data

        # The data dir is taken while that cluster runs: a second `up` says so.
        again = ringkv("cluster", "up", "--nodes", "1", "--data-dir", str(data),
                       "--base-port", str(base))
        assert again.returncode == 1
        assert "already runs" in again.stderr and "cluster down" in again.stderr

        add = ringkv("cluster", "add", "--data-dir", str(data), "--wait-s", "60",
                     timeout_s=90)
        seen.update(recorded_pids(data))
        assert add.returncode == 0, add.stdout + add.stderr
        assert "node2 joined" in add.stdout
        nodes = {n["node_id"]: n for n in json.loads((data / STATE_FILE).read_text())["nodes"]}
        assert set(nodes) == {"node1", "node2"}
        assert nodes["node2"]["client_port"] == base + 1  # the --base-port numbering
        view = node_view(NodeProcess("node1", data, client_port=base))
        assert view is not None
        assert {n: (r["status"], r["liveness"]) for n, r in view.items()} == {
            "node1": ("NORMAL", "UP"), "node2": ("NORMAL", "UP")}

        down = ringkv("cluster", "down", "--data-dir", str(data))
        assert down.returncode == 0, down.stdout + down.stderr
        assert "stopped the cluster" in down.stdout
        assert not (data / STATE_FILE).exists()
        assert [n for n, pid in seen.items() if is_node_process(pid, n)] == []

        twice = ringkv("cluster", "down", "--data-dir", str(data))
        assert twice.returncode == 0
        assert "nothing to stop" in twice.stdout
    finally:
        kill_all(seen)


def test_an_add_that_does_not_join_in_time_is_stopped_and_forgotten(tmp_path: Path) -> None:
    """A joiner streams after a ring delay of several seconds: with a 1 s deadline
    `cluster add` gives up, stops the node it started and drops it from the state."""
    data = tmp_path / "data"
    base = free_port_block(202)
    seen: dict[str, int] = {}
    try:
        up = ringkv("cluster", "up", "--nodes", "1", "--rf", "1", "--data-dir", str(data),
                    "--base-port", str(base), "--detach")
        seen.update(recorded_pids(data))
        assert up.returncode == 0, up.stdout + up.stderr
        add = ringkv("cluster", "add", "--data-dir", str(data), "--wait-s", "1")
        assert add.returncode == 1
        assert "node2 did not join" in add.stderr and "node2.log" in add.stderr
        assert recorded_pids(data) == seen  # node1 only
        assert _nodes_running_from(data) == ["node1"]
    finally:
        kill_all({**seen, **recorded_pids(data)})
        for node_id, pid in _node_pids_from(data).items():  # one the state forgot
            if is_node_process(pid, node_id):
                os.kill(pid, signal.SIGKILL)


def _nodes_running_from(data_dir: Path) -> list[str]:
    """The ids of the node processes /proc shows running on ``data_dir``."""
    return sorted(_node_pids_from(data_dir))


def _node_pids_from(data_dir: Path) -> dict[str, int]:
    """node id -> pid of each node process /proc shows running on ``data_dir``."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # not a process, or gone meanwhile
        if "--data-dir" in argv and argv[argv.index("--data-dir") + 1:][:1] == [str(data_dir)]:
            node_id = argv[argv.index("--id") + 1]
            if is_node_process(int(entry.name), node_id):
                found[node_id] = int(entry.name)
    return found


def test_down_stops_the_nodes_of_an_up_detach_killed_half_way(tmp_path: Path) -> None:
    """Each node is recorded as it is launched, before any wait: a `cluster up
    --detach` SIGKILLed while starting leaves no node that `cluster down` misses."""
    data = tmp_path / "data"
    base = free_port_block(202)
    cli = subprocess.Popen(
        [sys.executable, "-m", "ringkv.cli", "cluster", "up", "--nodes", "2", "--rf", "2",
         "--data-dir", str(data), "--base-port", str(base), "--detach"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[str, int] = {}
    try:
        seen.update(wait_until(lambda: recorded_pids(data), timeout_s=30,
                               what="the first node in the state file"))
        # Recorded while node1 starts, before node2 is launched: up is half-way.
        assert list(seen) == ["node1"] and cli.poll() is None
        cli.kill()
        cli.wait(timeout=10)
        seen.update(recorded_pids(data))
        assert [n for n, pid in seen.items() if is_node_process(pid, n)], "nothing to stop"
        down = ringkv("cluster", "down", "--data-dir", str(data))
        assert down.returncode == 0, down.stdout + down.stderr
        assert [n for n, pid in seen.items() if is_node_process(pid, n)] == []
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(timeout=10)
        kill_all({**seen, **recorded_pids(data)})


def test_up_on_the_data_of_an_earlier_run_says_it_reuses_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    base = free_port_block(201)
    seen: dict[str, int] = {}
    try:
        outputs = []
        for _ in range(2):
            up = ringkv("cluster", "up", "--nodes", "1", "--rf", "1", "--data-dir", str(data),
                        "--base-port", str(base), "--detach")
            seen.update(recorded_pids(data))
            assert up.returncode == 0, up.stdout + up.stderr
            outputs.append(up.stdout)
            assert ringkv("cluster", "down", "--data-dir", str(data)).returncode == 0
        fresh, again = outputs
        assert "reusing" not in fresh
        assert f"reusing the data of an earlier run under {data} (node1)" in again
    finally:
        kill_all(seen)


def test_a_stale_state_file_is_reported_and_no_stranger_is_signalled(tmp_path: Path) -> None:
    """The pids of a state file whose nodes are gone (a reboot, a kill -9) may belong
    to other processes by now: such a file is reported as stale, and nothing
    else that runs under one of its pids is signalled."""
    data = tmp_path / "data"
    data.mkdir()
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = NodeRecord(
            node_id="node1", pid=stranger.pid, host="127.0.0.1", client_port=1,
            internode_port=2, native_port=3, url="http://127.0.0.1:1",
            data_dir=str(data / "node1"), log_path=str(data / "node1.log"),
            config_path=str(data / "cluster.yaml"))
        save_state(ClusterState(data_dir=str(data), flags={"base_port": 1}, nodes=[record]))

        add = ringkv("cluster", "add", "--data-dir", str(data), "--wait-s", "10")
        assert add.returncode == 1
        assert "stale state file" in add.stderr and "cluster down" in add.stderr
        down = ringkv("cluster", "down", "--data-dir", str(data))
        assert down.returncode == 0, down.stderr
        assert "stale state file" in down.stdout and "removed it" in down.stdout
        assert not (data / STATE_FILE).exists()
        assert stranger.poll() is None, "a process that is no node of ours was signalled"
    finally:
        stranger.kill()
        stranger.wait(timeout=10)
        kill_all(recorded_pids(data))  # a node a broken `add` might have started


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A running one-node cluster for the start-up failure tests to try to join."""
    cluster = LocalCluster(tmp_path_factory.mktemp("one"), nodes=1, rf=1,
                           base_client_port=free_port_block(1),
                           base_internode_port=free_port_block(1),
                           config_overrides={"timing.gossip_interval_ms": 200})
    try:
        cluster.up(timeout_s=30)
        yield cluster
    finally:
        cluster.down()


@pytest.mark.parametrize("taken", ["client", "native", "internode"])
def test_a_node_that_cannot_bind_stops_with_one_line_and_no_ghost(
        tmp_path: Path, one_node: LocalCluster, taken: str) -> None:
    """A port in use stops the node with one line naming the port and the cause,
    exit code 2, no traceback; it announced nothing, so the running cluster
    never shows a row for it."""
    seed = one_node.procs[0]
    ghost = NodeProcess("ghost", tmp_path)
    port = {"client": ghost.client_port, "native": ghost.native_port,
            "internode": ghost.internode_port}[taken]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = ringkv(
            "node", "--id", "ghost", "--client-port", str(ghost.client_port),
            "--internode-port", str(ghost.internode_port),
            "--native-port", str(ghost.native_port), "--data-dir", str(tmp_path),
            "--seeds", f"127.0.0.1:{seed.internode_port}",
            "--config", str(one_node.data_dir / "cluster.yaml"), NO_STREAMING)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    what = {"client": "client API", "native": "native protocol",
            "internode": "internode protocol"}[taken]
    expected = (f"ringkv: error: node ghost cannot listen on 127.0.0.1:{port} for the {what} "
                f"(cluster.{taken}_port): Address already in use")
    assert errors == [expected], result.stderr

    # Had it gossiped before binding, the seed would have it as a (JOINING or
    # BOOT) row within a gossip round or two; watch for a few.
    def ghost_row() -> bool:
        return "ghost" in (node_view(seed) or {})

    with pytest.raises(TimeoutError):
        wait_until(ghost_row, timeout_s=1.5, interval_s=0.1, what="a row for the ghost")


def test_sigint_stops_a_cluster_started_with_sigint_ignored(tmp_path: Path) -> None:
    """A background job of a non-interactive shell starts with SIGINT ignored;
    `cluster up` takes SIGINT itself, so `kill -INT` (or Ctrl-C once it is in
    the foreground) still stops every node, and it exits 0."""
    from tests.test_cluster_cli import alive, answers, children_of

    base = free_port_block(201)
    cli = subprocess.Popen(
        [sys.executable, "-m", "ringkv.cli", "cluster", "up", "--nodes", "1", "--rf", "1",
         "--data-dir", str(tmp_path / "data"), "--base-port", str(base)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # As a shell starts a background job; nothing here runs threads yet.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509
    )
    nodes: set[int] = set()
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{base}"), timeout_s=60,
                   what="the node to serve")
        nodes = children_of(cli.pid)
        assert nodes, "no node processes found"
        cli.send_signal(signal.SIGINT)
        output, _ = cli.communicate(timeout=30)
        assert cli.returncode == 0, output
        assert "stopping the cluster" in output
        assert [pid for pid in nodes if alive(pid)] == []
    finally:
        for pid in nodes:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if cli.poll() is None:
            cli.kill()
            cli.wait(timeout=30)


@pytest.mark.parametrize("taken", ["client", "native"])
def test_gossip_starts_only_once_every_listener_is_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken: str) -> None:
    """The order behind "no ghost row": a node whose gossip started before a
    listener failed would be announced for as long as its shutdown takes.
    Watched from inside, where no race can hide it: gossip never starts."""
    import asyncio

    from ringkv.config import load_config
    from ringkv.errors import ConfigError
    from ringkv.gossip.service import GossipService
    from ringkv.server.runner import serve

    started: list[str] = []
    monkeypatch.setattr(GossipService, "start", lambda self: started.append("gossip"))
    ports = {"client": free_port_block(1), "internode": free_port_block(1),
             "native": free_port_block(1)}
    config = load_config(None, {
        "cluster.node_id": "ghost", "cluster.data_dir": str(tmp_path),
        "cluster.client_port": ports["client"], "cluster.internode_port": ports["internode"],
        "cluster.native_port": ports["native"], "storage.engine": "memory",
        "cluster.seeds": [f"127.0.0.1:{ports['internode']}"]})
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[taken]))
        holder.listen()
        with pytest.raises(ConfigError) as err:
            asyncio.run(asyncio.wait_for(serve(config), timeout=15))
    assert err.value.field == f"cluster.{taken}_port"
    assert started == []


def test_a_wildcard_bind_tells_clients_the_broadcast_client_host(tmp_path: Path) -> None:
    """--host 0.0.0.0 with --broadcast-client naming a host alone: token-aware
    clients are told that host with the port the node listens on, in /v1/ring
    and in /v1/status, never 0.0.0.0."""
    from tests.procs import http

    node = NodeProcess("w1", tmp_path, host="0.0.0.0", url_host="127.0.0.1")
    node.extra_args = ["--broadcast-internode", f"127.0.0.1:{node.internode_port}",
                       "--broadcast-client", "127.0.0.1",
                       "--seeds", f"127.0.0.1:{node.internode_port}"]
    try:
        node.start()
        status, ring = http("GET", f"{node.url}/v1/ring", timeout_s=5)
        assert status == 200
        assert [(n["node_id"], n["client_address"]) for n in ring["nodes"]] == [
            ("w1", f"127.0.0.1:{node.client_port}")]
        status, view = http("GET", f"{node.url}/v1/status", timeout_s=5)
        assert [(row["node_id"], row["address"]) for row in view["nodes"]] == [
            ("w1", f"127.0.0.1:{node.client_port}")]
    finally:
        node.stop()
