"""The lock recipe on the simulator (issue #17): a lock is never held by two live clients
at once, judged by the fencing tokens a guarded resource saw.

Three real nodes on virtual time; three contenders, each the real ``AsyncLock`` on a
``SimClient`` (the real ``AsyncClient`` whose requests travel the simulated network
to the nodes' own handlers), loop acquire, ``enter`` at the resource, the recipe's
``fenced_put``, ``exit``, ``check()``, release, while one nemesis kills nodes (mostly
range leaders) and cuts them off, and another pauses contenders (often the holder,
up to 2.5 TTLs: its lease lapses) or cuts them off from every node; every clock
drifts within TrueTime's bound. ``sim/lock_history.py`` judges, and catches the
planted bugs (a contender that does not wait; a resource that does not fence).
Run with -s for the figures.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from ringkv.client.plan import Failure, Send
from ringkv.errors import RingKVError
from ringkv.sim.clock import SimClock
from ringkv.sim.coordination import boot_cluster
from ringkv.sim.lock_history import (
    ENTER,
    EXIT,
    FencedPut,
    Hold,
    ResourceWrite,
    check_lock_history,
)
from ringkv.sim.locks import LockHistory, LockSettings, run_locks
from ringkv.sim.loop import Process
from ringkv.sim.run import TXN_KEYSPACE
from ringkv.sim.sim_client import SimClient, client_machine

FAST_SEEDS = [1, 2, 3]
SOAK_SEEDS = list(range(10, 40))
FAST_S = 15.0  # virtual seconds of contention (after the cluster's boot)
SOAK_S = 40.0
# Seeds (and how long they run) with a join retried after its first attempt committed,
# answered from the outcome alone (no reads): read as "nobody live ahead", two held.
REPLAYED_JOIN_RUNS = [(30, 15.0), (16, 40.0), (25, 40.0)]
T = TypeVar("T")


def _run(seed: int, duration_s: float, plant: str | None = None) -> LockHistory:
    return run_locks(LockSettings(seed=seed, duration_s=duration_s, plant=plant))


def _judge(seed: int, duration_s: float) -> None:
    history = _run(seed, duration_s)
    figures = history.figures()
    print(f"\nseed {seed}: {figures}")
    context = f"seed {seed}; faults: {history.faults}"
    assert not history.unexpected, f"{history.unexpected}; {context}"
    assert figures["handovers"] >= 5, context  # they took turns
    assert figures["kills"] + figures["pauses"] >= 2, context  # under faults
    problems = check_lock_history(history.writes, history.holds, history.fenced)
    assert not problems, f"{problems[:5]}; {context}"


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_the_lock_is_never_held_twice_under_faults(seed: int) -> None:
    _judge(seed, FAST_S)


@pytest.mark.parametrize(("seed", "duration_s"), REPLAYED_JOIN_RUNS)
def test_a_join_replayed_without_its_reads_does_not_make_a_second_holder(
        seed: int, duration_s: float) -> None:
    _judge(seed, duration_s)  # 1.5-2.5 s each


@pytest.mark.soak
@pytest.mark.parametrize("seed", SOAK_SEEDS)
def test_the_lock_under_faults_soak(seed: int) -> None:
    _judge(seed, SOAK_S)


def test_one_seed_replays_the_same_history() -> None:
    first, second = _run(7, 8.0), _run(7, 8.0)
    assert first.writes and first.holds
    assert (first.writes, first.holds, first.fenced, first.faults) == (
        second.writes, second.holds, second.fenced, second.faults)


@pytest.mark.parametrize("plant", ["no_wait", "no_fence"])
def test_the_checker_catches_a_planted_bug_in_the_run(plant: str) -> None:
    history = _run(1, 20.0 if plant == "no_fence" else 8.0, plant)
    problems = check_lock_history(history.writes, history.holds, history.fenced)
    print(f"\n{plant}: {history.figures()}; {len(problems)} problems, first: {problems[:1]}")
    assert problems


@pytest.mark.soak
@pytest.mark.parametrize("plant", ["no_wait", "no_fence"])
def test_the_planted_bugs_are_caught_on_most_seeds_soak(plant: str) -> None:
    """A contender that does not wait is caught on every seed; a resource that does not
    fence only where a pause lapsed a holder's lease inside its section and another
    holder wrote before it resumed (most seeds)."""
    seeds = SOAK_SEEDS[:10]
    caught = [seed for seed in seeds
              if check_lock_history(*_parts(_run(seed, SOAK_S, plant)))]
    print(f"\n{plant}: caught on {len(caught)} of {len(seeds)} seeds")
    assert len(caught) >= (len(seeds) if plant == "no_wait" else len(seeds) // 2)


def _parts(history: LockHistory) -> tuple[list[ResourceWrite], list[Hold], list[FencedPut]]:
    return history.writes, history.holds, history.fenced


# -- the checker on its own, proved by planted histories ---------------------------------------


def _good() -> tuple[list[ResourceWrite], list[Hold]]:
    writes = [ResourceWrite(5, "a", ENTER, 1.0, True), ResourceWrite(5, "a", EXIT, 1.2, True),
              ResourceWrite(9, "b", ENTER, 2.0, True),
              ResourceWrite(7, "c", ENTER, 2.1, False),  # c's lease lapsed: refused, and lost
              ResourceWrite(9, "b", EXIT, 2.2, True)]
    holds = [Hold("a", 5, 0.9, 1.3), Hold("c", 7, 1.5, None), Hold("b", 9, 1.9, 2.3)]
    return writes, holds


def test_the_checker_accepts_a_good_history_and_a_preempted_holder() -> None:
    writes, holds = _good()
    assert check_lock_history(writes, holds, [FencedPut(5, "a", 100), FencedPut(9, "b", 200)]) == []
    # A holder whose lease lapsed inside its section: a newer one cuts in, its exit is refused.
    cut_in = [ResourceWrite(5, "a", ENTER, 1.0, True), ResourceWrite(9, "b", ENTER, 2.0, True),
              ResourceWrite(5, "a", EXIT, 2.1, False), ResourceWrite(9, "b", EXIT, 2.2, True)]
    assert check_lock_history(cut_in, [Hold("a", 5, 0.9, None), Hold("b", 9, 1.9, 2.3)]) == []


@pytest.mark.parametrize("plant", ["token_down", "shared_token", "interleaved",
                                   "refused_yet_held", "overlap", "fenced_down"])
def test_the_lock_checker_catches_a_planted_history(plant: str) -> None:
    writes, holds = _good()
    fenced = [FencedPut(5, "a", 100), FencedPut(9, "b", 200)]
    if plant == "token_down":
        writes.append(ResourceWrite(5, "a", ENTER, 3.0, True))
    elif plant == "shared_token":
        writes.append(ResourceWrite(9, "c", ENTER, 3.0, True))
    elif plant == "interleaved":
        writes[1:3] = [writes[2], writes[1]]  # b enters before a leaves, and a's exit lands
    elif plant == "refused_yet_held":
        holds[1] = Hold("c", 7, 1.5, 2.5)
    elif plant == "overlap":
        holds[0] = Hold("a", 5, 0.9, 1.95)  # a confirmed its hold after b acquired
    else:
        fenced.append(FencedPut(5, "a", 300))
    assert check_lock_history(writes, holds, fenced)


# -- the simulated client on its own -------------------------------------------------------------


def test_the_sim_client_speaks_to_real_nodes_and_fails_as_a_socket_would() -> None:
    loop, cluster = boot_cluster(4)
    out: dict[str, object] = {}

    async def main() -> None:
        await cluster.boot(60, provision=random.Random(4))
        process = Process("client")
        kv = SimClient(cluster, "t", process, SimClock(loop), random.Random(4),
                       keyspace=TXN_KEYSPACE, timeout_s=1.0)

        async def retried(make: Callable[[], Awaitable[T]]) -> T:
            for _ in range(100):  # bounded: the ranges elect leaders after the boot
                try:
                    return await make()
                except RingKVError:
                    await asyncio.sleep(0.2)
            raise AssertionError("no answer in 100 tries")

        async def work() -> None:
            await retried(lambda: kv.put("k", {"v": 1}))
            got = await retried(lambda: kv.get_versioned("k"))
            out["value"] = None if got is None else got.value
            lease = await retried(lambda: kv.lease(5))
            out["remaining_ms"] = await retried(lease.keepalive)
            out["revoked"] = await retried(lease.revoke)
            machine = cluster.machines[0]
            url = f"http://{machine.config.cluster.client_address}/v1/health"
            machine.crash()
            out["killed"] = await kv._send(Send("GET", url, None, {}, 1.0))
            await machine.start()
            cluster.network.cut({(client_machine("t"), machine.node_id)})
            out["cut"] = await kv._send(Send("GET", url, None, {}, 1.0))

        await loop.create_task(work(), context=process.context)

    try:
        loop.run_until_complete(main())
    finally:
        cluster.stop_all()
        loop.dispose()
    assert out["value"] == {"v": 1}
    assert isinstance(out["remaining_ms"], int) and out["remaining_ms"] > 0
    assert out["revoked"] == []
    killed, cut = out["killed"], out["cut"]
    assert isinstance(killed, Failure) and killed.kind == "connect", killed
    assert isinstance(cut, Failure) and cut.kind == "connect", cut
