"""Session leases on three real node processes (``/v1/lease``, ``txn/lease_service.py``).

Keyspace ``ls`` is transactional, RF 3, three ranges: a lease's keys spread
over several Paxos groups, so its expiry is one transaction across ranges.
Checked:

- a child process takes a lease (TTL 2 s), attaches keys on every range and
  keeps the lease alive: the keys stay for three TTLs; after SIGKILL of the
  child they vanish within TTL + ε + the sweep interval + one transaction
  (measured and printed), all at once: a watch on the prefix sees every
  delete at one version, and reads of all the keys at one snapshot never
  see some gone and some not; a key overwritten without the lease survives;
- revoke deletes at once; a keepalive (or a put) after expiry or revoke is
  refused with 404 ``lease_expired`` naming the lease; the async client's
  lease is kept alive by a task and revoked on exit;
- bad input gets a 400 naming the field; no client may write the leases'
  reserved keys.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringkv.client import AsyncClient, Client, LeaseExpired
from ringkv.client.plan import Effect, Outcome, Send
from ringkv.tools.launcher import free_port_block
from ringkv.tools.local_cluster import LocalCluster
from tests.procs import http, wait_until

pytestmark = pytest.mark.cluster

KS = "ls"
TTL_S = 2
SWEEP_MS = 100
MAX_KEYS = 8
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tmp: Path = tmp_path_factory.mktemp("leases")
    overrides: dict[str, Any] = {
        f"keyspaces.{KS}": {"replication_factor": 3, "tier": "transactional", "ranges": 3},
        "txn.lease_s": 2.0, "txn.lease_sweep_ms": SWEEP_MS,
        "txn.max_keys_per_lease": MAX_KEYS}
    cluster = LocalCluster(tmp, nodes=3, rf=3, base_client_port=free_port_block(3),
                           base_internode_port=free_port_block(3), config_overrides=overrides)
    try:
        cluster.up(timeout_s=30)
        a = cluster.procs[0]
        for i in range(12):  # every range has a leader before the tests
            wait_until(lambda i=i: http("PUT", f"{a.url}/v1/kv/{KS}/warm{i}",
                                        {"value": 0})[0] == 200, timeout_s=30, interval_s=0.2, what=f"a first write to {KS}")
        yield cluster
    finally:
        cluster.down()


def ranges_of(cluster: LocalCluster, keys: list[str]) -> set[str]:
    """The ranges (Paxos groups) the keys fall in, as the write receipts name them."""
    a = cluster.procs[0]
    seen: set[str] = set()
    for key in keys:
        status, body = http("GET", f"{a.url}/v1/kv/{KS}/{key}")
        assert status == 200, body
        seen.add(body["receipt"]["range"])
    return seen


def snapshot(url: str, keys: list[str]) -> dict[str, bool]:
    """Which of ``keys`` exist, read in one transaction (one serializable cut)."""
    status, body = http("POST", f"{url}/v1/txn", {"keyspace": KS, "reads": keys})
    assert status == 200, body
    return {r["key"]: r["found"] for r in body["reads"]}


CHILD = textwrap.dedent("""
    import json, sys, time
    from ringkv.client import Client
    urls, keys, ready = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    with Client(urls, keyspace="ls", protocol="http") as kv:
        with kv.lease(2, keyspace="ls") as lease:
            for key in keys:
                kv.put(key, {"owner": "child"}, keyspace="ls", lease=lease)
            with open(ready + ".tmp", "w") as out:
                json.dump({"lease": lease.id}, out)
            import os
            os.replace(ready + ".tmp", ready)
            for _ in range(600):  # renewed by the lease's thread until killed
                time.sleep(0.1)
