"""`ringkv cluster up --netns`: a local cluster whose nodes each run on their own
network-namespace host and bind that host's address, as they would on real machines.

The command owns its hosts: whatever stops it (Ctrl-C, SIGTERM), it stops every
node and removes every namespace and the bridge it made. Without root it says so
in one line and exits 2.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ringkv import cli
from ringkv.tools import netns
from ringkv.tools.netns import sweep_stale
from tests.hosts import why_no_hosts
from tests.procs import REPO, http, wait_until
from tests.test_cluster_cli import alive, children_of

START_DEADLINE_S = 90.0


def test_without_root_it_says_so_in_one_line_and_exits_2(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(netns, "missing_tools", lambda: ["root"])
    code = cli.main(["cluster", "up", "--netns", "--data-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.strip().count("\n") == 0 and "needs root" in err, err
    assert out == ""
    assert not list(tmp_path.iterdir())  # nothing was started


def test_racks_need_namespace_hosts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["cluster", "up", "--racks", "2", "--data-dir", str(tmp_path)]) == 2
    assert "--racks needs --netns" in capsys.readouterr().err


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """The command's output, line by line, read on a thread (a read never blocks a deadline)."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _leftovers(pid: int) -> list[str]:
    """Namespaces and links named after the command's PID (``NetnsHosts`` tags)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           timeout=10).stdout.split()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           timeout=10).stdout
    tag = f"rkv{pid}"
    return [n for n in names if n.startswith(tag)] + [
        line.split(":")[1].strip() for line in links.splitlines()
        if line.split(":")[1].strip().startswith(tag)]


@pytest.mark.cluster
@pytest.mark.timeout(180)
@pytest.mark.parametrize("stop_with", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cluster_up_netns_runs_each_node_on_its_own_host_and_removes_them(
        tmp_path: Path, stop_with: signal.Signals) -> None:
    reason = why_no_hosts()
    if reason is not None:
        pytest.skip(reason)
    command = subprocess.Popen(
        [sys.executable, "-m", "ringkv.cli", "cluster", "up", "--netns", "--nodes", "3",
         "--racks", "3", "--data-dir", str(tmp_path / "data")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = _lines(command)
    seen: list[str] = []
    nodes: set[int] = set()

    def urls() -> list[str] | None:
        while not lines.empty():
            seen.append(lines.get())
        if command.poll() is not None:
            raise AssertionError("cluster up exited:\n" + "".join(seen))
        printed = [line.split()[1] for line in seen if line.startswith("  node")]
        return printed if len(printed) == 3 else None

    try:
        printed = wait_until(urls, timeout_s=START_DEADLINE_S, interval_s=0.2,
                             what="the three client URLs")
        hosts = [ipaddress.ip_address(url.split("//")[1].rsplit(":", 1)[0]) for url in printed]
        # Three distinct addresses, none of them loopback: each node binds its host's.
        assert len(set(hosts)) == 3 and not any(h.is_loopback for h in hosts), printed
        assert all(h in ipaddress.ip_network(netns.DEFAULT_RANGE) for h in hosts), printed
        status, _ = http("PUT", f"{printed[0]}/v1/kv/default/k?consistency=QUORUM", {"value": 7})
        assert status == 200
        status, body = http("GET", f"{printed[2]}/v1/kv/default/k?consistency=QUORUM")
        assert (status, body["value"]) == (200, 7)
        status, ring = http("GET", f"{printed[1]}/v1/ring")
        assert sorted(n["rack"] for n in ring["nodes"]) == ["rack1", "rack2", "rack3"]
        nodes = children_of(command.pid)
        assert len(nodes) == 3, nodes
        assert _leftovers(command.pid), "the hosts are not named after the command"
        command.send_signal(stop_with)
        command.wait(timeout=60)
        while not lines.empty():
            seen.append(lines.get())
        output = "".join(seen)
        assert command.returncode == 0, output
        assert "stopping the cluster" in output and "removing the namespace hosts" in output
        assert [pid for pid in nodes if alive(pid)] == []
        assert _leftovers(command.pid) == []
    finally:
        if command.poll() is None:
            command.kill()
            command.wait(timeout=30)
        for pid in nodes:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        sweep_stale()  # the command's PID is gone now: removes whatever it left


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_sigterm_while_the_nodes_start_still_removes_every_host(tmp_path: Path) -> None:
    reason = why_no_hosts()
    if reason is not None:
        pytest.skip(reason)
    command = subprocess.Popen(
        [sys.executable, "-m", "ringkv.cli", "cluster", "up", "--netns", "--nodes", "3",
         "--data-dir", str(tmp_path / "data")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = _lines(command)
    seen: list[str] = []
    nodes: set[int] = set()

    def starting() -> bool:
        while not lines.empty():
            seen.append(lines.get())
        if command.poll() is not None:
            raise AssertionError("cluster up exited:\n" + "".join(seen))
        return any(line.startswith("starting 3 nodes") for line in seen)

    try:
        wait_until(starting, timeout_s=START_DEADLINE_S, interval_s=0.05,
                   what="the nodes to be starting")
        assert _leftovers(command.pid), "no hosts built"
        nodes = children_of(command.pid)  # those launched so far
        command.send_signal(signal.SIGTERM)
        command.wait(timeout=60)
        while not lines.empty():
            seen.append(lines.get())
        output = "".join(seen)
        assert "cluster is up" not in output, output  # it stopped mid-start
        assert "removing the namespace hosts" in output, output
        assert [pid for pid in nodes if alive(pid)] == []
        assert _leftovers(command.pid) == []
    finally:
        if command.poll() is None:
            command.kill()
            command.wait(timeout=30)
        for pid in nodes:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        sweep_stale()
