"""Growing and shrinking a real cluster under load (Dynamo §4.9, adding and
removing storage nodes; Cassandra's bootstrap and decommission): node
processes on loopback, a cluster holding data grows and shrinks while a
client writes and reads at QUORUM, and no acknowledged write is missing from
any natural replica afterwards."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Self

import pytest

from ringkv.ring import MAX_TOKEN, NodeInfo, TokenRing
from ringkv.tools.launcher import NodeProcess, free_port_block
from ringkv.tools.local_cluster import COUNTER, NO_STREAMING, LocalCluster, _cas_increment
from tests.procs import KeptConnections, http, wait_until

pytestmark = pytest.mark.cluster

GOSSIP = {"timing.gossip_interval_ms": 500}


def make_cluster(tmp_path: Path, nodes: int, **overrides: Any) -> LocalCluster:
    cluster = LocalCluster(tmp_path, nodes=nodes, rf=3, base_client_port=free_port_block(nodes),
                           base_internode_port=free_port_block(nodes),
                           config_overrides={**GOSSIP, **overrides})
    cluster.build()
    return cluster


def start_first(cluster: LocalCluster, count: int) -> None:
    """Form a new cluster of the first ``count`` nodes. It holds no data yet, so they
    join without streaming, as ``ringkv cluster up`` forms one; nodes started
    later stream."""
    for proc in cluster.procs[:count]:
        proc.extra_args.append(NO_STREAMING)
        try:
            proc.start()
        finally:
            proc.extra_args.remove(NO_STREAMING)
        cluster.wait_all_up(cluster.procs[: cluster.procs.index(proc) + 1], timeout_s=60)


def ring_of(proc: NodeProcess) -> TokenRing:
    status, body = http("GET", f"{proc.url}/v1/ring")
    assert status == 200
    return TokenRing({n["node_id"]: n["tokens"] for n in body["nodes"]},
                     {n["node_id"]: NodeInfo(n["node_id"], n["dc"], n["rack"])
                      for n in body["nodes"]})


def put(proc: NodeProcess, key: str, value: Any) -> bool:
    try:
        status, _ = http("PUT", f"{proc.url}/v1/kv/default/{key}?consistency=QUORUM",
                         {"value": value}, timeout_s=5)
    except OSError:
        return False
    return status == 200


def local_value(proc: NodeProcess, key: str, kept: KeptConnections | None = None) -> Any:
    url = f"{proc.url}/v1/kv/default/{key}?local=true"
    status, body = kept.get(url) if kept is not None else http("GET", url)
    return body["value"] if status == 200 else None


def check_every_replica(cluster: LocalCluster, acked: dict[str, Any], live: list[NodeProcess],
                        consistency: str = "QUORUM") -> None:
    """Each acknowledged write on each natural replica's own copy (local=true, read
    before any coordinated read of the key), then at ``consistency``. Thousands of
    reads: over kept connections."""
    ring = ring_of(live[0])
    assert all(ring_of(proc) == ring for proc in live)
    by_id = {proc.node_id: proc for proc in [*cluster.procs, *live]}
    missing = []
    with KeptConnections() as kept:
        for key, value in acked.items():
            for node_id in ring.replicas_for_key(key.encode(), 3):
                if local_value(by_id[node_id], key, kept) != value:
                    missing.append((key, node_id))
        assert missing == [], f"{len(missing)} copies missing, e.g. {missing[:5]}"
        print(f"{len(acked)} acknowledged keys: every natural replica's own copy, then at "
              f"{consistency}")
        for i, (key, value) in enumerate(acked.items()):
            proc = live[i % len(live)]
            status, body = kept.get(
                f"{proc.url}/v1/kv/default/{key}?consistency={consistency}")
            assert status == 200 and body["value"] == value, (key, status, body)


class Load:
    """A client writing new keys and reading them back at QUORUM, until stopped."""

    def __init__(self, procs: list[NodeProcess], prefix: str = "load",
                 pause_s: float = 0.0) -> None:
        self.procs = procs
        self.pause_s = pause_s  # between writes: fewer keys to check afterwards
        self.prefix = prefix
        self.acked: dict[str, Any] = {}
        self.reads = {"ok": 0, "failed": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set() and i < 100_000:
            proc = self.procs[i % len(self.procs)]
            key = f"{self.prefix}{i}"
            if put(proc, key, i):
                self.acked[key] = i
            if i % 4 == 3:  # read back an earlier write through another coordinator
                earlier = f"{self.prefix}{i - 2}"
                try:
                    status, _ = http("GET", f"{self.procs[(i + 1) % len(self.procs)].url}"
                                     f"/v1/kv/default/{earlier}?consistency=QUORUM", timeout_s=5)
                except OSError:
                    status = 0
                self.reads["ok" if status == 200 else "failed"] += 1
            i += 1
            if self.pause_s:
                self._stop.wait(self.pause_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


# make test grows a cluster holding 300 keys under a paced load (about 1,500 keys to
# check in all); make soak, the acceptance run, 5,000 keys under a load that writes
# as fast as it can (about 10,000 keys to check).
@pytest.mark.parametrize("keys,pause_s", [
    (300, 0.02), pytest.param(5000, 0.0, marks=pytest.mark.soak)])
def test_a_cluster_holding_data_grows_from_three_to_five_and_shrinks_to_four_under_load(
    tmp_path: Path, keys: int, pause_s: float,
) -> None:
    cluster = make_cluster(tmp_path, 5)
    try:
        start_first(cluster, 3)
        status, body = http("POST", f"{cluster.procs[0].url}/v1/decommission")
        assert status == 409 and body["error"]["reason"] == "too_few_nodes"  # 3 nodes, RF 3
        acked = {}
        for i in range(keys):
            key = f"seed{i}"
            assert put(cluster.procs[i % 3], key, {"n": i, "pad": "x" * 50})
            acked[key] = {"n": i, "pad": "x" * 50}
        with Load(cluster.procs[:3], pause_s=pause_s) as load, CasLoad(cluster.procs[:3]) as cas:
            for joiner in cluster.procs[3:]:
                joiner.start()  # returns once it serves: NORMAL, every range streamed
                cluster.wait_all_up(cluster.procs[: cluster.procs.index(joiner) + 1],
                                    timeout_s=60)
                status = http("GET", f"{joiner.url}/v1/status")[1]["streaming"]
                assert status["state"] == "done" and status["ranges_done"] == status["ranges_total"]
                assert status["cells"] > 0
        assert len(load.acked) > 20 and load.reads["ok"] > 0
        # The transactional keyspace served while its group moved (Spanner §2.1's
        # tablets move between groups): no acknowledged increment lost, none invented.
        assert cas.acked > 10 and cas.acked <= cas.counter() <= cas.attempts, (
            cas.acked, cas.counter(), cas.attempts)
        group_followed_the_ring(cluster.procs)
        check_every_replica(cluster, {**acked, **load.acked}, cluster.procs)
        acked.update(load.acked)

        # Decommission node2 (5 -> 4) through the command line, under load elsewhere.
        leaving, staying = cluster.procs[1], [cluster.procs[0], *cluster.procs[2:]]
        with Load(staying, prefix="leave", pause_s=pause_s) as load:
            done = subprocess.run(
                [sys.executable, "-m", "ringkv.cli", "decommission", "--url", leaving.url,
                 "--wait-s", "120"], capture_output=True, text=True, timeout=180, check=False)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "has LEFT the ring" in done.stdout
            assert leaving.proc is not None and leaving.proc.wait(timeout=30) == 0

            def four_nodes() -> bool:
                return all(len(ring_of(proc).node_ids) == 4 for proc in staying)

            wait_until(four_nodes, timeout_s=30, interval_s=0.2, what="node2 off every ring")
        assert len(load.acked) > 20
        check_every_replica(cluster, {**acked, **load.acked}, staying)

        # A decommissioned node's data dir never serves again (Cassandra refuses it too).
        assert leaving.launch().proc is not None and leaving.proc.wait(timeout=30) == 2
        assert "was decommissioned" in leaving.log_tail()
        assert all(len(ring_of(proc).node_ids) == 4 for proc in staying)
    finally:
        cluster.down()


def group_followed_the_ring(procs: list[NodeProcess]) -> None:
    """The txn keyspace's one group (its range is the whole ring, ending at MAX_TOKEN)
    runs on the ring's replicas of that token, whatever nodes joined or left."""
    group_id = f"txn/{MAX_TOKEN}"
    expected = sorted(ring_of(procs[0]).replicas(MAX_TOKEN, 3))
    by_id = {proc.node_id: proc for proc in procs}

    def members_everywhere() -> bool:
        for node_id in expected:
            groups = http("GET", f"{by_id[node_id].url}/v1/status")[1]["transactional"]["groups"]
            if groups.get(group_id, {}).get("members") != expected:
                return False
        return True

    wait_until(members_everywhere, timeout_s=60, interval_s=0.2,
               what=f"{group_id}'s members to be the ring's replicas {expected}")
    print(f"{group_id} runs on {expected}")


