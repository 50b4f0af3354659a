"""A rolling restart under load loses no QUORUM request.

Three node processes (RF=3), each on its own network-namespace host (on
loopback where namespaces cannot be made), take QUORUM writes and reads from
the token-aware Python client (``ringkv.client``) on several threads, while each
node in turn is stopped gracefully (SIGTERM: it stops taking new work, finishes
what it has, then closes) and started again on the same data directory; the
next node goes only once every node sees it UP again. As an operator does it
(README "Deploying on several machines").

Each node's absence costs every key one replica of three, so QUORUM always has
two; what a restart can break is the path to them: a request sent to the node
as it closes, or on a connection it closes. The client must take such a request
elsewhere when that is safe (a read, a write with an idempotency key, a request
refused with ``shutting_down``), and the node must never drop one it accepted.
So: 0 failed requests, and every acknowledged write reads back at QUORUM.

The retries are what hold it at 0: with ``max_retries=0`` a run here failed a
write whose answer was lost when the node closed its native connections at
the end of its drain ("the write may have been applied").
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ringkv.client import Client
from ringkv.tools.launcher import NodeProcess, free_port_block, wait_until
from ringkv.tools.local_cluster import LocalCluster
from tests.hosts import why_no_hosts
from tests.hosts import netns_hosts as _netns_hosts
from tests.procs import FAST_GOSSIP

pytestmark = pytest.mark.cluster

NODES = 3
WORKERS = 4
UP_DEADLINE_S = 60.0
MIN_OPS_PER_RESTART = 20  # load must be flowing while each node is away


class Load:
    """Threads that each write fresh keys at QUORUM and read back their own last write."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.stop = threading.Event()
        self.acknowledged: dict[str, int] = {}
        self.failures: list[str] = []
        self.ops = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, args=(w,), daemon=True)
                         for w in range(WORKERS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self._threads), "a load thread hung"

    def _work(self, worker: int) -> None:
        n = 0
        while not self.stop.is_set():
            key = f"w{worker}-{n}"
            try:
                self.client.put(key, n)
                with self._lock:
                    self.acknowledged[key] = n
                got = self.client.get(key)
                if got != n:
                    raise AssertionError(f"read {got!r} back, not {n}")
            except Exception as exc:  # noqa: BLE001 - every failure is counted, and named
                with self._lock:
                    self.failures.append(f"{key}: {type(exc).__name__}: {exc}")
            with self._lock:
                self.ops += 2
            n += 1


@contextmanager
def _cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    # Half-second gossip: each restart waits until every node sees the node UP again,
    # in gossip rounds; what is checked is that no request fails meanwhile.
    cluster = LocalCluster(tmp_path / "data", nodes=NODES, rf=3, config_overrides={**FAST_GOSSIP})
    if why_no_hosts() is None:
        with _netns_hosts(NODES) as hosts:
            cluster.build_on_hosts(hosts)
            try:
                cluster.up(UP_DEADLINE_S, together=True)
                yield cluster
            finally:
                cluster.down()
    else:  # no namespaces here: the same on loopback, on ports nobody holds
        cluster.base_client_port = free_port_block(NODES)
        cluster.base_internode_port = free_port_block(NODES)
        try:
            cluster.up(UP_DEADLINE_S)
            yield cluster
        finally:
            cluster.down()


def _restart(cluster: LocalCluster, proc: NodeProcess, load: Load) -> tuple[int | None, int]:
    """Stop ``proc`` gracefully, start it again, wait until every node sees it UP.
    Returns its exit code and the requests the load made while it was away."""
    before = load.ops
    code = proc.stop()  # SIGTERM: drain, then close
    proc.start()  # same id, ports and data dir; returns once it serves clients
    away = load.ops - before
    cluster.wait_all_up(timeout_s=UP_DEADLINE_S)
    return code, away


# The client's default protocol in make test; HTTP (the same retries over
# http.client's keep-alive connections) in make soak.
@pytest.mark.timeout(300)
@pytest.mark.parametrize("protocol", [
    "native", pytest.param("http", marks=pytest.mark.soak)])
def test_a_rolling_restart_under_load_fails_no_quorum_request(
        tmp_path: Path, protocol: str) -> None:
    with _cluster(tmp_path) as cluster:
        with Client(cluster.endpoints(), consistency="QUORUM", timeout_s=5.0,
                    protocol=protocol) as client:
            aways: list[int] = []
            with Load(client) as load:
                wait_until(lambda: load.ops >= MIN_OPS_PER_RESTART, timeout_s=30,
                           what="the load to start")
                for proc in cluster.procs:
                    code, away = _restart(cluster, proc, load)
                    assert code == 0, proc.log_tail()
                    # The node went and came back under load, not between requests.
                    assert away >= MIN_OPS_PER_RESTART, (proc.node_id, away)
                    aways.append(away)
                    before = load.ops
                    wait_until(lambda: load.ops >= before + MIN_OPS_PER_RESTART, timeout_s=30,
                               what="load after the restart")
            print(f"{load.ops} QUORUM requests through {NODES} restarts ({aways} while each "
                  f"node was stopping, stopped or starting); {len(load.failures)} failed")
            assert load.failures == [], load.failures[:10]
            assert len(load.acknowledged) >= NODES * MIN_OPS_PER_RESTART // 2
            # Every acknowledged write reads back at QUORUM after the last restart.
            lost = {key: value for key, value in load.acknowledged.items()
                    if client.get(key) != value}
            assert lost == {}, sorted(lost)[:10]
