"""`ringkv cluster up` as an operator runs it: a process that owns its nodes.

Whatever stops it, Ctrl-C or SIGTERM, and whenever (while the nodes are still
starting, or once the cluster is up), it must stop every node it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ringkv.tools.launcher import free_port_block
from tests.procs import REPO, http, wait_until

pytestmark = pytest.mark.cluster


def children_of(pid: int) -> set[int]:
    """PIDs whose parent is ``pid`` (Linux /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it exited meanwhile
        # The command name is in parentheses and may hold spaces: parse after it.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def answers(url: str) -> bool:
    try:
        return http("GET", f"{url}/v1/health", timeout_s=1)[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize("when", ["starting", "up"])
def test_sigterm_stops_every_node_it_started(tmp_path: Path, when: str) -> None:
    base = free_port_block(102)  # clients at base, base+1; internode at base+100, base+101
    cli = subprocess.Popen(
        [sys.executable, "-m", "ringkv.cli", "cluster", "up", "--nodes", "2", "--rf", "2",
         "--data-dir", str(tmp_path / "data"), "--base-port", str(base)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    nodes: set[int] = set()
    try:
        first = f"http://127.0.0.1:{base}"
        wait_until(lambda: answers(first), timeout_s=60, what="the first node to serve")
        if when == "up":
            wait_until(lambda: answers(f"http://127.0.0.1:{base + 1}"), timeout_s=60,
                       what="the second node to serve")
        nodes = children_of(cli.pid)
        assert nodes, "no node processes found"
        cli.send_signal(signal.SIGTERM)
        output, _ = cli.communicate(timeout=60)
        assert "stopping the cluster" in output
        # The CLI waits for its nodes; none may outlive it as an orphan.
        assert [pid for pid in nodes | children_of(cli.pid) if alive(pid)] == []
    finally:
        for pid in nodes:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if cli.poll() is None:
            cli.kill()
            cli.wait(timeout=30)
