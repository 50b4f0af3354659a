"""One real node process: durability across SIGKILL, clean shutdown, bad config, fuzzing."""

from __future__ import annotations

import http.client as httpclient
import json
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringkv.tools.local_cluster import NO_STREAMING
from tests.procs import REPO, NodeProcess, free_port, http, wait_until

pytestmark = pytest.mark.cluster


def write_until_killed(node: NodeProcess, writers: int, min_acked: int) -> dict[str, int]:
    """Concurrent unique-value writers; SIGKILL the node mid-stream. Returns acked key -> value."""
    acked: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def writer(worker: int) -> None:
        for i in range(100_000):  # bounded; the kill ends it much sooner
            if stop.is_set():
                return
            key = f"w{worker}-{i}"
            try:
                status, _ = http("PUT", f"{node.url}/v1/kv/default/{key}", {"value": i},
                                 timeout_s=5)
            except OSError:
                return  # the node is gone: this write is indeterminate
            if status == 200:
                with lock:
                    acked[key] = i

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(acked) >= min_acked, timeout_s=60, what=f"{min_acked} acked writes")
        node.kill()  # in mid-stream: writers are still sending
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    with lock:
        return dict(acked)


@pytest.mark.parametrize("sync_mode", ["batch", "periodic"])
def test_acknowledged_writes_survive_sigkill(tmp_path: Path, sync_mode: str) -> None:
    """Every acknowledged write is there after SIGKILL and a restart on the same data.

    Batch mode fsyncs each group commit before acknowledging it. Periodic mode
    acknowledges once the write is in LevelDB's log (the OS page cache), which
    a process crash cannot lose; only a machine crash can lose the last
    periodic_sync_interval_ms (see the README).
    """
    node = NodeProcess("dur", tmp_path, extra_args=["--commit-sync", sync_mode])
    try:
        node.start()
        acked = write_until_killed(node, writers=8, min_acked=1000)
        assert node.proc is not None and node.proc.returncode == -signal.SIGKILL
        node.start()
        missing = []
        for key, value in acked.items():
            status, body = http("GET", f"{node.url}/v1/kv/default/{key}?consistency=ONE")
            if status != 200 or body["value"] != value:
                missing.append(key)
        print(f"{sync_mode}: {len(acked)} acknowledged writes, {len(missing)} missing")
        assert missing == []
    finally:
        node.stop()


def test_sigterm_drains_flushes_and_exits_cleanly(tmp_path: Path) -> None:
    node = NodeProcess("term", tmp_path)
    try:
        node.start()
        for i in range(50):
            assert http("PUT", f"{node.url}/v1/kv/default/k{i}", {"value": i})[0] == 200
        assert node.stop() == 0
        assert "stopped" in node.log_tail()
        node.start()
        assert http("GET", f"{node.url}/v1/kv/default/k49")[1]["value"] == 49
    finally:
        node.stop()


def test_bad_config_field_is_named_and_the_node_does_not_start(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("cluster:\n  num_tokens: 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "ringkv.cli", "node", "--config", str(config),
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert result.returncode == 2
    assert f"{config}: cluster.num_tokens:" in result.stderr


def test_help_lists_every_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ringkv.cli", "--help"], capture_output=True, text=True,
        timeout=60, cwd=REPO,
    )
    assert result.returncode == 0
    assert "node" in result.stdout


# -- fuzzing a running node --------------------------------------------------------

METHODS = ["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS"]
PATH_HEADS = ["/v1/kv/default/", "/v1/kv/", "/v1/kv/default", "/v1/batch", "/v1/status",
              "/v1/ring", "/metrics", "/", "/v1/kv/nope/"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children,
                                                                       max_size=4),
    max_leaves=20,
)
BODIES = st.one_of(
    st.binary(max_size=2000),
    JSON_VALUES.map(lambda value: __import__("json").dumps(value).encode()),
    st.builds(lambda v, t: __import__("json").dumps({"value": v, "ttl": t}).encode(),
              JSON_VALUES, st.one_of(st.integers(), st.text(), st.none())),
    st.builds(lambda ops: __import__("json").dumps({"ops": ops}).encode(),
              st.lists(st.dictionaries(st.sampled_from(["op", "key", "value", "keyspace", "ttl",
                                                        "consistency"]),
                                       JSON_VALUES | st.sampled_from(["put", "get", "delete"]),
                                       max_size=6), max_size=5)),
    st.just(b"HUGE"),  # replaced in the test by a body larger than max_request_bytes
)
QUERIES = st.one_of(
    st.just(""),
    st.builds(lambda k, val: f"?{quote_from_bytes(k)}={quote_from_bytes(val)}",
              st.sampled_from([b"consistency", b"ttl", b"limit", b"page_token", b"local"]),
              st.binary(max_size=30)),
)
HEADERS = st.dictionaries(
    st.sampled_from(["Content-Type", "X-Junk", "Accept", "Content-Encoding", "Expect"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    max_size=3,
)


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory):
    node = NodeProcess("fuzz", tmp_path_factory.mktemp("fuzz"))
    node.start()
    yield node
    node.stop()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    method=st.sampled_from(METHODS),
    head=st.sampled_from(PATH_HEADS),
    key=st.one_of(st.binary(max_size=40), st.binary(min_size=2000, max_size=3000)),
    query=QUERIES,
    headers=HEADERS,
    body=BODIES,
)
def test_fuzzed_requests_never_get_a_500(fuzz_node, method, head, key, query, headers, body):
    """No input may make the node answer 500 or die (huge and non-UTF-8 keys included)."""
    path = head + quote_from_bytes(key, safe="/") + query
    if body == b"HUGE":
        body = b"x" * 5_000_000
    connection = httpclient.HTTPConnection(fuzz_node.host, fuzz_node.client_port, timeout=10)
    try:
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        except (ConnectionError, httpclient.HTTPException):
            # The server may refuse an oversized body by closing early; it must still be up.
            payload, response = b"", None
        if response is not None:
            assert response.status < 500, (method, path, response.status, payload[:300])
    finally:
        connection.close()
    assert fuzz_node.proc.poll() is None


