"""Node snapshots and restore: names, manifests and the restore rules (pure); the
/v1/snapshots routes in-process (one at a time, 409s, 404s, what is copied); and a
real node snapshotted under write load, stopped, and restored into a fresh data
directory with ``ringkv node --restore``, holding every write acknowledged before
the snapshot began and none sent after it was taken."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ringkv.auth.permissions import ADMIN, CLUSTER, Need, needs
from ringkv.clock import ManualClock
from ringkv.config import config_from_dict
from ringkv.errors import BadRequest, ConfigError
from ringkv.node import Node
from ringkv.repair import hints, history
from ringkv.server.api import build_app
from ringkv.storage import keys, snapshot
from ringkv.storage.leveldb import LevelDBEngine
from ringkv.storage.memory import MemoryEngine
from ringkv.storage.snapshot_manifest import (
    EVENTUAL_PREFIXES,
    LEVELDB_DIR,
    MANIFEST_FILE,
    MAX_NAME_LENGTH,
    SNAPSHOTS_DIR,
    TRANSACTIONAL_PREFIXES,
    Manifest,
    check_name,
    copied,
    default_name,
    restore_refusal,
)
from ringkv.txn import mvcc_keys, paxos_log, twopc_records
from ringkv.txn import service as txn_service
from tests.procs import REPO, NodeProcess, http, wait_until

# -- names, manifests, what is copied (pure) ---------------------------------------------


@pytest.mark.parametrize("name", ["daily", "snap-2026.12.02_1", "A", "x" * MAX_NAME_LENGTH])
def test_good_names_pass(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "../etc", "..", ".", ".hidden", "a\\b", "a b",
                                  "x" * (MAX_NAME_LENGTH + 1), "é", 7, None, ["a"]])
def test_bad_names_are_refused_naming_the_field(name: Any) -> None:
    with pytest.raises(BadRequest) as caught:
        check_name(name)
    assert caught.value.field == "name"


def test_default_names_are_valid_and_sort_by_time() -> None:
    early, late = default_name(1_700_000_000_000_000), default_name(1_800_000_000_000_000)
    assert check_name(early) == early and early < late


def manifest(**changes: Any) -> Manifest:
    fields: dict[str, Any] = dict(
        name="daily", node_id="n1", cluster="ringkv", created_us=1_700_000_000_000_000,
        keys=10, records=12, size_bytes=4096, tokens=(-5, 2**63 - 1), dc="dc1", rack="rack1",
        keyspaces={"default": {"tier": "eventual", "replication_factor": 3}}, txn_groups=0)
    fields.update(changes)
    return Manifest(**fields)


def test_manifest_round_trips_through_json() -> None:
    original = manifest()
    doc = json.loads(json.dumps(original.to_json()))
    assert Manifest.from_json(doc, "m.json") == original
    assert doc["created"] == "2023-11-14T22:13:20Z"
    assert doc["tokens"] == ["-5", str(2**63 - 1)]  # exact in any JSON client
    assert doc["excluded"] == sorted(p.decode() for p in TRANSACTIONAL_PREFIXES)


@pytest.mark.parametrize("field,value", [
    ("format", 2), ("tokens", []), ("tokens", ["x"]), ("keys", -1), ("keys", "3"),
    ("node_id", ""), ("name", "../x"), ("keyspaces", ["default"]), ("created_us", True),
])
def test_a_broken_manifest_names_its_field(field: str, value: Any) -> None:
    doc = manifest().to_json()
    doc[field] = value
    with pytest.raises(ConfigError) as caught:
        Manifest.from_json(doc, "m.json")
    assert caught.value.field == f"manifest.{field}"
    with pytest.raises(ConfigError) as caught:
        Manifest.from_json([], "m.json")
    assert caught.value.field == "manifest.format"


def test_every_record_prefix_is_classified_and_only_the_eventual_tier_is_copied() -> None:
    eventual = {keys.DATA_PREFIX, keys.NEWEST_KEY, hints.PREFIX, history.PREFIX}
    transactional = {paxos_log.PREFIX, txn_service.MEMBERS_PREFIX, txn_service.OUTCOME_PREFIX,
                     twopc_records.PREFIX, mvcc_keys.VERSION_PREFIX, mvcc_keys.GC_THRESHOLD_PREFIX}
    assert set(EVENTUAL_PREFIXES) == eventual
    assert set(TRANSACTIONAL_PREFIXES) == transactional
    assert not eventual & transactional
    assert all(copied(p + b"\x05rest") for p in eventual)
    assert not any(copied(p + b"\x05rest") for p in transactional)
    assert not copied(b"\x00sync") and not copied(b"")


NOW_US = 1_700_000_100_000_000  # 100 s after manifest()'s created_us


def refusal(m: Manifest, *, node_id: str = "n1", replace: str | None = None,
            txn: list[str] | None = None, now_us: int = NOW_US,
            gc_grace_s: int = 864000) -> ConfigError | None:
    return restore_refusal(m, cluster="ringkv", node_id=node_id, replace_node_id=replace,
                           transactional_keyspaces=txn or [], now_us=now_us,
                           gc_grace_s=gc_grace_s)


def test_restore_rules() -> None:
    # The normal case: the same node, eventual keyspaces only.
    assert refusal(manifest()) is None

    def field_of(error: ConfigError | None) -> str | None:
        return None if error is None else error.field

    assert field_of(refusal(manifest(cluster="other"))) == "cluster.name"
    assert field_of(refusal(manifest(), node_id="n2")) == "cluster.node_id"
    # A possible Paxos voter never comes back under its own identity.
    voter = refusal(manifest(), txn=["txn"])
    assert field_of(voter) == "restore" and voter is not None and "--replace n1" in voter.message
    assert field_of(refusal(manifest(txn_groups=3))) == "restore"
    was_txn = manifest(keyspaces={"txn": {"tier": "transactional", "replication_factor": 3}})
    assert field_of(refusal(was_txn)) == "restore"
    # ... but under a new id replacing it, its groups catch it up as a learner.
    assert refusal(manifest(txn_groups=3), node_id="n9", replace="n1", txn=["txn"]) is None
    assert field_of(refusal(manifest(), node_id="n9", replace="n7")) == "cluster.replace_node_id"
    # Older than gc_grace_s: deletes purged elsewhere would come back.
    assert field_of(refusal(manifest(), gc_grace_s=99)) == "timing.gc_grace_s"
    assert refusal(manifest(), gc_grace_s=100) is None


def test_snapshot_routes_need_cluster_admin() -> None:
    for route in ("snapshot_create", "snapshot_list", "snapshot_delete"):
        assert needs(route, "", {}, b'{"name": "x"}') == [Need(ADMIN, CLUSTER)]


# -- the routes, in-process -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["leveldb", "memory"])
def test_copy_takes_the_view_not_later_writes(tmp_path: Path, kind: str) -> None:
    engine: Any = LevelDBEngine(tmp_path / "source") if kind == "leveldb" else MemoryEngine()
    engine.write([(b"d\x07default" + b"k1", b"v1"), (b"p\x03grp" + b"P", b"promise"),
                  (b"r\x03grp", b"members"), (b"h\x02n2" + b"x", b"hint")], (), sync=False)
    view = engine.point_in_time()
    # After the moment: neither a new cell nor a changed one reaches the copy.
    engine.write([(b"d\x07default" + b"k2", b"v2"), (b"h\x02n2" + b"x", b"later")],
                 [b"d\x07default" + b"k1"], sync=False)
    try:
        counts = snapshot.copy_view(view, tmp_path / "copy", batch_records=1)
    finally:
        view.close()
        engine.close()
    copy = LevelDBEngine(tmp_path / "copy")
    try:
        held = dict(copy.scan(b"\x01", None))  # past the engine's own sync marker
    finally:
        copy.close()
    assert held == {b"d\x07defaultk1": b"v1", b"h\x02n2x": b"hint"}
    assert (counts.records, counts.keys, counts.txn_groups) == (2, 1, 1)


def node_config(data_dir: Path) -> Any:
    return config_from_dict({
        "cluster": {"node_id": "solo", "data_dir": str(data_dir)},
        "keyspaces": {"default": {"replication_factor": 1, "default_consistency": "ONE"}},
    })


def serve(tmp_path: Path, scenario: Any) -> None:
    config = node_config(tmp_path)

    async def main() -> None:
        node = Node(config, clock=ManualClock(), standalone=True)
        await node.start()
        client = TestClient(TestServer(build_app(node)))
        await client.start_server()
        try:
            await scenario(client, node)
        finally:
            await client.close()
            await node.stop()

    asyncio.run(asyncio.wait_for(main(), timeout=60))


async def call(client: TestClient, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    response = await client.request(method, path, **kwargs)
    return response.status, await response.json()


def test_create_list_delete_and_one_at_a_time(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    copying = threading.Event()
    real_copy = snapshot.copy_view

    def held_copy(view: Any, target: Path, **kwargs: Any) -> Any:
        copying.set()
        assert release.wait(timeout=30), "the test never released the copy"
        return real_copy(view, target, **kwargs)

    monkeypatch.setattr(snapshot, "copy_view", held_copy)

    async def scenario(client: TestClient, node: Node) -> None:
        for i in range(20):
            status, _ = await call(client, "PUT", f"/v1/kv/default/k{i}", json={"value": i})
            assert status == 200
        first = asyncio.ensure_future(call(client, "POST", "/v1/snapshots",
                                           json={"name": "first"}))
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, copying.wait, 30)
        # One at a time per node: a second one, and deleting the one being taken, are 409s.
        status, body = await call(client, "POST", "/v1/snapshots", json={"name": "second"})
        assert status == 409 and body["error"]["code"] == "snapshot_refused"
        assert body["error"]["reason"] == "running" and body["error"]["running"] == "first"
        status, body = await call(client, "DELETE", "/v1/snapshots/first")
        assert status == 409 and body["error"]["reason"] == "running"
        status, body = await call(client, "GET", "/v1/snapshots")
        assert status == 200 and body["running"] == "first" and body["snapshots"] == []
        release.set()
        status, body = await first
        assert status == 201, body
        assert (body["name"], body["node_id"], body["keys"]) == ("first", "solo", 20)
        assert body["keyspaces"] == {"default": {"tier": "eventual", "replication_factor": 1}}
        assert [int(t) for t in body["tokens"]] == list(node.tokens)
        assert body["size_bytes"] > 0 and body["created_us"] == node.clock.wall_us()
        where = tmp_path / "solo" / SNAPSHOTS_DIR / "first"
        assert (where / MANIFEST_FILE).exists() and (where / LEVELDB_DIR).is_dir()
        assert not (tmp_path / "solo" / SNAPSHOTS_DIR / "first.partial").exists()
        # Taken again under the same name: refused; a default name is made up.
        status, body = await call(client, "POST", "/v1/snapshots", json={"name": "first"})
        assert status == 409 and body["error"]["reason"] == "exists"
        status, body = await call(client, "POST", "/v1/snapshots")
        assert status == 201 and body["name"].startswith("snapshot-")
        status, body = await call(client, "GET", "/v1/snapshots")
        assert [s["name"] for s in body["snapshots"]] == ["first", body["snapshots"][1]["name"]]
        assert body["snapshots"][0]["keys"] == 20 and body["running"] is None
        # Bad input: JSON errors naming the field.
        for payload, field in (({"name": "../up"}, "name"), ({"name": 5}, "name"),
                               ({"name": "a", "extra": 1}, "extra")):
            status, body = await call(client, "POST", "/v1/snapshots", json=payload)
            assert status == 400 and body["error"]["field"] == field, body
        status, body = await call(client, "DELETE", "/v1/snapshots/.hidden")
        assert status == 400 and body["error"]["field"] == "name"
        status, body = await call(client, "DELETE", "/v1/snapshots/first")
        assert status == 200 and body == {"node_id": "solo", "deleted": "first"}
        assert not where.exists()
        status, body = await call(client, "DELETE", "/v1/snapshots/first")
        assert status == 404 and body["error"]["name"] == "first"

    serve(tmp_path, scenario)


def test_restore_fills_an_empty_data_dir_and_overwrites_only_when_told(tmp_path: Path) -> None:
    async def take(client: TestClient, node: Node) -> None:
        for i in range(5):
            assert (await call(client, "PUT", f"/v1/kv/default/k{i}", json={"value": i}))[0] == 200
        assert (await call(client, "POST", "/v1/snapshots", json={"name": "s"}))[0] == 201

    serve(tmp_path / "a", take)
    snap_dir = tmp_path / "a" / "solo" / SNAPSHOTS_DIR / "s"
    taken = Manifest.from_json(json.loads((snap_dir / MANIFEST_FILE).read_text()), "m")
    now_us = taken.created_us + 1_000_000
    config = node_config(tmp_path / "b")
    target = config.node_data_dir

    snapshot.restore(config, snap_dir, now_us=now_us, overwrite=False)
    identity = json.loads((target / "node.json").read_text())
    assert identity["node_id"] == "solo" and tuple(identity["tokens"]) == taken.tokens
    copy = LevelDBEngine(target / LEVELDB_DIR)
    try:
        assert sum(1 for _ in copy.scan(keys.DATA_PREFIX, keys.DATA_END)) == 5
    finally:
        copy.close()

    # The node's dir is in use now: refused, naming it, unless told to overwrite.
    with pytest.raises(ConfigError) as caught:
        snapshot.restore(config, snap_dir, now_us=now_us, overwrite=False)
    assert caught.value.field == "cluster.data_dir" and str(target) in caught.value.message
    (target / "generation").write_text("1234")
    (target / "stray").write_text("x")
    (target / SNAPSHOTS_DIR / "kept").mkdir(parents=True)
    snapshot.restore(config, snap_dir, now_us=now_us, overwrite=True)
    assert not (target / "stray").exists() and (target / "generation").read_text() == "1234"
    assert (target / SNAPSHOTS_DIR / "kept").is_dir() and (target / "node.json").exists()

    # Not a snapshot at all.
    with pytest.raises(ConfigError) as caught:
        snapshot.restore(node_config(tmp_path / "c"), tmp_path, now_us=now_us, overwrite=False)
    assert caught.value.field == "restore"
    # Under a new id replacing it: the data, but no identity (it takes the dead node's tokens).
    replacing = config_from_dict({
        "cluster": {"node_id": "other", "data_dir": str(tmp_path / "d"),
                    "replace_node_id": "solo"},
        "keyspaces": {"default": {"replication_factor": 1}}})
    snapshot.restore(replacing, snap_dir, now_us=now_us, overwrite=False)
    assert (replacing.node_data_dir / LEVELDB_DIR).is_dir()
    assert not (replacing.node_data_dir / "node.json").exists()


# -- a real node under load, snapshotted, stopped and restored --------------------------------

CONFIG_YAML = """
keyspaces:
  default:
    replication_factor: 1
    default_consistency: ONE
