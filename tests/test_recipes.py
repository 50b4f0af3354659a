"""The coordination recipes (``client/recipes.py``) on three real node processes.

The cluster is ``tests/test_leases.py``'s (keyspace ``ls``: transactional, RF 3,
three ranges; sweep 100 ms). Every recipe is checked by killing the process
that holds, leads or belongs (SIGKILL of a child python process):

- lock: a contender acquires within TTL + ε + sweep after the holder's kill,
  with a larger fencing token; child processes contending in a loop (one of
  them killed midway) never hold at once, judged by the fenced writes the
  guarded resource accepted: by commit order, tokens never go down and each
  holder's enter/exit pair is never interleaved with another's; a SIGSTOPped
  holder resumed after its lease expired cannot write;
- election: the leader's kill makes the waiting candidate leader, seen by
  ``observe()``;
- group: a member's kill drops it from ``members()`` and the members watch;
- configuration: every change is seen, in order, after the current value;
- the asyncio client's recipes: a killed holder's lock passes to an ``AsyncLock``,
  an election hands over on resign, a group watch sees a join and a leave;
- sessions (both clients): locks on one session share its lease; a release
  deletes the key and leaves the lease alive; the lease revoked, every lock
  on it is lost; the client's own session is reused, and replaced once lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
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

from ringkv.client import Client
from ringkv.client.recipes import FencingRejected, LockLost
from ringkv.sim import lock_fence
from ringkv.tools.local_cluster import LocalCluster
from tests.procs import wait_until
from tests.test_leases import KS, ROOT, SWEEP_MS
from tests.test_leases import cluster as cluster  # noqa: F401  (the module's 3-node cluster)

pytestmark = pytest.mark.cluster

TTL_S = 2
# The holder's last keepalive was at most TTL/3 before the kill; then the sweep and
# one transaction deleting its key; then the waiter's watch (50 ms polls) and a read.
HANDOVER_BOUND_S = TTL_S + SWEEP_MS / 1000 + 1.5

CHILD = textwrap.dedent("""
    import json, os, sys, time
    from ringkv.client import Client
    from ringkv.client.recipes import FencingRejected, LockLost
    urls, mode, name, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

    def record(doc):
        with open(out, "a") as f:
            f.write(json.dumps(doc) + "\\n")
            f.flush()

    with Client(urls, keyspace="ls", protocol="http", timeout_s=3) as kv:
        if mode == "hold":  # take the lock, say so, then write when told to
            with kv.lock("held", keyspace="ls", ttl_s=2) as held:
                record({"ready": True, "token": held.fencing_token, "key": held.key})
                for _ in range(600):
                    if os.path.exists(out + ".go"):
                        break
                    time.sleep(0.05)
                try:
                    v = held.fenced_put("held-res", {"holder": name})
                    record({"wrote": v})
                except (LockLost, FencingRejected) as exc:
                    record({"refused": type(exc).__name__})
        elif mode == "contend":  # take the lock again and again until the deadline
            until = time.monotonic() + float(sys.argv[5])
            while time.monotonic() < until:
                with kv.lock("mx", keyspace="ls", ttl_s=2, timeout_s=20) as held:
                    t = held.fencing_token
                    for event in ("enter", "exit"):
                        try:
                            v = held.fenced_put("mx-res", {"holder": name, "event": event})
                        except (LockLost, FencingRejected) as exc:
                            record({"token": t, "event": event, "refused": type(exc).__name__})
                            break
                        record({"v": v, "token": t, "holder": name, "event": event})
                        time.sleep(0.03)
        elif mode == "lead":
            election = kv.election("el", keyspace="ls", ttl_s=2)
            election.campaign(name, timeout_s=30)
            record({"ready": True})
            time.sleep(60)
        elif mode == "member":
            with kv.group("gr", keyspace="ls", ttl_s=2) as group:
                group.join(name, {"addr": name})
                record({"ready": True})
                time.sleep(60)