def test_raw_garbage_on_the_client_port_leaves_the_node_serving(fuzz_node) -> None:
    import random

    rng = random.Random(1234)
    for size in (1, 17, 512, 65536):
        with socket.create_connection((fuzz_node.host, fuzz_node.client_port), timeout=5) as sock:
            sock.sendall(bytes(rng.getrandbits(8) for _ in range(size)))
            try:
                sock.recv(4096)
            except OSError:
                pass
    assert http("GET", f"{fuzz_node.url}/v1/health")[0] == 200
    assert fuzz_node.proc.poll() is None


# -- several hosts: wildcard binds and the first start (issue #10) -------------


def _status(node: NodeProcess) -> dict:
    status, body = http("GET", f"{node.url}/v1/status", timeout_s=5)
    assert status == 200, body
    return body


def test_a_wildcard_bind_with_both_broadcasts_forms_one_cluster_and_advertises_them(
    tmp_path: Path,
) -> None:
    """Two nodes bound to 0.0.0.0 each advertise a dialable address. With only
    --host 0.0.0.0 they used to gossip 0.0.0.0:7500, dial themselves and form two
    one-node rings; /v1/ring told clients 0.0.0.0:<port> for every node."""
    nodes = []
    for name in ("w1", "w2"):
        node = NodeProcess(name, tmp_path, host="0.0.0.0")
        node.extra_args = [
            "--broadcast-internode", f"127.0.0.1:{node.internode_port}",
            "--broadcast-client", f"127.0.0.1:{node.client_port}",
        ]
        nodes.append(node)
    w1, w2 = nodes
    w1.extra_args += ["--seeds", f"127.0.0.1:{w1.internode_port}"]  # its own only seed
    # w1 holds no data: w2 joins without streaming (and its ring delay), as `cluster up`.
    w2.extra_args += ["--seeds", f"127.0.0.1:{w1.internode_port}", NO_STREAMING]
    try:
        w1.start()
        w2.start()

        def one_ring() -> dict | None:
            status, ring = http("GET", f"{w2.url}/v1/ring", timeout_s=5)
            ids = sorted(n["node_id"] for n in ring["nodes"]) if status == 200 else []
            return ring if ids == ["w1", "w2"] else None

        ring = wait_until(one_ring, timeout_s=30, what="one ring of w1 and w2")
        addresses = {n["node_id"]: n["client_address"] for n in ring["nodes"]}
        assert addresses == {"w1": f"127.0.0.1:{w1.client_port}",
                             "w2": f"127.0.0.1:{w2.client_port}"}
        rows = {row["node_id"]: row["address"] for row in _status(w1)["nodes"]}
        assert rows == addresses
    finally:
        for node in nodes:
            node.stop()


def test_a_wildcard_bind_without_broadcasts_refuses_to_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ringkv.cli", "node", "--host", "0.0.0.0",
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert result.returncode == 2
    assert "cluster.broadcast_internode: expected" in result.stderr
    assert "also missing: cluster.broadcast_client" in result.stderr


