"""Session leases on the simulator (issue #17): a lease kept alive keeps its keys through
leader kills, partitions and clock drift; once its owner stops renewing (or its node is
killed) the real sweeper deletes every key at one version, within a bound past the
deadline.

Three real nodes on virtual time (clocks drifting within TrueTime's configured
bound); the owner grants a lease, attaches keys in several ranges and renews
it through the lease routes' own calls (``txn/lease_service.py``) on any node
up, every RENEW_S of a TTL_S lease, while the nemesis kills nodes (mostly
range leaders) and cuts nodes off for at most MAX_FAULT_S, less than the
renewal margin. A watcher (the HTTP watch's poll) sees the keys' deletes; the
deadline is read from the lease record's own committed history (its last
version before the delete: a last keepalive whose answer was lost counts). ``check_lease_keys`` judges,
and catches the planted bugs below."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from ringkv.client.plan import Failure, Reply, Send
from ringkv.errors import RingKVError
from ringkv.sim.clock import SimClock
from ringkv.sim.coordination import LeaseOwner, Nemesis, SimWatcher, boot_cluster, lease_deadline_us
from ringkv.sim.loop import Process
from ringkv.sim.run import TXN_KEYSPACE
from ringkv.sim.sim_client import SimClient
from ringkv.sim.watch_stream import check_lease_keys
from ringkv.txn.watch import Change
from tests.sim_waits import until

FAST_SEEDS = [1, 2, 3]
SOAK_SEEDS = list(range(10, 30))
TTL_S = 4
RENEW_S = 0.5
# Faults never cut the owner off longer than its renewal margin (TTL_S - RENEW_S): one
# at a time, each at most MAX_FAULT_S, and REST_S apart, long enough for a range whose
# leader was killed to elect another (its Paxos lease, txn.lease_s 2 s, runs out first).
MAX_FAULT_S = 1.5
REST_S = (2.5, 3.5)
ALIVE_S = 12.0  # virtual seconds the owner renews under faults
KEYS = 4
SWEEP_S = 0.25  # txn.lease_sweep_ms
# How late past the deadline the keys may go: ε, a sweep, and the sweeper's reads and
# expiry transaction across ranges; with the owner's node killed, plus a new leader of
# the directory's range (a Paxos lease of txn.lease_s, 2 s, to run out, and an election).
BOUND_S = SWEEP_S + 0.5
BOUND_KILLED_S = BOUND_S + 2 * 2.0


def run_lease(seed: int, *, kill_owner_node: bool) -> dict[str, Any]:
    loop, cluster = boot_cluster(seed)
    out: dict[str, Any] = {}

    async def main() -> None:
        await cluster.boot(60, provision=random.Random(seed))
        watcher = SimWatcher(cluster, random.Random(f"watch:{seed}"), b"eph/")
        watching = asyncio.ensure_future(watcher.run())
        while watcher.start_us is None:  # bounded: the cluster is up
            await asyncio.sleep(0.05)
        owner = LeaseOwner(cluster, random.Random(f"owner:{seed}"), TTL_S, RENEW_S)
        await owner.start(KEYS)
        renewing = asyncio.ensure_future(owner.run())
        nemesis = Nemesis(cluster, random.Random(f"nemesis:{seed}"), max_fault_s=MAX_FAULT_S,
                          rest_s=REST_S)
        faults = asyncio.ensure_future(nemesis.run())
        await asyncio.sleep(ALIVE_S)
        nemesis.stop.set()
        await asyncio.wait([faults], timeout=30)
        alive_deletes = [c for c in watcher.delivered if c.value is None]
        # The owner dies: it stops renewing, and perhaps its node goes with it.
        owner.stop.set()
        await asyncio.wait([renewing], timeout=30)
        await cluster.heal()
        killed = None
        if kill_owner_node and owner.machine is not None:
            killed = owner.machine
            killed.crash()
        for _ in range(400):  # bounded: 40 virtual seconds
            gone = {c.key for c in watcher.delivered if c.value is None}
            if gone >= set(owner.keys):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # any later delete of them would show now
        assert owner.lease is not None and watcher.start_us is not None
        deadline_us = await lease_deadline_us(cluster, owner.lease, watcher.start_us,
                                              random.Random(seed))
        assert deadline_us is not None, "the lease record was never deleted"
        watcher.stop.set()
        await asyncio.wait([watching], timeout=30)
        watching.result()
        out.update(keys=owner.keys, refusals=owner.refusals, faults=nemesis.log,
                   alive_deletes=alive_deletes, deadline_us=deadline_us,
                   deletes=[c for c in watcher.delivered if c.value is None],
                   killed=None if killed is None else killed.node_id)

    try:
        loop.run_until_complete(main())
    finally:
        cluster.stop_all()
        loop.dispose()
    return out


def _judge(seed: int, *, kill_owner_node: bool) -> None:
    run = run_lease(seed, kill_owner_node=kill_owner_node)
    context = f"seed {seed}; faults: {run['faults']}"
    assert run["faults"] and len(run["keys"]) == KEYS, context
    assert not run["refusals"], f"the owner was told its live lease expired: {context}"
    assert not check_lease_keys(run["alive_deletes"], run["keys"],
                                deadline_us=run["deadline_us"], bound_s=None), context
    problems = check_lease_keys(run["deletes"], run["keys"], deadline_us=run["deadline_us"],
                                bound_s=BOUND_KILLED_S if kill_owner_node else BOUND_S)
    assert not problems, f"{problems}; {context}"


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_a_kept_lease_keeps_its_keys_and_a_dead_owners_go_at_once_in_bound(seed: int) -> None:
    _judge(seed, kill_owner_node=False)


@pytest.mark.parametrize("seed", FAST_SEEDS[:2])
def test_the_keys_go_in_bound_when_the_owners_node_is_killed(seed: int) -> None:
    _judge(seed, kill_owner_node=True)


@pytest.mark.soak
@pytest.mark.parametrize("seed", SOAK_SEEDS)
def test_leases_across_faults_soak(seed: int) -> None:
    _judge(seed, kill_owner_node=seed % 2 == 0)


# -- the checker, proved by planted bugs ------------------------------------------------------

KEYS_PLANTED = [b"eph/1", b"eph/2"]


def test_the_checker_accepts_keys_gone_at_one_version_in_bound() -> None:
    deletes = [Change(k, None, 5_200_000) for k in KEYS_PLANTED]
    assert check_lease_keys(deletes, KEYS_PLANTED, deadline_us=5_000_000, bound_s=0.5) == []
    assert check_lease_keys([], KEYS_PLANTED, deadline_us=5_000_000, bound_s=None) == []


@pytest.mark.parametrize("plant", ["early", "late", "split", "one_left", "while_alive"])
def test_the_lease_checker_catches_a_planted_bug(plant: str) -> None:
    at = {"early": 4_900_000, "late": 6_000_000}.get(plant, 5_200_000)
    deletes = [Change(k, None, at) for k in KEYS_PLANTED]
    bound: float | None = 0.5
    if plant == "split":
        deletes[1] = Change(KEYS_PLANTED[1], None, at + 1)
    elif plant == "one_left":
        deletes.pop()
    elif plant == "while_alive":
        bound = None
    assert check_lease_keys(deletes, KEYS_PLANTED, deadline_us=5_000_000, bound_s=bound)


# -- a session's renewals when the node they go to falls silent -------------------------------

SILENT_TTL_S = 2
SILENT_TIMEOUT_S = 2.0  # the client's timeout_s, as long as the TTL
SILENT_RUN_S = 4 * SILENT_TTL_S  # virtual seconds the session must outlive the cut


class CutsTheRenewalsNode(SimClient):
    """A ``SimClient`` that, once ``armed``, cuts its own link to the node the next
    renewal goes to, just after the renewal left: that node falls silent (no reset),
    its answer never comes, and the link stays cut."""

    armed = False
    cut_node: str | None = None

    async def _send(self, effect: Send) -> Reply | Failure:
        if not (self.armed and effect.url.endswith("/keepalive")):
            return await super()._send(effect)
        self.armed = False
        machine = self._machine_for(effect.url)
        assert machine is not None
        sending = asyncio.ensure_future(super()._send(effect))
        await asyncio.sleep(0)  # the request is on its way
        self.cut_node = machine.node_id
        self.cluster.network.cut({(self.machine, machine.node_id)})
        return await sending


def run_silent_renewal_node(seed: int) -> dict[str, Any]:
    loop, cluster = boot_cluster(seed)
    out: dict[str, Any] = {}

    async def main() -> None:
        await cluster.boot(60, provision=random.Random(seed))
        process = Process("session")
        kv = CutsTheRenewalsNode(cluster, "session", process, SimClock(loop),
                                 random.Random(f"session:{seed}"), keyspace=TXN_KEYSPACE,
                                 timeout_s=SILENT_TIMEOUT_S)

        async def work() -> None:
            session = kv.session(ttl_s=SILENT_TTL_S, keyspace=TXN_KEYSPACE)
            for _ in range(100):  # bounded: the ranges elect leaders after the boot
                try:
                    await session.open()
                    break
                except RingKVError:
                    await asyncio.sleep(0.2)
            assert session.lease is not None, "no lease granted in 100 tries"
            await asyncio.sleep(SILENT_TTL_S)  # renewed a few times through every node
            kv.armed = True
            await until(lambda: kv.cut_node is not None, "a renewal after arming")
            cut_at_s = loop.time()
            timeouts = kv.stats["timeouts"]
            await until(lambda: session.lost or loop.time() > cut_at_s + SILENT_RUN_S,
                        "the session to outlive the cut, or lose its lease",
                        timeout_s=SILENT_RUN_S + 1)
            assert session.lease is not None
            out.update(lost=session.lease.lost, cut_node=kv.cut_node,
                       felt=kv.stats["timeouts"] - timeouts)
            if session.lease.lost is None:
                out["remaining_ms"] = await session.lease.keepalive()
            await session.close()

        await loop.create_task(work(), context=process.context)

    try:
        loop.run_until_complete(main())
    finally:
        cluster.stop_all()
        loop.dispose()
    return out


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_a_session_outlives_the_node_its_renewals_go_to_falling_silent(seed: int) -> None:
    """TTL 2 s, the client's timeout_s 2 s: the renewal that meets the silent node gives
    up on it within a share of the TTL and renews through another node in time."""
    run = run_silent_renewal_node(seed)
    assert run["cut_node"] is not None and run["felt"] >= 1, run  # the silence was met
    assert run["lost"] is None, f"the session lost its lease: {run}"
    assert run["remaining_ms"] > 0, run