""")


class Children:
    """Child python processes running ``CHILD``; every one is killed at the end."""

    def __init__(self, cluster: LocalCluster, tmp: Path) -> None:
        self.urls = [p.url for p in cluster.procs]
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, mode: str, name: str, *extra: str) -> Path:
        out = self.tmp / f"{name}.jsonl"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(self.urls), mode, name, str(out), *extra],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return out

    def lines(self, name: str) -> list[dict[str, Any]]:
        out = self.tmp / f"{name}.jsonl"
        if not out.exists():
            return []
        return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]

    def ready(self, name: str, timeout_s: float = 20) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited: {proc.stderr.read().decode()[-2000:]}"
                                     if proc.stderr else name)
            return next((d for d in self.lines(name) if d.get("ready")), None)
        found: dict[str, Any] = wait_until(check, timeout_s=timeout_s, interval_s=0.05,
                                           what=f"{name} to be ready")
        return found

    def kill(self, name: str) -> float:
        self.procs[name].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        self.procs[name].wait(timeout=10)
        return killed

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait(timeout=10)
            if proc.stderr:
                proc.stderr.close()


@pytest.fixture
def children(cluster: LocalCluster, tmp_path: Path) -> Iterator[Children]:  # noqa: F811
    kids = Children(cluster, tmp_path)
    try:
        yield kids
    finally:
        kids.close()


@pytest.fixture
def kv(cluster: LocalCluster) -> Iterator[Client]:  # noqa: F811
    with Client([p.url for p in cluster.procs], keyspace=KS, protocol="http",
                timeout_s=3) as client:
        yield client


def test_a_killed_holders_lock_passes_on_within_the_ttl(children: Children, kv: Client) -> None:
    children.start("hold", "victim")
    first = children.ready("victim")
    waiter = kv.lock("held", keyspace=KS, ttl_s=TTL_S)
    assert not waiter.acquire(timeout_s=1.5)  # held by the live child
    acquired: list[float] = []
    thread = threading.Thread(target=lambda: acquired.append(
        time.monotonic() if waiter.acquire(timeout_s=15) else -1.0), daemon=True)
    thread.start()
    time.sleep(1.0)  # the waiter is queued, watching the child's key
    assert not acquired
    killed = children.kill("victim")
    thread.join(timeout=20)
    try:
        assert acquired and acquired[0] > 0, "the lock never passed on"
        handover_s = acquired[0] - killed
        print(f"\nlock passed on {handover_s:.2f} s after the holder's SIGKILL "
              f"(TTL {TTL_S} s, sweep {SWEEP_MS} ms)")
        assert handover_s < HANDOVER_BOUND_S
        assert waiter.fencing_token > first["token"]
        waiter.check()
        waiter.fenced_put("held-res", {"holder": "main"})
    finally:
        waiter.release()
    with pytest.raises(LockLost):
        waiter.check()


def check_fenced_history(writes: list[dict[str, Any]]) -> None:
    """The fenced writes a resource accepted, judged by ``sim/lock_fence.py`` (its
    planted bad histories are in ``tests/test_lock_fence.py``)."""
    problems = lock_fence.check_fenced_history(writes)
    assert not problems, "\n".join(problems[:8])


def test_contenders_in_a_loop_never_hold_at_once_even_when_one_is_killed(
        children: Children) -> None:
    names = ["c0", "c1", "c2"]
    for name in names:
        children.start("contend", name, "7")
    wait_until(lambda: any(children.lines(n) for n in names), timeout_s=15, interval_s=0.1,
               what="a first fenced write")
    time.sleep(2.0)
    children.kill("c1")  # wherever it is: holding, waiting or queuing
    for name in ("c0", "c2"):
        children.procs[name].wait(timeout=40)
        assert children.procs[name].returncode == 0, children.procs[name].stderr
    lines = [d for n in names for d in children.lines(n)]
    accepted = [d for d in lines if "v" in d]
    refused = [d for d in lines if "refused" in d]
    print(f"\n{len({d['token'] for d in accepted})} holders, {len(accepted)} fenced writes "
          f"accepted, {len(refused)} refused")
    assert len({d["token"] for d in accepted}) >= 6  # they took turns
    assert {d["holder"] for d in accepted} >= {"c0", "c2"}
    check_fenced_history(accepted)
    # After the kill the survivors went on: some holder came after c1's last one.
    c1 = [d["token"] for d in accepted if d["holder"] == "c1"]
    assert max(d["token"] for d in accepted) > max(c1, default=0)


def test_a_paused_holder_resumed_after_its_lease_expired_cannot_write(
        children: Children, kv: Client) -> None:
    out = children.start("hold", "sleeper")
    first = children.ready("sleeper")
    children.procs["sleeper"].send_signal(signal.SIGSTOP)
    try:
        with kv.lock("held", keyspace=KS, ttl_s=TTL_S, timeout_s=15) as held:
            assert held.fencing_token > first["token"]
            # The new holder has not written yet, so the resource's highest token is
            # still below the sleeper's: only the lost lease can refuse its write.
            Path(str(out) + ".go").touch()
            children.procs["sleeper"].send_signal(signal.SIGCONT)  # it writes at once
            result = wait_until(lambda: next((d for d in children.lines("sleeper")
                                              if "wrote" in d or "refused" in d), None),
                                timeout_s=15, interval_s=0.05, what="the sleeper's write")
            assert result.get("refused") == "LockLost", \
                f"a paused holder wrote after losing the lock: {result}"
            held.fenced_put("held-res", {"holder": "main"})
            assert kv.get("held-res", keyspace=KS) == {"holder": "main"}
    finally:
        children.procs["sleeper"].send_signal(signal.SIGCONT)


def test_a_fenced_write_with_an_older_token_is_refused(kv: Client) -> None:
    """The guarded resource on its own: an older holder that is still live (a planted
    stale token) cannot overwrite what a newer one wrote."""
    with kv.lock("fence-only", keyspace=KS, ttl_s=TTL_S) as held:
        held.fenced_put("fo-res", 1)
        token = held.fencing_token
        held._token = token - 1  # planted: a token below the one accepted
        with pytest.raises(FencingRejected) as caught:
            held.fenced_put("fo-res", 2)
        assert caught.value.highest == token
        held._token = token
    assert kv.get("fo-res", keyspace=KS) == 1


def test_a_killed_leader_is_replaced_and_observers_see_it(children: Children,
                                                          kv: Client) -> None:
    children.start("lead", "l1")
    children.ready("l1")
    children.start("lead", "l2")
    election = kv.election("el", keyspace=KS, ttl_s=TTL_S)
    assert election.leader() == "l1"
    seen: list[tuple[float, Any]] = []

    def observe() -> None:
        for value in election.observe(timeout_s=15):
            seen.append((time.monotonic(), value))
            if value == "l2":
                return

    thread = threading.Thread(target=observe, daemon=True)
    thread.start()
    wait_until(lambda: seen, timeout_s=10, interval_s=0.05, what="the first leader observed")
    time.sleep(1.0)  # l2 is campaigning behind l1
    killed = children.kill("l1")
    thread.join(timeout=20)
    children.ready("l2", timeout_s=5)  # l2 knows it leads
    values = [v for _, v in seen]
    assert values[0] == "l1" and values[-1] == "l2", values
    took_s = seen[-1][0] - killed
    print(f"\nnew leader observed {took_s:.2f} s after the leader's SIGKILL")
    assert took_s < HANDOVER_BOUND_S
    assert election.leader() == "l2"


def test_a_killed_member_leaves_the_group(children: Children, kv: Client) -> None:
    with kv.group("gr", keyspace=KS, ttl_s=TTL_S) as group:
        group.join("main", {"addr": "main"})
        children.start("member", "w1")
        children.ready("w1")
        assert group.members() == {"main": {"addr": "main"}, "w1": {"addr": "w1"}}
        seen: list[tuple[float, set[str]]] = []

        def watch() -> None:
            for members in group.watch_members(timeout_s=15):
                seen.append((time.monotonic(), set(members)))
                if set(members) == {"main"}:
                    return

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        wait_until(lambda: seen, timeout_s=10, interval_s=0.05, what="the first membership")
        killed = children.kill("w1")
        thread.join(timeout=20)
        assert [m for _, m in seen] == [{"main", "w1"}, {"main"}], seen
        took_s = seen[-1][0] - killed
        print(f"\nmember dropped {took_s:.2f} s after its SIGKILL")
        assert took_s < HANDOVER_BOUND_S
        assert group.members() == {"main": {"addr": "main"}}
        group.leave("main")
        assert group.members() == {}


def test_a_config_watch_sees_the_current_value_then_every_change_in_order(kv: Client) -> None:
    kv.put("cfg", {"n": 0}, keyspace=KS)
    seen: list[Any] = []
    started = threading.Event()

    def watch() -> None:
        for value in kv.watch_config("cfg", keyspace=KS, timeout_s=15):
            seen.append(value)
            started.set()
            if value == {"n": 5}:
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert started.wait(10)
    for n in range(1, 6):  # written right after the first read: no gap allowed
        kv.put("cfg", {"n": n}, keyspace=KS)
    thread.join(timeout=20)
    assert seen == [{"n": n} for n in range(6)]


@pytest.mark.soak
def test_soak_contenders_killed_and_replaced_never_hold_at_once(children: Children) -> None:
    """Four contenders for 40 s; every 4 s one of them is SIGKILLed (holding, waiting or
    queuing, wherever it is) and a fresh one takes its place."""
    run_s = 40.0
    started = time.monotonic()
    alive = [f"s{i}" for i in range(4)]
    for name in alive:
        children.start("contend", name, str(run_s))
    spawned = len(alive)
    kills = 0
    while time.monotonic() - started < run_s - 6:
        time.sleep(4.0)
        victim = alive.pop(kills % len(alive))
        children.kill(victim)
        kills += 1
        name = f"s{spawned}"
        spawned += 1
        children.start("contend", name, str(run_s - (time.monotonic() - started)))
        alive.append(name)
    for name in alive:
        children.procs[name].wait(timeout=60)
        assert children.procs[name].returncode == 0
    accepted = [d for n in children.procs for d in children.lines(n) if "v" in d]
    tokens = {d["token"] for d in accepted}
    print(f"\n{kills} contenders killed; {len(tokens)} holders, {len(accepted)} fenced writes")
    assert len(tokens) >= 40
    check_fenced_history(accepted)


def test_the_async_recipes_a_killed_holder_and_a_group_election_and_config(
        children: Children, cluster: LocalCluster) -> None:  # noqa: F811
    from ringkv.client import AsyncClient

    children.start("hold", "avictim")
    first = children.ready("avictim")

    async def run() -> None:
        async with AsyncClient([p.url for p in cluster.procs], keyspace=KS, protocol="http",
                               timeout_s=3) as kv:
            waiter = kv.lock("held", keyspace=KS, ttl_s=TTL_S)
            assert not await waiter.acquire(timeout_s=1.0)
            task = asyncio.get_running_loop().create_task(waiter.acquire(timeout_s=15))
            await asyncio.sleep(1.0)
            killed = children.kill("avictim")
            assert await asyncio.wait_for(task, 20)
            handover_s = time.monotonic() - killed
            assert handover_s < HANDOVER_BOUND_S, handover_s
            assert waiter.fencing_token > first["token"]
            await waiter.fenced_put("held-res", {"holder": "async"})
            await waiter.release()
            with pytest.raises(LockLost):
                await waiter.check()
            # Election: two candidates, the second takes over when the first resigns.
            one, two = kv.election("ael", keyspace=KS), kv.election("ael", keyspace=KS)
            await one.campaign("one", timeout_s=10)
            seen: list[Any] = []

            async def observe() -> None:
                async for value in one.observe(timeout_s=15):
                    seen.append(value)
                    if value == "two":
                        return
            watcher = asyncio.get_running_loop().create_task(observe())
            second = asyncio.get_running_loop().create_task(two.campaign("two", timeout_s=15))
            await asyncio.sleep(0.5)
            assert await two.leader() == "one" and not second.done()
            await one.resign()
            await asyncio.wait_for(second, 15)
            await asyncio.wait_for(watcher, 15)
            assert seen[0] == "one" and seen[-1] == "two" and two.is_leader
            await two.resign()
            # Group: a member joins and leaves; the watch sees each membership.
            async with kv.group("agr", keyspace=KS, ttl_s=TTL_S) as group:
                await group.join("a", 1)
                memberships: list[set[str]] = []

                async def watch() -> None:
                    async for members in group.watch_members(timeout_s=15):
                        memberships.append(set(members))
                        if members == {"a": 1} and len(memberships) > 1:
                            return
                watching = asyncio.get_running_loop().create_task(watch())
                await asyncio.sleep(0.3)
                await group.join("b", 2)
                assert await group.members() == {"a": 1, "b": 2}
                for _ in range(100):  # the watch shows snapshots: let it see b before b leaves
                    if {"a", "b"} in memberships:
                        break
                    await asyncio.sleep(0.05)
                await group.leave("b")
                await asyncio.wait_for(watching, 15)
                assert memberships == [{"a"}, {"a", "b"}, {"a"}], memberships
            # Configuration.
            await kv.put("acfg", 0, keyspace=KS)
            values: list[Any] = []
            configs = kv.watch_config("acfg", keyspace=KS, timeout_s=15)
            values.append(await configs.__anext__())
            for n in range(1, 4):
                await kv.put("acfg", n, keyspace=KS)
            async for value in configs:
                values.append(value)
                if value == 3:
                    break
            await configs.aclose()
            assert values == [0, 1, 2, 3]

    asyncio.run(run())


def test_a_session_shares_one_lease_between_locks_and_outlives_their_releases(
        kv: Client) -> None:
    """Two locks on one session (two names, and the same name twice: their own keys),
    released without revoking it; then the lease is revoked: both locks are lost."""
    with kv.session(ttl_s=TTL_S, keyspace=KS) as session:
        one, two = session.lock("s-one"), session.lock("s-two")
        assert one.acquire(timeout_s=5) and two.acquire(timeout_s=5)
        assert one.key == f"s-one/{session.id}" and two.key == f"s-two/{session.id}"
        assert sorted(session.lease.info()["keys"]) == sorted([one.key, two.key])
        again = session.lock("s-one")  # the same session, the same name: it waits its turn
        assert not again.acquire(timeout_s=0.5)
        first_token = one.fencing_token
        one.release()
        assert kv.get(f"s-one/{session.id}", keyspace=KS) is None  # the key went ...
        assert not session.lost and session.lease.keepalive() > 0  # ... not the lease
        assert again.acquire(timeout_s=5) and again.fencing_token > first_token
        again.release()
        with session.lock("s-one") as held:  # the session's key again, a larger token
            assert held.key == f"s-one/{session.id}" and held.fencing_token > first_token
            held.fenced_put("s-res", 1)
        # The lease revoked behind the session's back: every lock on it is lost.
        assert one.acquire(timeout_s=5)
        assert sorted(session.lease.revoke()) == sorted([one.key, two.key])
        for lock in (one, two):
            with pytest.raises(LockLost):
                lock.check()
        with pytest.raises(LockLost):
            one.fenced_put("s-res", 2)
        wait_until(lambda: one.lost and two.lost, timeout_s=TTL_S * 2, interval_s=0.05,
                   what="both locks to know their session's lease is gone")
        with pytest.raises(LockLost):
            session.lock("s-three").acquire(timeout_s=1)  # a lost session takes no more
    assert kv.get("s-res", keyspace=KS) == 1


def test_a_join_answered_as_a_replay_without_reads_does_not_take_a_held_lock(
        cluster: LocalCluster, kv: Client) -> None:  # noqa: F811
    """A join whose first answer was lost, retried under its id, is answered from the
    outcome alone: the commit, no reads (the cross-range path says so only in its
    receipt). Its contender must read who is live ahead, not judge them all dead."""
    with Client([p.url for p in cluster.procs], keyspace=KS, protocol="http",
                timeout_s=3) as other:
        real_txn = other.txn

        def replayed(keyspace: str | None = None, **request: Any) -> Any:
            result = real_txn(keyspace, **request)
            if not any(w.get("lease") for w in request.get("writes", ())):
                return result
            # What the cross-range path answers a retry whose first attempt committed.
            return dataclasses.replace(result, reads={}, replayed=False,
                                       receipt={"txn_id": result.id, "replayed": True})

        other.txn = replayed  # type: ignore[method-assign]
        holder = kv.lock("replayed", keyspace=KS, ttl_s=TTL_S)
        assert holder.acquire(timeout_s=5)
        first_token = holder.fencing_token
        try:
            waiter = other.lock("replayed", keyspace=KS, ttl_s=TTL_S)
            assert not waiter.acquire(timeout_s=1.0)  # the holder is alive ahead of it
            holder.check()
        finally:
            holder.release()
        assert waiter.acquire(timeout_s=5)  # now nobody is ahead
        try:
            assert waiter.fencing_token > first_token
            waiter.check()
        finally:
            waiter.release()


def test_the_clients_own_session_is_reused_and_replaced_once_lost(kv: Client) -> None:
    with kv.lock("own", keyspace=KS, ttl_s=TTL_S) as held:
        first_key = held.key
    with kv.lock("own", keyspace=KS, ttl_s=TTL_S) as held:
        assert held.key == first_key  # one lease for both acquisitions
        session = kv._recipe_sessions[(KS, TTL_S)]
        session.lease.revoke()
        wait_until(lambda: held.lost, timeout_s=TTL_S * 2, interval_s=0.05,
                   what="the lock to know its lease is gone")
    with kv.lock("own", keyspace=KS, ttl_s=TTL_S) as held:  # a new session, granted now
        assert held.key != first_key and not held.lost
        held.check()
        second_key = held.key
    # Revoked before a renewal could notice: the join is refused (lease_expired), and
    # the acquisition goes on with a new session.
    kv._recipe_sessions[(KS, TTL_S)].lease.revoke()
    with kv.lock("own", keyspace=KS, ttl_s=TTL_S) as held:
        assert held.key not in (first_key, second_key)
        held.check()


def test_an_async_session_shares_its_lease_and_loses_every_lock_with_it(
        cluster: LocalCluster) -> None:  # noqa: F811
    from ringkv.client import AsyncClient

    async def run() -> None:
        async with AsyncClient([p.url for p in cluster.procs], keyspace=KS, protocol="http",
                               timeout_s=3) as kv:
            async with kv.session(ttl_s=TTL_S, keyspace=KS) as session:
                one, two = session.lock("as-one"), session.lock("as-two")
                assert await one.acquire(timeout_s=5) and await two.acquire(timeout_s=5)
                assert one.key == f"as-one/{session.id}"
                token = one.fencing_token
                await one.release()  # the key goes, the lease stays
                assert await kv.get(f"as-one/{session.id}", keyspace=KS) is None
                assert session.lease is not None and await session.lease.keepalive() > 0
                assert await one.acquire(timeout_s=5) and one.fencing_token > token
                await session.lease.revoke()
                for lock in (one, two):
                    with pytest.raises(LockLost):
                        await lock.check()
                for _ in range(100):  # a renewal finds the lease gone within TTL/3
                    if one.lost and two.lost:
                        break
                    await asyncio.sleep(0.05)
                assert one.lost and two.lost and session.lost
            # The client's own session: kv.lock reuses it across acquisitions.
            async with kv.lock("as-own", keyspace=KS, ttl_s=TTL_S) as held:
                first = held.key
            async with kv.lock("as-own", keyspace=KS, ttl_s=TTL_S) as held:
                assert held.key == first

    asyncio.run(run())