def test_a_new_node_whose_seed_is_down_waits_says_why_and_joins_when_it_comes_up(
    tmp_path: Path,
) -> None:
    """It used to go NORMAL alone after ~5 s and acknowledge QUORUM writes by itself.
    Half-second gossip: once the seed is up, the late node's next retry comes sooner
    (its backoff is in gossip rounds); it still waits 8 s first."""
    config = tmp_path / "fast-gossip.yaml"
    config.write_text(json.dumps({"timing": {"gossip_interval_ms": 500}}))  # JSON is YAML
    # Not started yet: nobody listens on its port.
    seed = NodeProcess("seed", tmp_path, config_path=config)
    seed_address = f"127.0.0.1:{seed.internode_port}"
    # The seed will hold no data, so the late node joins without streaming.
    late = NodeProcess("late", tmp_path, extra_args=["--seeds", seed_address, NO_STREAMING],
                       config_path=config)
    try:
        late.start(wait_joined=False)

        def waiting() -> dict | None:
            joining = _status(late)["joining"]
            return joining if joining and joining["state"] == "waiting_for_seeds" else None

        joining = wait_until(waiting, timeout_s=30, what="late to wait for its seed")
        assert joining["seeds"] == [seed_address]
        # Well past the five rounds after which it used to go NORMAL alone:
        wait_until(lambda: _status(late)["joining"]["since_s"] >= 8, timeout_s=30,
                   what="late to have waited 8 s")
        status, body = http("PUT", f"{late.url}/v1/kv/default/k?consistency=QUORUM",
                            {"value": 1})
        assert status == 503, body
        assert body["error"]["code"] == "not_joined"
        assert body["error"]["reason"] == "waiting_for_seeds"
        assert seed_address in body["error"]["message"]
        assert http("GET", f"{late.url}/v1/health")[0] == 503
        # The dashboard is where an operator looks first: it answers, and shows why.
        status, view = http("GET", f"{late.url}/v1/dashboard/cluster")
        assert status == 200 and list(view["nodes"]) == ["late"], view
        page = urllib.request.urlopen(f"{late.url}/ui", timeout=5)
        assert page.status == 200 and b'<svg id="ring"' in page.read()
        assert [row["status"] for row in _status(late)["nodes"]] == ["JOINING"]
        assert "none of its seeds" in late.log_tail()

        seed.start()  # its own only seed: it starts the cluster
        wait_until(late._ready, timeout_s=60, what="late to join once its seed is up")
        assert _status(late)["joining"] is None
        both_up = {"seed": ("UP", "NORMAL"), "late": ("UP", "NORMAL")}
        wait_until(lambda: {r["node_id"]: (r["liveness"], r["status"])
                            for r in _status(late)["nodes"]} == both_up,
                   timeout_s=30, what="late to see both nodes UP and NORMAL")
        status, body = http("PUT", f"{late.url}/v1/kv/default/k?consistency=ALL", {"value": 1})
        assert status == 200, body
        assert sorted(body["receipt"]["answered"]) == ["late", "seed"]
    finally:
        late.stop()
        seed.stop()


def test_bootstrap_new_cluster_lets_a_node_whose_seed_is_down_start_alone(
    tmp_path: Path,
) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    node = NodeProcess("alone", tmp_path,
                       extra_args=["--seeds", nobody, "--bootstrap-new-cluster"])
    try:
        node.start()  # returns once it serves clients
        body = _status(node)
        assert body["joining"] is None
        assert [(row["node_id"], row["status"]) for row in body["nodes"]] == [("alone", "NORMAL")]
        assert "starting a new cluster alone" in node.log_tail()
    finally:
        node.stop()


def test_a_node_whose_seed_is_itself_under_another_name_says_so_and_starts_alone(
    tmp_path: Path,
) -> None:
    """Its seed list names it as localhost while it advertises 127.0.0.1: the
    dial reaches its own id, which it logs at error level; that address is then
    never a peer, and as its own only seed it starts the cluster."""
    node = NodeProcess("solo", tmp_path)
    node.extra_args = ["--seeds", f"localhost:{node.internode_port}"]
    try:
        node.start()  # returns once it serves clients
        body = _status(node)
        assert body["joining"] is None
        assert [(row["node_id"], row["status"]) for row in body["nodes"]] == [("solo", "NORMAL")]
        assert f"dialled localhost:{node.internode_port} and reached itself" in node.log_tail()
    finally:
        node.stop()