class CasLoad:
    """Compare-and-set increments of the transactional keyspace's counter through the
    given nodes, until stopped: the tier must keep serving while the ring moves."""

    def __init__(self, procs: list[NodeProcess]) -> None:
        self.procs = procs
        self.acked = 0
        self.attempts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and self.attempts < 100_000:
            self.attempts += 1
            proc = self.procs[self.attempts % len(self.procs)]
            try:
                _cas_increment(self.procs, proc, timeout_s=10)
            except AssertionError:
                continue  # no answer within the bound: counted as not acknowledged
            self.acked += 1
            self._stop.wait(0.05)

    def counter(self) -> int:
        status, body = http("GET", f"{self.procs[0].url}/v1/kv/txn/{COUNTER}")
        assert status == 200, body
        return int(body["value"])

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_when_the_streaming_source_dies_the_joiner_resumes_from_another_replica(
    tmp_path: Path,
) -> None:
    # Slow streaming (small pages, 0.1 MiB/s) so the source can be killed mid-stream.
    cluster = make_cluster(tmp_path, 4, **{"streaming.throughput_mib_s": 0.1,
                                           "streaming.page_cells": 20})
    try:
        start_first(cluster, 3)
        acked = {}
        for i in range(1500):
            acked[f"k{i}"] = "v" * 200
            assert put(cluster.procs[i % 3], f"k{i}", acked[f"k{i}"])
        joiner = cluster.procs[3]
        joiner.start(wait_joined=False)

        def streaming_source() -> str | None:
            view = http("GET", f"{joiner.url}/v1/status")[1]["streaming"]
            return view["source"] if view["cells"] > 0 else None

        source = wait_until(streaming_source, timeout_s=60, interval_s=0.05,
                            what="the joiner to stream its first pages")
        victim = next(proc for proc in cluster.procs if proc.node_id == source)
        victim.kill()
        wait_until(joiner._ready, timeout_s=90, interval_s=0.2, what="the joiner to go NORMAL")
        view = http("GET", f"{joiner.url}/v1/status")[1]["streaming"]
        assert view["fallbacks"] >= 1 and view["state"] == "done"
        ring = ring_of(joiner)
        mine = [key for key in acked if joiner.node_id in ring.replicas_for_key(key.encode(), 3)]
        # It resumed where it stopped: every cell it replicates arrived exactly once.
        assert view["cells"] == len(mine)
        assert all(local_value(joiner, key) == acked[key] for key in mine)
    finally:
        cluster.down()
