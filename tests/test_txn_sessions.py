"""Interactive transactions (issue #13 §2) on three real nodes in the simulator.

A session lives on the node that began it (``txn/sessions.py``): reads take
shared locks at each range's leader, writes are buffered and locked at
prepare, and commit runs two-phase commit over every range touched (Spanner
§4.2.1). Checked: a transaction reads its own writes; concurrent interactive
transfers across ranges keep the bank's total (strict two-phase locking with
wound-wait: a wounded transaction is told why and reruns); a read-only
transaction reads one snapshot (§4.1.4) and cannot write; an idle
transaction is ended and says why; every error names the transaction.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from ringkv.coordinator import Coordinator
from ringkv.errors import Aborted, NotFound, RingKVError
from ringkv.ring import allocate_tokens
from ringkv.sim.cluster import SimCluster
from ringkv.sim.loop import VirtualTimeLoop
from ringkv.sim.network import NetworkConditions, SimNetwork
from ringkv.sim.run import TXN_KEYSPACE
from ringkv.txn.ranges import RangeMap
from tests.test_txn_cross_range import ACCOUNTS, RANGES, START, _accounts, _configs, _until

KS = TXN_KEYSPACE


def run(seed: int, scenario: Any) -> dict[str, Any]:
    loop = VirtualTimeLoop()
    network = SimNetwork(loop, random.Random(seed), NetworkConditions())
    cluster = SimCluster(loop, network, _configs(seed), seed, Coordinator, lambda node: None)
    figures: dict[str, Any] = {}

    async def main() -> None:
        tokens = allocate_tokens(None, 3, random.Random(seed))
        for machine, token in zip(cluster.machines, tokens):
            machine.identity.save_tokens((token,))
        for machine in cluster.machines:
            await machine.start()
        await _until(loop, lambda: all(m.node is not None and len(m.node.ring) == 3
                                       for m in cluster.machines), "one ring of three", 60)
        n1 = cluster.machines[0].node
        assert n1 is not None
        accounts = _accounts(RangeMap(KS, n1.ring, 3, RANGES))
        await scenario(cluster, accounts, figures)
        for machine in cluster.machines:
            machine.crash()

    loop.run_until_complete(asyncio.wait_for(main(), timeout=600))
    loop.close()
    return figures


async def _retry(call: Any, attempts: int = 60) -> Any:
    """Until the groups have formed and elected (the first calls meet no leader)."""
    for _ in range(attempts):
        try:
            return await call()
        except RingKVError as exc:
            if isinstance(exc, (Aborted, NotFound)):
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("never served")


def _deadline(node: Any) -> float:
    return node.clock.monotonic_s() + 3.0


async def _open_accounts(machine: Any, accounts: list[bytes]) -> None:
    node = machine.node
    sessions = node.txn.sessions

    async def open_all() -> Any:
        txn = sessions.begin(KS)
        for key in accounts:
            await machine.run(sessions.write(txn["txn_id"], KS, key, json.dumps(START).encode(),
                                             _deadline(node)))
        return await machine.run(sessions.commit(txn["txn_id"], _deadline(node)))
    answer = await _retry(open_all)
    assert answer["committed"], answer


def test_reads_its_own_writes_and_commits_across_ranges() -> None:
    async def scenario(cluster: SimCluster, accounts: list[bytes], figures: dict[str, Any]) -> None:
        machine = cluster.machines[0]
        node = machine.node
        sessions = node.txn.sessions
        await _open_accounts(machine, accounts)
        a, b = accounts[0], accounts[-1]
        txn = sessions.begin(KS)["txn_id"]
        got = await machine.run(sessions.get(txn, KS, a, _deadline(node)))
        assert json.loads(got["value"]) == START
        await machine.run(sessions.write(txn, KS, a, b"1", _deadline(node)))
        own = await machine.run(sessions.get(txn, KS, a, _deadline(node)))
        assert own["value"] == b"1" and own["own_write"]
        await machine.run(sessions.write(txn, KS, b, None, _deadline(node)))
        try:
            await machine.run(sessions.get(txn, KS, b, _deadline(node)))
            raise AssertionError("a key deleted in the transaction reads as absent")
        except NotFound as exc:
            assert txn in exc.message
        done = await machine.run(sessions.commit(txn, _deadline(node)))
        assert done["committed"] and len(done["receipt"]["ranges"]) == 2, done
        # Another node's read-only transaction sees both writes, at one snapshot.
        other = cluster.machines[1]
        ro = other.node.txn.sessions.begin(KS, read_only=True)
        # Its snapshot is TT.now().latest at begin, after the commit's wait: it holds it.
        assert ro["read_ts"] > done["commit_ts"], (ro, done)
        seen = await other.run(other.node.txn.sessions.get(ro["txn_id"], KS, a,
                                                            _deadline(other.node)))
        assert seen["value"] == b"1"
        try:
            await other.run(other.node.txn.sessions.get(ro["txn_id"], KS, b, _deadline(other.node)))
            raise AssertionError("the deleted key is absent at the snapshot")
        except NotFound:
            pass
        try:
            await other.run(other.node.txn.sessions.write(ro["txn_id"], KS, a, b"2",
                                                          _deadline(other.node)))
            raise AssertionError("a read-only transaction cannot write")
        except Aborted as exc:
            assert exc.details["reason"] == "read_only"
        # Ended transactions say why, by id.
        try:
            await machine.run(sessions.write(txn, KS, a, b"3", _deadline(node)))
            raise AssertionError("a committed transaction takes no more writes")
        except Aborted as exc:
            assert exc.details["reason"] == "committed" and txn in exc.message
        figures["ok"] = True

    assert run(21, scenario)["ok"]


def test_interactive_transfers_keep_the_total() -> None:
    """Strict two-phase locking across ranges: concurrent read-modify-write
    transfers never lose or make money, and wounded ones are told why."""
    async def scenario(cluster: SimCluster, accounts: list[bytes], figures: dict[str, Any]) -> None:
        await _open_accounts(cluster.machines[0], accounts)
        stop = asyncio.Event()
        figures.update(committed=0, reasons={})

        async def client(i: int) -> None:
            rng = random.Random(i)
            while not stop.is_set():
                machine = rng.choice(cluster.machines)
                node = machine.node
                sessions = node.txn.sessions
                a, b = rng.sample(accounts, 2)
                txn = sessions.begin(KS)["txn_id"]
                try:
                    bal_a = json.loads((await machine.run(sessions.get(txn, KS, a, _deadline(node))))["value"])
                    bal_b = json.loads((await machine.run(sessions.get(txn, KS, b, _deadline(node))))["value"])
                    amount = min(bal_a, rng.randint(1, 30))
                    await machine.run(sessions.write(txn, KS, a, json.dumps(bal_a - amount).encode(),
                                                     _deadline(node)))
                    await machine.run(sessions.write(txn, KS, b, json.dumps(bal_b + amount).encode(),
                                                     _deadline(node)))
                    await machine.run(sessions.commit(txn, _deadline(node)))
                    figures["committed"] += 1
                except Aborted as exc:
                    reason = exc.details.get("reason")
                    assert txn in exc.message, exc.message
                    figures["reasons"][reason] = figures["reasons"].get(reason, 0) + 1
                except RingKVError as exc:
                    figures["reasons"][exc.code] = figures["reasons"].get(exc.code, 0) + 1
                await asyncio.sleep(rng.uniform(0, 0.01))

        tasks = [asyncio.ensure_future(client(i)) for i in range(6)]
        await asyncio.sleep(10.0)
        stop.set()
        await asyncio.wait(tasks, timeout=10)
        for task in tasks:
            task.result()
        machine = cluster.machines[2]
        ro = machine.node.txn.sessions.begin(KS, read_only=True)["txn_id"]
        total = 0
        for key in accounts:
            got = await machine.run(machine.node.txn.sessions.get(ro, KS, key, _deadline(machine.node)))
            assert json.loads(got["value"]) >= 0
            total += json.loads(got["value"])
        figures["total"] = total

    figures = run(22, scenario)
    assert figures["total"] == START * ACCOUNTS, figures
    assert figures["committed"] >= 20, figures
    assert set(figures["reasons"]) <= {"wounded", "aborted", "leader_changed"}, figures


def test_an_idle_transaction_is_ended_and_says_why() -> None:
    async def scenario(cluster: SimCluster, accounts: list[bytes], figures: dict[str, Any]) -> None:
        machine = cluster.machines[0]
        node = machine.node
        sessions = node.txn.sessions
        await _open_accounts(machine, accounts)
        txn = sessions.begin(KS)["txn_id"]
        await machine.run(sessions.get(txn, KS, accounts[0], _deadline(node)))
        # Past txn.idle_timeout_s (30 s) with no call: ended, and its lock released,
        # so another transaction writes the key at once.
        await asyncio.sleep(node.config.txn.idle_timeout_s + 1.0)
        try:
            await machine.run(sessions.get(txn, KS, accounts[0], _deadline(node)))
            raise AssertionError("an idle transaction is ended")
        except Aborted as exc:
            figures["reason"] = exc.details["reason"]
        other = sessions.begin(KS)["txn_id"]
        await machine.run(sessions.write(other, KS, accounts[0], b"7", _deadline(node)))
        figures["after"] = await machine.run(sessions.commit(other, _deadline(node)))

    figures = run(23, scenario)
    assert figures["reason"] == "idle", figures
    assert figures["after"]["committed"], figures