""")


def test_a_dead_owners_keys_vanish_together_and_an_overwritten_key_survives(
        cluster: LocalCluster, tmp_path: Path) -> None:
    a, b, c = cluster.procs
    keys = [f"sess/k{i}" for i in range(8)]
    ready = tmp_path / "ready.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps([a.url, b.url]), json.dumps(keys), str(ready)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(ready.exists, timeout_s=15, interval_s=0.05, what="the child's lease")
        lease_id = json.loads(ready.read_text())["lease"]
        assert len(ranges_of(cluster, keys)) == 3  # the keys span every range
        # Someone else overwrites one key without the lease: it is detached.
        status, body = http("PUT", f"{c.url}/v1/kv/{KS}/{keys[-1]}", {"value": "mine"})
        assert status == 200, body
        from_version = body["version"]  # the watch starts here
        status, info = http("GET", f"{c.url}/v1/lease/{lease_id}")
        assert status == 200 and info["keys"] == keys[:-1], info
        events: list[Any] = []  # a watch on the prefix

        def watcher() -> None:
            with Client([b.url, c.url], keyspace=KS, protocol="http") as kv:
                for event in kv.watch(KS, "sess/", prefix=True, from_version=from_version):
                    events.append(event)
                    if sum(e.type == "delete" for e in events) >= len(keys) - 1:
                        return

        thread = threading.Thread(target=watcher, daemon=True)
        thread.start()
        # The owner lives: its keys stay for three TTLs.
        alive_until = time.monotonic() + 3 * TTL_S
        while time.monotonic() < alive_until:
            assert all(snapshot(c.url, keys).values()), "a key vanished while its lease lived"
            time.sleep(0.2)
        assert child.poll() is None
        child.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        child.wait(timeout=10)
        cuts: list[dict[str, bool]] = []
        deadline = killed + TTL_S + 3
        while time.monotonic() < deadline:
            cut = snapshot(a.url, keys[:-1])
            cuts.append(cut)
            if not any(cut.values()):
                break
            time.sleep(0.02)
        vanished_s = time.monotonic() - killed
        print(f"\nkeys of a SIGKILLed owner vanished {vanished_s:.2f} s after the kill "
              f"(TTL {TTL_S} s, sweep {SWEEP_MS} ms, {len(cuts)} snapshots)")
        assert not any(cuts[-1].values()), f"keys still there {vanished_s:.1f} s after the kill"
        # Within TTL + epsilon + sweep + one transaction (the last keepalive was <= TTL/3 ago).
        assert vanished_s < TTL_S + 1.0
        # All at once: no snapshot saw some gone and some not.
        assert all(len(set(cut.values())) == 1 for cut in cuts), cuts
        thread.join(timeout=10)
        deletes = [e for e in events if e.type == "delete"]
        assert sorted(e.key for e in deletes) == sorted(keys[:-1]), events
        assert len({e.version for e in deletes}) == 1, deletes  # one transaction
        # The overwritten key survives, and the lease is gone for good.
        status, body = http("GET", f"{a.url}/v1/kv/{KS}/{keys[-1]}")
        assert status == 200 and body["value"] == "mine"
        status, body = http("POST", f"{a.url}/v1/lease/{lease_id}/keepalive", {})
        assert status == 404 and body["error"]["code"] == "lease_expired"
        assert body["error"]["lease"] == lease_id
        # One node's sweeper expired it (GET /v1/status counts it).
        expired = sum(http("GET", f"{p.url}/v1/status")[1]["transactional"]["stats"]
                      ["leases_expired"] for p in cluster.procs)
        assert expired >= 1
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)


def test_revoke_deletes_at_once_and_a_dead_lease_refuses_keepalive_and_puts(
        cluster: LocalCluster) -> None:
    a, b, _ = cluster.procs
    status, granted = http("POST", f"{a.url}/v1/lease", {"ttl": 30, "keyspace": KS})
    assert status == 200 and granted["ttl"] == 30, granted
    lease_id = granted["id"]
    keys = [f"rev/k{i}" for i in range(5)]
    for key in keys:
        status, body = http("PUT", f"{b.url}/v1/kv/{KS}/{key}", {"value": 1, "lease": lease_id})
        assert status == 200 and body["lease"] == lease_id, body
    status, body = http("DELETE", f"{b.url}/v1/lease/{lease_id}")
    assert status == 200 and sorted(body["deleted"]) == keys, body
    assert not any(snapshot(a.url, keys).values())  # at once, not at a sweep
    for method, path, payload in (
            ("POST", f"/v1/lease/{lease_id}/keepalive", {}), ("DELETE", f"/v1/lease/{lease_id}", None),
            ("GET", f"/v1/lease/{lease_id}", None),
            ("PUT", f"/v1/kv/{KS}/rev/k0", {"value": 2, "lease": lease_id})):
        status, body = http(method, a.url + path, payload)
        assert status == 404 and body["error"]["code"] == "lease_expired", (path, body)
        assert body["error"]["lease"] == lease_id
    # A lease nobody renews expires by itself; a keepalive after that is refused.
    status, granted = http("POST", f"{a.url}/v1/lease", {"ttl": 1, "keyspace": KS})
    short = granted["id"]
    assert http("PUT", f"{a.url}/v1/kv/{KS}/short", {"value": 1, "lease": short})[0] == 200
    started = time.monotonic()
    wait_until(lambda: http("GET", f"{a.url}/v1/kv/{KS}/short")[0] == 404, timeout_s=5,
               interval_s=0.05, what="the unrenewed lease's key to go")
    assert time.monotonic() - started < 1 + 1.0
    status, body = http("POST", f"{b.url}/v1/lease/{short}/keepalive", {})
    assert status == 404 and body["error"]["code"] == "lease_expired"


def test_a_full_lease_refuses_a_key_until_one_of_its_keys_is_detached(
        cluster: LocalCluster) -> None:
    a = cluster.procs[0]
    lease = http("POST", f"{a.url}/v1/lease", {"ttl": 30, "keyspace": KS})[1]["id"]
    for i in range(MAX_KEYS):
        assert http("PUT", f"{a.url}/v1/kv/{KS}/full/k{i}", {"value": i, "lease": lease})[0] == 200
    # Attaching a key already attached takes no new place.
    assert http("PUT", f"{a.url}/v1/kv/{KS}/full/k0", {"value": 0, "lease": lease})[0] == 200
    status, body = http("PUT", f"{a.url}/v1/kv/{KS}/full/more", {"value": 1, "lease": lease})
    assert status == 413 and body["error"]["field"] == "lease", body
    assert http("PUT", f"{a.url}/v1/kv/{KS}/full/k1", {"value": "detached"})[0] == 200
    status, body = http("PUT", f"{a.url}/v1/kv/{KS}/full/more", {"value": 1, "lease": lease})
    assert status == 200, body
    keys = http("GET", f"{a.url}/v1/lease/{lease}")[1]["keys"]
    assert "full/k1" not in keys and "full/more" in keys and len(keys) == MAX_KEYS
    deleted = http("DELETE", f"{a.url}/v1/lease/{lease}")[1]["deleted"]
    assert sorted(deleted) == sorted(keys)
    assert http("GET", f"{a.url}/v1/kv/{KS}/full/k1")[1]["value"] == "detached"


GRANTS = 32


def test_concurrent_grants_all_get_a_lease(cluster: LocalCluster) -> None:
    """Every grant rewrites the keyspace's lease directory: a node grants what waits in
    one transaction, and a batch that loses the race to another node's goes again
    (one at a time, with a fixed 8 tries, one of 16 grants failed on a loaded machine)."""
    answers: list[tuple[int, Any]] = []

    def grant(url: str) -> None:
        answers.append(http("POST", f"{url}/v1/lease", {"ttl": 5, "keyspace": KS}))

    threads = [threading.Thread(target=grant, args=(cluster.procs[i % 3].url,))
               for i in range(GRANTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    assert [status for status, _ in answers] == [200] * GRANTS, answers
    assert len({body["id"] for _, body in answers}) == GRANTS


def test_the_blocking_clients_lease_over_either_protocol(cluster: LocalCluster) -> None:
    a, b, _ = cluster.procs
    for protocol in ("native", "http"):
        with Client([a.url, b.url], keyspace=KS, protocol=protocol) as kv:
            with kv.lease(30) as lease:
                kv.put(f"blk/{protocol}", 1, lease=lease)
                assert lease.keepalive() > 29_000
                assert lease.info()["keys"] == [f"blk/{protocol}"]
                assert kv.get(f"blk/{protocol}") == 1
            assert kv.get(f"blk/{protocol}") is None  # revoked on exit
            with pytest.raises(LeaseExpired) as caught:
                lease.keepalive()
            assert caught.value.lease == lease.id
            with pytest.raises(LeaseExpired):
                kv.put(f"blk/{protocol}", 2, lease=lease.id)


def test_the_async_clients_lease_is_renewed_by_a_task_and_revoked_on_exit(
        cluster: LocalCluster) -> None:
    a, b, _ = cluster.procs

    async def run() -> None:
        async with AsyncClient([a.url, b.url], keyspace=KS, protocol="http") as kv:
            async with await kv.lease(1, keyspace=KS) as lease:
                await kv.put("async/k", "v", keyspace=KS, lease=lease)
                await asyncio.sleep(2.5)  # over two TTLs: only the renewals keep it
                assert (await kv.get("async/k", keyspace=KS)) == "v"
                info = await lease.info()
                assert info["keys"] == ["async/k"] and lease.lost is None
            assert (await kv.get("async/k", keyspace=KS)) is None  # revoked on exit

    asyncio.run(run())


class NotingClient(Client):
    """A ``Client`` that notes each lease renewal's attempt timeout."""

    renewal_timeouts: list[float]

    def _perform(self, effect: Effect) -> Outcome:
        if isinstance(effect, Send) and effect.url.endswith("/keepalive"):
            self.renewal_timeouts.append(effect.timeout_s)
        return super()._perform(effect)


