"""Session leases, many owners killed (``make soak``): how soon their keys go.

Twelve rounds on the three-process cluster of ``tests/test_leases.py``: a
child takes a lease (TTL 2 s), attaches six keys across the ranges and keeps
it alive; it is SIGKILLed at a random point of its renewal cycle while
another writer keeps overwriting one of its keys without the lease (so the
expiry often finds a key changed under it and plans again). Every round,
the attached keys vanish together (every snapshot read sees all or none of
them) within TTL + 1 s of the kill, and the overwritten key survives. The
distribution of vanish times is printed.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ringkv.tools.local_cluster import LocalCluster
from tests.procs import http, wait_until
from tests.test_leases import CHILD, KS, ROOT, TTL_S, cluster, snapshot  # noqa: F401

pytestmark = [pytest.mark.cluster, pytest.mark.soak]
ROUNDS = 12


def overwrite(url: str, key: str, stop: threading.Event) -> None:
    """Write ``key`` without a lease every 50 ms until ``stop``."""
    written = 0
    while not stop.wait(0.05):  # bounded: stopped at the end of the round
        if http("PUT", f"{url}/v1/kv/{KS}/{key}", {"value": written})[0] == 200:
            written += 1


def test_killed_owners_keys_vanish_together_round_after_round(
        cluster: LocalCluster, tmp_path: Path) -> None:  # noqa: F811
    a, b, c = cluster.procs
    rng = random.Random(17)
    vanish_s: list[float] = []
    for round_no in range(ROUNDS):
        keys = [f"soak{round_no}/k{i}" for i in range(6)]
        contested = keys[-1]
        ready = tmp_path / f"ready{round_no}.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps([a.url, b.url]),
                                  json.dumps(keys), str(ready)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stop = threading.Event()
        writer = threading.Thread(target=overwrite, args=(c.url, contested, stop), daemon=True)
        try:
            wait_until(ready.exists, timeout_s=15, interval_s=0.05, what="the child's lease")
            writer.start()
            time.sleep(TTL_S + rng.uniform(0, TTL_S / 3))  # a random point of its renewals
            assert all(snapshot(a.url, keys[:-1]).values())
            child.kill()
            killed = time.monotonic()
            child.wait(timeout=10)
            cuts = []
            while time.monotonic() < killed + TTL_S + 3:
                cut = snapshot(b.url, keys[:-1])
                cuts.append(cut)
                if not any(cut.values()):
                    break
                time.sleep(0.02)
            vanish_s.append(time.monotonic() - killed)
            assert not any(cuts[-1].values()), f"round {round_no}: keys stayed"
            assert all(len(set(cut.values())) == 1 for cut in cuts), cuts
            assert vanish_s[-1] < TTL_S + 1.0, vanish_s
        finally:
            stop.set()
            if writer.is_alive():
                writer.join(timeout=5)
            if child.poll() is None:
                child.kill()
                child.wait(timeout=10)
        status, body = http("GET", f"{a.url}/v1/kv/{KS}/{contested}")
        assert status == 200 and isinstance(body["value"], int), body  # the overwrite survived
    print(f"\nvanish after SIGKILL over {ROUNDS} rounds (TTL {TTL_S} s): "
          f"min {min(vanish_s):.2f} s, median {statistics.median(vanish_s):.2f} s, "
          f"max {max(vanish_s):.2f} s")
