"""The locust scenarios (bench/locustfile.py) run headless against a real local cluster."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringkv.tools.local_cluster import LocalCluster
from tests.procs import FAST_GOSSIP, REPO
from tests.test_cluster import make_cluster

pytestmark = pytest.mark.cluster

RUN_S = 4
DEADLINE_S = 90


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = make_cluster(tmp_path_factory.mktemp("locust-cluster"), **FAST_GOSSIP)
    try:
        cluster.up(timeout_s=60)
        yield cluster
    finally:
        cluster.down()


def run_locust(cluster: LocalCluster, tmp_path: Path, args: list[str],
               env: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Run locust headless for a few seconds; returns its stats CSV rows by name."""
    prefix = tmp_path / "locust"
    command = [
        sys.executable, "-m", "locust", "-f", str(REPO / "bench" / "locustfile.py"),
        "--headless", "-u", "5", "-r", "5", "-t", f"{RUN_S}s", "--only-summary",
        "--host", ",".join(cluster.endpoints()), "--csv", str(prefix), *args,
    ]
    log_path = tmp_path / "locust.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    try:
        returncode = proc.wait(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:  # past the deadline: stop it by its PID
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    output = log_path.read_text(errors="replace")
    assert returncode == 0, output[-3000:]
    with open(f"{prefix}_stats.csv", newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def test_update_heavy_at_three_levels(cluster: LocalCluster, tmp_path: Path) -> None:
    rows = run_locust(cluster, tmp_path, ["--scenario", "update-heavy",
                                          "--consistency", "ONE,QUORUM,ALL", "--key-count", "200"])
    assert int(rows["Aggregated"]["Request Count"]) > 0
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    for name in ("GET [ONE]", "PUT [QUORUM]", "GET [ALL]"):
        assert int(rows[name]["Request Count"]) > 0, sorted(rows)


def test_hot_key_configured_from_the_environment(cluster: LocalCluster, tmp_path: Path) -> None:
    rows = run_locust(cluster, tmp_path, [], env={
        "RINGKV_SCENARIO": "hot-key", "RINGKV_CONSISTENCY": "QUORUM", "RINGKV_KEY_COUNT": "500",
    })
    assert int(rows["Aggregated"]["Request Count"]) > 0
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert set(rows) == {"GET [QUORUM]", "PUT [QUORUM]", "Aggregated"}