class NotingAsyncClient(AsyncClient):
    """An ``AsyncClient`` that notes each lease renewal's attempt timeout."""

    renewal_timeouts: list[float]

    async def _perform(self, effect: Effect) -> Outcome:
        if isinstance(effect, Send) and effect.url.endswith("/keepalive"):
            self.renewal_timeouts.append(effect.timeout_s)
        return await super()._perform(effect)


def test_background_renewals_give_a_node_a_share_of_the_ttl_not_the_clients_timeout(
        cluster: LocalCluster) -> None:
    """Both clients' lease threads and tasks bound each renewal attempt by the TTL
    (``routing.renewal_bounds_s``), however long the client's ``timeout_s``: a node that
    falls silent is then passed over before the lease lapses (the simulator's
    ``test_a_session_outlives_the_node_its_renewals_go_to_falling_silent``)."""
    a, b, _ = cluster.procs
    kv = NotingClient([a.url, b.url], keyspace=KS, timeout_s=5.0)
    kv.renewal_timeouts = []
    with kv:
        with kv.lease(TTL_S) as lease:
            wait_until(lambda: len(kv.renewal_timeouts) >= 3, timeout_s=10, interval_s=0.05,
                       what="three background renewals")
            assert lease.lost is None
            background = kv.renewal_timeouts[:3]
            before = len(kv.renewal_timeouts)
            assert lease.keepalive() > 0  # the public call: the client's own timeout_s
            public = kv.renewal_timeouts[before:]
    assert all(t <= TTL_S / 4 for t in background), background
    assert 5.0 in public, public

    async def run() -> list[float]:
        akv = NotingAsyncClient([a.url, b.url], keyspace=KS, timeout_s=5.0)
        akv.renewal_timeouts = []
        async with akv:
            async with await akv.lease(TTL_S) as alease:
                for _ in range(100):  # bounded: 10 s
                    if len(akv.renewal_timeouts) >= 3:
                        break
                    await asyncio.sleep(0.1)
                assert alease.lost is None
            return akv.renewal_timeouts

    timeouts = asyncio.run(run())
    assert len(timeouts) >= 3 and all(t <= TTL_S / 4 for t in timeouts), timeouts