"""


def ringkv(*args: str, env: dict[str, str] | None = None,
           timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ringkv.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


class Load:
    """Writers of distinct keys, recording when each write was sent and acknowledged."""

    def __init__(self, url: str, writers: int) -> None:
        self.url = url
        self.sent: dict[str, float] = {}
        self.acked: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.write, args=(w,)) for w in range(writers)]

    def write(self, worker: int) -> None:
        for i in range(100_000):  # bounded; the test stops it much sooner
            if self.stop.is_set():
                return
            key = f"w{worker}-{i}"
            with self.lock:
                self.sent[key] = time.monotonic()
            try:
                status, _ = http("PUT", f"{self.url}/v1/kv/default/{key}", {"value": i},
                                 timeout_s=5)
            except OSError:
                continue  # indeterminate: never counted as acknowledged
            if status == 200:
                with self.lock:
                    self.acked[key] = time.monotonic()

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


@pytest.mark.cluster
def test_a_node_restored_from_a_snapshot_taken_under_load(tmp_path: Path) -> None:
    config = tmp_path / "ringkv.yaml"
    config.write_text(CONFIG_YAML)
    node = NodeProcess("snap", tmp_path / "before", config_path=config)
    restored = NodeProcess("snap", tmp_path / "after", config_path=config)
    try:
        node.start()
        with Load(node.url, writers=4) as load:
            wait_until(lambda: len(load.acked) >= 300, timeout_s=30, what="300 acked writes")
            began = time.monotonic()
            # Every node of the cluster, found through RINGKV_URL (here: the one node).
            taken = ringkv("snapshot", "create", "mid", env={"RINGKV_URL": node.url})
            done = time.monotonic()
            assert taken.returncode == 0, taken.stderr
            assert "snap: snapshot mid taken" in taken.stdout
            wait_until(lambda: any(t > done for t in load.acked.values()), timeout_s=30,
                       what="writes after the snapshot")
        extra = ringkv("snapshot", "create", "extra", "--url", node.url)
        assert extra.returncode == 0, extra.stderr
        again = ringkv("snapshot", "create", "extra", "--url", node.url)
        assert again.returncode == 1 and "snapshot_refused" in again.stderr
        listed = ringkv("snapshot", "list", "--url", node.url)
        assert listed.returncode == 0, listed.stderr
        assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [
            ["snap", "mid"], ["snap", "extra"]], listed.stdout
        deleted = ringkv("snapshot", "delete", "extra", env={"RINGKV_URL": node.url})
        assert deleted.returncode == 0 and "snapshot extra deleted" in deleted.stdout
        listed = ringkv("snapshot", "list", env={"RINGKV_URL": node.url})
        assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [["snap", "mid"]]
        bad = ringkv("snapshot", "create", "a/b", "--url", node.url)
        assert bad.returncode == 2 and "name:" in bad.stderr
        node.stop()

        snap_dir = tmp_path / "before" / "snap" / SNAPSHOTS_DIR / "mid"
        restored.extra_args = ["--restore", str(snap_dir)]
        restored.start()
        before = [k for k, t in load.acked.items() if t < began]
        after = [k for k, t in load.sent.items() if t > done]
        assert len(before) >= 300 and after

        def present(key: str) -> bool:
            status, body = http("GET", f"{restored.url}/v1/kv/default/{key}?local=true")
            assert status in (200, 404), body
            return status == 200

        missing = [k for k in before if not present(k)]
        leaked = [k for k in after if present(k)]
        print(f"{len(before)} writes acknowledged before the snapshot began, {len(missing)} "
              f"missing; {len(after)} sent after it was taken, {len(leaked)} present")
        assert missing == [] and leaked == []
        restored.stop()

        # The data directory now holds a node: a second restore is refused, naming it.
        again = ringkv("node", "--config", str(config), "--id", "snap", "--data-dir",
                       str(tmp_path / "after"), "--restore", str(snap_dir))
        assert again.returncode == 2
        assert str(tmp_path / "after" / "snap") in again.stderr
        assert "--restore-overwrite" in again.stderr
        # A node of a cluster with a transactional keyspace may be a Paxos voter: refused.
        txn = ringkv("node", "--id", "snap", "--data-dir", str(tmp_path / "txn"),
                     "--restore", str(snap_dir))
        assert txn.returncode == 2 and "Paxos voter" in txn.stderr
        assert "--replace snap" in txn.stderr
        assert not (tmp_path / "txn" / "snap" / LEVELDB_DIR).exists()
    finally:
        node.stop()
        restored.stop()


def txn_put(proc: NodeProcess, key: str, value: Any) -> bool:
    try:
        return http("PUT", f"{proc.url}/v1/kv/txn/{key}", {"value": value}, timeout_s=5)[0] == 200
    except OSError:
        return False


def groups_of(proc: NodeProcess) -> dict[str, Any]:
    status, view = http("GET", f"{proc.url}/v1/status")
    return view.get("transactional", {}).get("groups", {}) if status == 200 else {}


@pytest.mark.soak
@pytest.mark.cluster
def test_a_paxos_voter_comes_back_from_a_snapshot_under_a_new_id(tmp_path: Path) -> None:
    """The safe way back for a node of a cluster with a transactional keyspace: its
    snapshot (taken on every node under one name) restores only under a new node id
    that replaces it; the Paxos groups add that id as a learner, catch it up and drop
    the old one, and every acknowledged transactional write reads back through it."""
    import shutil

    from ringkv.address import format_address
    from ringkv.tools.launcher import free_port
    from tests.test_bootstrap_process import make_cluster, put, start_first
    from tests.test_removenode_process import kill_for_good, wait_ring

    cluster = make_cluster(tmp_path, 4, **{"keyspaces.txn": {
        "replication_factor": 3, "tier": "transactional", "ranges": 4}})
    extra: list[NodeProcess] = []
    try:
        start_first(cluster, 4)
        first = cluster.procs[0]
        wait_until(lambda: txn_put(first, "t0", 0), timeout_s=30, interval_s=0.2,
                   what="the first transactional write (election and clock sync)")
        txn_acked = {f"t{i}": i for i in range(40) if txn_put(cluster.procs[i % 4], f"t{i}", i)}
        eventual = {f"e{i}": i for i in range(100) if put(cluster.procs[i % 4], f"e{i}", i)}
        assert len(txn_acked) >= 35 and len(eventual) == 100
        # The victim: a member of Paxos groups (an acceptor with promises to forget).
        victim = next(p for p in cluster.procs[1:] if groups_of(p))

        taken = ringkv("snapshot", "create", "before-loss", env={"RINGKV_URL": first.url})
        assert taken.returncode == 0, taken.stderr
        assert sorted(line.split(":")[0] for line in taken.stdout.splitlines()) == sorted(
            p.node_id for p in cluster.procs)
        backup = tmp_path / "backup"
        shutil.copytree(tmp_path / victim.node_id / SNAPSHOTS_DIR / "before-loss", backup)
        manifest_doc = json.loads((backup / MANIFEST_FILE).read_text())
        assert manifest_doc["txn_groups"] >= 1 and manifest_doc["keys"] > 0

        others = [p for p in cluster.procs if p is not victim]
        kill_for_good(victim, others)
        shutil.rmtree(tmp_path / victim.node_id)  # the lost disk

        # Under its own identity it would vote without its promises: refused.
        same = ringkv("node", "--config", str(cluster.config_file()), "--id", victim.node_id,
                      "--data-dir", str(tmp_path / "same"), "--restore", str(backup))
        assert same.returncode == 2 and "Paxos voter" in same.stderr, same.stderr

        seed = format_address("127.0.0.1", first.internode_port)
        replacement = NodeProcess("node5", tmp_path, client_port=free_port(),
                                  internode_port=free_port(), config_path=cluster.config_file(),
                                  extra_args=["--seeds", seed, "--replace", victim.node_id,
                                              "--restore", str(backup)])
        extra.append(replacement)
        replacement.start()
        live = [*others, replacement]
        wait_ring(live, {p.node_id for p in live})

        def moved() -> bool:
            views = [groups_of(proc) for proc in live]
            return all(victim.node_id not in g["members"] and g["members"] == sorted(g["replicas"])
                       for view in views for g in view.values()) and bool(views[-1])

        wait_until(moved, timeout_s=90, interval_s=0.5,
                   what="every Paxos group to drop the dead node and settle on the ring's")
        for key, value in txn_acked.items():
            status, body = http("GET", f"{replacement.url}/v1/kv/txn/{key}", timeout_s=10)
            assert status == 200 and body["value"] == value, (key, status, body)
        for key, value in eventual.items():
            status, body = http("GET", f"{replacement.url}/v1/kv/default/{key}?consistency=ALL")
            assert status == 200 and body["value"] == value, (key, status, body)
        assert txn_put(replacement, "after", 1)
    finally:
        for proc in extra:
            proc.stop()
        cluster.down()
