"""Anti-entropy repair on real node processes (Dynamo §4.7): `ringkv repair`
brings a replica that missed writes back in step, a deletion one replica
missed is not resurrected after gc_grace (repair-aware tombstone GC), and
the built-in scheduler repairs every range on its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ringkv.tools.launcher import NodeProcess, free_port_block
from ringkv.tools.local_cluster import LocalCluster, node_view
from tests.procs import FAST_GOSSIP, REPO, http, wait_until

pytestmark = pytest.mark.cluster


def make_cluster(tmp_path: Path, **overrides: Any) -> LocalCluster:
    return LocalCluster(tmp_path, nodes=3, rf=3, base_client_port=free_port_block(3),
                        base_internode_port=free_port_block(3),
                        config_overrides={**FAST_GOSSIP, **overrides})


def liveness(observer: NodeProcess, node_id: str) -> str | None:
    view = node_view(observer)
    return None if view is None or node_id not in view else view[node_id]["liveness"]


def local(proc: NodeProcess, key: str) -> tuple[int, Any]:
    """What that replica itself holds, with no coordination (so nothing repairs it)."""
    return http("GET", f"{proc.url}/v1/kv/default/{key}?local=true")


def storage(proc: NodeProcess) -> dict[str, Any]:
    return http("GET", f"{proc.url}/v1/status")[1]["storage"]


def repair_over_http(proc: NodeProcess, body: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    status, text = http("POST", f"{proc.url}/v1/admin/repair", body or {}, timeout_s=60)
    assert status == 200, text
    return [json.loads(line) for line in text.splitlines()]


def test_ringkv_repair_gives_a_replica_every_write_it_missed(tmp_path: Path) -> None:
    """Hints off: only repair can fill the replica that was down for the writes."""
    cluster = make_cluster(tmp_path, **{"timing.max_hint_window_s": 0,
                                         "repair.scheduled": False})
    try:
        cluster.up(timeout_s=30)
        first, stale = cluster.procs[0], cluster.procs[2]
        stale.kill()
        for i in range(60):
            status, body = http("PUT", f"{first.url}/v1/kv/default/m{i}", {"value": i})
            assert status == 200 and body["receipt"]["hints_stored"] == 0, body
        wait_until(lambda: liveness(first, stale.node_id) == "DOWN", timeout_s=20,
                   interval_s=0.2, what="the killed node to be marked DOWN")
        # Refused while a replica is down, naming it.
        status, body = http("POST", f"{first.url}/v1/admin/repair", {})
        assert status == 503 and body["error"]["code"] == "replica_down", body
        assert body["error"]["down"] == [stale.node_id]
        stale.start()
        cluster.wait_all_up(timeout_s=30)
        assert sum(local(stale, f"m{i}")[0] == 404 for i in range(60)) == 60
        # Bad input is refused with the field named.
        for bad, field in (({"range": "1-2"}, "range"), ({"keyspace": "nope"}, "keyspace"),
                           ({"what": 1}, "what")):
            status, body = http("POST", f"{stale.url}/v1/admin/repair", bad)
            assert status == 400 and body["error"]["field"] == field, body

        refused = subprocess.run(
            [sys.executable, "-m", "ringkv.cli", "repair", "--url", stale.url, "--keyspace", "x"],
            cwd=REPO, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "'x' is not an eventual keyspace" in refused.stderr

        cli = subprocess.run(
            [sys.executable, "-m", "ringkv.cli", "repair", "--url", stale.url],
            cwd=REPO, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        lines = cli.stdout.splitlines()
        assert lines[0].startswith("repairing ") and "ranges of default on node3" in lines[0]
        assert any("differed" in line for line in lines[1:-1])
        summary = lines[-1]
        assert summary.startswith("repair done") and "0 failed" in summary, summary
        streamed = int(summary.split(" differed, ")[1].split(" cells")[0])
        assert streamed >= 60  # every missed write came over (some leaves hold other keys too)
        for i in range(60):
            status, body = local(stale, f"m{i}")
            assert status == 200 and body["value"] == i, (i, status, body)
        # In step now: a repair of one keyspace streams nothing.
        events = repair_over_http(first, {"keyspace": "default"})
        assert events[0]["event"] == "start" and events[-1]["event"] == "done"
        assert (events[-1]["ranges_differed"], events[-1]["cells_streamed"]) == (0, 0)
        assert events[-1]["ranges_compared"] == len(events) - 2
    finally:
        cluster.down()


def test_a_deletion_one_replica_missed_does_not_come_back_after_gc_grace(
    tmp_path: Path,
) -> None:
    """ScyllaDB's tombstone_gc: repair. Without a repair the tombstone outlives
    gc_grace; after one it is purged everywhere and nothing resurrects."""
    cluster = make_cluster(tmp_path, **{
        "timing.max_hint_window_s": 0, "timing.gc_grace_s": 3,
        "timing.tombstone_sweep_interval_s": 1, "repair.scheduled": False})
    try:
        cluster.up(timeout_s=30)
        first, second, stale = cluster.procs
        assert http("PUT", f"{first.url}/v1/kv/default/doomed?consistency=ALL",
                    {"value": "old"})[0] == 200
        stale.kill()
        assert http("DELETE", f"{first.url}/v1/kv/default/doomed")[0] == 200  # QUORUM
        stale.start()
        cluster.wait_all_up(timeout_s=30)
        # gc_grace passes and sweeps run: the tombstone is kept, waiting for a repair.
        for proc in (first, second):
            wait_until(lambda proc=proc: storage(proc)["purges_awaiting_repair"] >= 2,
                       timeout_s=20, interval_s=0.2, what="sweeps to keep the tombstone")
            assert storage(proc)["purged"] == 0
        assert local(stale, "doomed")[1]["value"] == "old"  # the replica that missed it

        done = repair_over_http(first)[-1]
        assert done["ok"] and done["ranges_differed"] >= 1 and done["cells_streamed"] >= 1
        # Repaired after the delete, and past gc_grace: purged on every replica.
        for proc in cluster.procs:
            wait_until(lambda proc=proc: storage(proc)["purged"] >= 1, timeout_s=20,
                       interval_s=0.2, what=f"{proc.node_id} to purge the tombstone")
        for proc in cluster.procs:
            assert local(proc, "doomed")[0] == 404
            status, body = http("GET", f"{proc.url}/v1/kv/default/doomed?consistency=ALL")
            assert status == 404, body
    finally:
        cluster.down()


def test_the_scheduler_repairs_every_range_and_status_shows_it(tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path, **{"timing.gc_grace_s": 8, "repair.interval_s": 2})
    try:
        cluster.up(timeout_s=30)
        for i in range(20):
            assert http("PUT", f"{cluster.procs[0].url}/v1/kv/default/s{i}", {"value": i})[0] == 200

        def all_repaired(proc: NodeProcess) -> bool:
            view = http("GET", f"{proc.url}/v1/status")[1]["repair"]["keyspaces"]["default"]
            return view["ranges"] > 0 and view["repaired"] == view["ranges"]

        for proc in cluster.procs:
            wait_until(lambda proc=proc: all_repaired(proc), timeout_s=20, interval_s=0.2,
                       what=f"{proc.node_id}'s scheduler to repair every range")
        proc = cluster.procs[1]
        repair = http("GET", f"{proc.url}/v1/status")[1]["repair"]
        assert repair["scheduled"] and repair["interval_s"] == 2
        assert all(r["last_repaired_us"] for r in repair["ranges"])
        # Nobody ran `ringkv repair`: the runs were the schedulers'.
        runs = [http("GET", f"{p.url}/v1/admin/repair")[1] for p in cluster.procs]
        assert sum(r["totals"]["runs"] for r in runs) >= 1
        assert {r["last_run"]["trigger"] for r in runs if r["last_run"]} == {"scheduled"}
        metrics = http("GET", f"{proc.url}/metrics")[1]
        samples = [line for line in metrics.splitlines()
                   if line.startswith("ringkv_repair_last_repaired_timestamp_seconds{")]
        assert len(samples) == len(repair["ranges"]) and all(
            float(line.rsplit(" ", 1)[1]) > 1e9 for line in samples)
        cli = subprocess.run([sys.executable, "-m", "ringkv.cli", "status", "--url", proc.url],
                             cwd=REPO, capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0 and "default: " in cli.stdout, cli.stdout + cli.stderr
        assert f"{len(repair['ranges'])}/{len(repair['ranges'])} ranges repaired" in cli.stdout
    finally:
        cluster.down()


def test_gc_by_age_alone_resurrects_the_deletion_the_planted_bug(tmp_path: Path) -> None:
    """The same missed deletion with tombstone_gc: timeout (Cassandra's default
    GC by age): the tombstone goes after gc_grace and the stale replica's value
    comes back. This is what the test above guards against."""
    cluster = make_cluster(tmp_path, **{
        "timing.max_hint_window_s": 0, "timing.gc_grace_s": 1,
        "timing.tombstone_sweep_interval_s": 1, "repair.scheduled": False,
        "repair.tombstone_gc": "timeout"})
    try:
        cluster.up(timeout_s=30)
        first, second, stale = cluster.procs
        assert http("PUT", f"{first.url}/v1/kv/default/doomed?consistency=ALL",
                    {"value": "old"})[0] == 200
        stale.kill()
        assert http("DELETE", f"{first.url}/v1/kv/default/doomed")[0] == 200
        stale.start()
        cluster.wait_all_up(timeout_s=30)
        for proc in (first, second):
            wait_until(lambda proc=proc: storage(proc)["purged"] >= 1, timeout_s=20,
                       interval_s=0.2, what=f"{proc.node_id} to purge the tombstone by age")
        status, body = http("GET", f"{first.url}/v1/kv/default/doomed?consistency=ALL")
        assert status == 200 and body["value"] == "old"  # resurrected
    finally:
        cluster.down()