def test_bad_lease_input_names_the_field(cluster: LocalCluster) -> None:
    a = cluster.procs[0]
    for body, field in (({"ttl": 0, "keyspace": KS}, "ttl"), ({"ttl": "2", "keyspace": KS}, "ttl"),
                        ({"ttl": 86_401, "keyspace": KS}, "ttl"), ({"keyspace": KS}, "ttl"),
                        ({"ttl": 2, "keyspace": "default"}, "keyspace"),
                        ({"ttl": 2, "keyspace": KS, "other": 1}, "other")):
        status, answer = http("POST", f"{a.url}/v1/lease", body)
        assert status == 400 and answer["error"]["field"] == field, (body, answer)
    status, answer = http("POST", f"{a.url}/v1/lease/not-a-lease/keepalive", {})
    assert status == 400 and answer["error"]["field"] == "id", answer
    status, answer = http("PUT", f"{a.url}/v1/kv/{KS}/x", {"value": 1, "lease": "nope"})
    assert status == 400 and answer["error"]["field"] == "lease", answer
    status, answer = http("PUT", f"{a.url}/v1/kv/{KS}/%00lease%2Fdir", {"value": 1})
    assert status == 400 and answer["error"]["field"] == "key", answer
    status, answer = http("POST", f"{a.url}/v1/txn", {"keyspace": KS, "writes": [
        {"op": "delete", "key": "\x00lease/dir"}]})
    assert status == 400 and answer["error"]["field"] == "writes[0].key", answer
    status, began = http("POST", f"{a.url}/v1/txn/begin", {"keyspace": KS})
    assert status == 200, began
    status, answer = http("PUT", f"{a.url}/v1/txn/{began['txn_id']}/kv/{KS}/%00lease%2Fr%2Fx",
                          {"value": 1})
    assert status == 400 and answer["error"]["field"] == "key", answer
    assert http("POST", f"{a.url}/v1/txn/{began['txn_id']}/abort")[0] == 200


