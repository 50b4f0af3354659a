"""Test set-up for network-namespace hosts: installs what is missing, builds, always removes."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ringkv.tools.netns import NetnsError, NetnsHosts, missing_tools, sweep_stale

APT_TIMEOUT_S = 600.0


def _apt_install(package: str) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    for step in (install, ["apt-get", "update", "-q"], install):
        try:
            done = subprocess.run(step, capture_output=True, timeout=APT_TIMEOUT_S, env=env)
        except (OSError, subprocess.TimeoutExpired):
            return False
        if step is install and done.returncode == 0:
            return True
    return False


def why_no_hosts() -> str | None:
    """Install Debian's iptables if it is missing; then the reason hosts cannot be
    built here (not root, no ``ip``), or None when they can."""
    if os.geteuid() == 0 and shutil.which("iptables") is None and shutil.which("apt-get"):
        _apt_install("iptables")
    missing = missing_tools()
    return f"network-namespace hosts need {', '.join(missing)}" if missing else None


@contextmanager
def netns_hosts(count: int) -> Iterator[NetnsHosts]:
    """``count`` hosts for one test; removed afterwards even if the test fails."""
    reason = why_no_hosts()
    if reason is not None:
        pytest.skip(reason)
    sweep_stale()  # what a killed earlier run left behind
    hosts = NetnsHosts(count)
    try:
        hosts.up()
    except NetnsError as exc:
        pytest.skip(f"cannot build network-namespace hosts here: {exc}")
    try:
        yield hosts
    finally:
        hosts.down()
        left = [ns for ns in hosts.namespaces if ns in _namespaces()]
        assert not left, f"namespaces left behind: {left}"


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line}