def test_a_transactions_puts_attached_to_a_lease_go_with_it(cluster: LocalCluster) -> None:
    """``POST /v1/txn`` puts with ``"lease"``: the keys (on several ranges) are attached in
    the caller's transaction (its conditions still decide), and deleted with the lease."""
    a, b, _ = cluster.procs
    lease = http("POST", f"{a.url}/v1/lease", {"ttl": 30, "keyspace": KS})[1]["id"]
    keys = [f"txl/k{i}" for i in range(4)]
    status, body = http("POST", f"{b.url}/v1/txn", {
        "keyspace": KS, "conditions": [{"key": "txl/guard", "absent": True}],
        "reads": ["txl/guard"],
        "writes": [*({"op": "put", "key": k, "value": i, "lease": lease}
                     for i, k in enumerate(keys)), {"op": "put", "key": "txl/plain", "value": 1}]})
    assert status == 200 and body["committed"], body
    assert body["reads"] == [{"key": "txl/guard", "found": False, "value": None,
                              "version": None}], body  # the caller's reads, no record's
    assert len(ranges_of(cluster, keys)) > 1
    assert sorted(http("GET", f"{a.url}/v1/lease/{lease}")[1]["keys"]) == keys
    # The caller's own condition fails as it would without the lease: nothing attached.
    status, body = http("POST", f"{a.url}/v1/txn", {
        "keyspace": KS, "conditions": [{"key": "txl/plain", "absent": True}],
        "writes": [{"op": "put", "key": "txl/other", "value": 1, "lease": lease}]})
    assert status == 409 and body["error"]["key"] == "txl/plain", body
    deleted = http("DELETE", f"{a.url}/v1/lease/{lease}")[1]["deleted"]
    assert sorted(deleted) == keys
    assert not any(snapshot(a.url, [*keys, "txl/other"]).values())
    assert http("GET", f"{a.url}/v1/kv/{KS}/txl/plain")[0] == 200  # not attached: it stays
    # A lease that is gone (or never was) and bad lease input: refused, naming the field.
    status, body = http("POST", f"{a.url}/v1/txn", {"keyspace": KS, "writes": [
        {"op": "put", "key": "txl/x", "value": 1},
        {"op": "put", "key": "txl/y", "value": 1, "lease": lease}]})
    assert status == 404 and body["error"]["code"] == "lease_expired", body
    assert body["error"]["field"] == "writes[1].lease" and body["error"]["lease"] == lease
    for write, field in (({"op": "put", "key": "x", "value": 1, "lease": "nope"},
                          "writes[0].lease"),
                         ({"op": "delete", "key": "x", "lease": lease}, "writes[0].lease"),
                         ({"op": "put", "key": "x", "value": 1,
                           "lease": "default:0123456789abcdef"}, "writes[0].lease")):
        status, body = http("POST", f"{a.url}/v1/txn", {"keyspace": KS, "writes": [write]})
        assert status == 400 and body["error"]["field"] == field, (write, body)
