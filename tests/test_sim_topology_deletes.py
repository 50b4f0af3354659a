"""Deletes and topology changes in the simulator: the checkers treat a delete as
a write of "absent" (Dynamo §4.4's reconciliation, with tombstones), the
resurrection checker catches replicas that purge tombstones too early, and
``ringkv sim`` runs the join, decommission, removenode and wipe nemeses
(Dynamo §4.9: adding and removing storage nodes)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ringkv.sim import checkers
from ringkv.sim.history import DELETE, FAIL, INFO, OK, Op
from ringkv.sim.run import SimSettings, format_report, simulate

REPO = Path(__file__).resolve().parent.parent


def _op(index: int, kind: str, key: str, value: str | None, start: float, end: float | None,
        status: str = OK, final: bool = False) -> Op:
    return Op(index, "c0", kind, key, value, start, end, status, "n1", "QUORUM", None, final)


# -- checkers on hand-written histories ------------------------------------------------


def test_a_delete_is_a_write_of_absent_for_the_lost_and_stale_checkers() -> None:
    history = [
        _op(0, "write", "k", "a", 0.0, 1.0),
        _op(1, DELETE, "k", None, 2.0, 3.0),
    ]
    # After the delete was acknowledged, absent is the one right answer.
    fresh = [_op(2, "read", "k", None, 4.0, 4.1)]
    assert checkers.stale_reads(history + fresh, promised=True).ok
    assert checkers.lost_writes(history + [_op(2, "read", "k", None, 9, 10, final=True)]).ok
    # The deleted value, read after the delete was acknowledged: stale, and the delete lost.
    old = [_op(2, "read", "k", "a", 4.0, 4.1)]
    assert not checkers.stale_reads(history + old, promised=True).ok
    lost = checkers.lost_writes(history + [_op(2, "read", "k", "a", 9, 10, final=True)])
    assert not lost.ok and lost.count == 1 and "delete" in lost.excerpt[0]
    # A write acknowledged after the delete: absent is now stale, and lost at the end.
    rewritten = history + [_op(2, "write", "k", "b", 4.0, 5.0)]
    assert not checkers.stale_reads(rewritten + [_op(3, "read", "k", None, 6.0, 6.1)],
                                    promised=True).ok
    assert not checkers.lost_writes(rewritten + [_op(3, "read", "k", None, 9, 10,
                                                     final=True)]).ok
    # A delete of unknown outcome may take effect any time after it began: absent is fine.
    unknown = [_op(0, "write", "k", "a", 0.0, 1.0), _op(1, DELETE, "k", None, 2.0, None, INFO),
               _op(2, "write", "j", "x", 0.0, 1.0)]
    assert checkers.stale_reads(unknown + [_op(3, "read", "k", None, 4.0, 4.1)],
                                promised=True).ok
    # One refused outright (Unavailable) never happened: absent misses the write.
    refused = [_op(0, "write", "k", "a", 0.0, 1.0), _op(1, DELETE, "k", None, 2.0, 2.1, FAIL)]
    assert not checkers.stale_reads(refused + [_op(2, "read", "k", None, 4.0, 4.1)],
                                    promised=True).ok
    # A key only ever deleted must still be read back at the end.
    only_deleted = checkers.lost_writes([_op(0, DELETE, "k", None, 0.0, 1.0)])
    assert not only_deleted.ok and "no final read" in only_deleted.summary


def test_resurrection_checker() -> None:
    history = [
        _op(0, "write", "k", "a", 0.0, 1.0),
        _op(1, DELETE, "k", None, 2.0, 3.0),  # certainly after a
        _op(2, "write", "k", "b", 2.5, 3.5),  # concurrent with the delete: may win by LWW
    ]
    clean = history + [_op(3, "read", "k", "b", 4.0, 4.1), _op(4, "read", "k", None, 4.0, 4.1),
                       _op(5, "read", "k", "a", 2.5, 2.6)]  # began before the delete's ack
    verdict = checkers.resurrected_reads(clean, promised=True)
    assert verdict.ok and verdict.count == 0
    back = history + [_op(3, "read", "k", "a", 4.0, 4.1)]
    verdict = checkers.resurrected_reads(back, promised=True)
    assert not verdict.ok and verdict.count == 1
    assert [line.split()[5] for line in verdict.excerpt[:3]] == ["write", "delete", "read"]
    # Measured, not judged, where reads are not promised fresh (ONE/ONE) ...
    measured = checkers.resurrected_reads(back, promised=False)
    assert measured.ok and measured.count == 1
    # ... but a final read (ALL, after healing) that brings it back is judged.
    final = history + [_op(3, "read", "k", "a", 9.0, 9.1, final=True)]
    assert not checkers.resurrected_reads(final, promised=False).ok
    assert checkers.resurrected_reads(final, promised=False, final_promised=False).ok


# -- the planted bug -------------------------------------------------------------------

# Replicas that lose tombstones while another replica missed the delete: crashes
# and partitions make replicas miss writes, hints and read repair deliver them late.
RESURRECTION = SimSettings(seed=6, ops=300, keys=5, duration_s=15, boot="provisioned",
                           nemesis=("partition", "crash"), deletes=0.4)


def test_resurrection_checker_catches_replicas_that_purge_tombstones_at_once() -> None:
    healthy = simulate(RESURRECTION)
    assert healthy.ok, format_report(healthy)
    assert healthy.verdict("resurrected").count == 0
    deletes = sum(1 for op in healthy.history if op.kind == DELETE and op.status == OK)
    assert deletes >= 20
    broken = simulate(dataclasses.replace(RESURRECTION, fault="purge-tombstones-at-once"))
    caught = broken.verdict("resurrected")
    assert not caught.ok and caught.count > 0 and caught.excerpt, format_report(broken)
    assert f"replay with: {broken.settings.command()}" in format_report(broken)


# -- topology nemeses from the command line --------------------------------------------


def test_every_topology_nemesis_runs_from_the_command_line_and_replays() -> None:
    settings = SimSettings(seed=4, ops=300, duration_s=60, boot="provisioned",
                           nemesis=("join", "decommission", "removenode", "wipe"),
                           deletes=0.1, gc_grace_s=20)
    command = settings.command().split()
    assert "--deletes 0.1" in settings.command() and "--gc-grace 20" in settings.command()
    env = {**os.environ, "PYTHONHASHSEED": "777"}
    out = subprocess.run([sys.executable, "-m", "ringkv.cli", *command[1:]], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resurrected values: ok - 0 of" in out.stdout
    for done in ("join: n", "LEFT, stopped", "removed (LEFT)", "replace n"):
        assert done in out.stdout, out.stdout
    assert f"history hash: {simulate(settings).history_hash}" in out.stdout


@pytest.mark.parametrize("bad, message", [
    ({"workload": "register", "nemesis": ("join",)}, "eventual workload"),
    ({"deletes": 1.5}, "deletes"),
    ({"gc_grace_s": 1}, "gc_grace"),
])
def test_settings_refuse_what_the_topology_runs_cannot_do(bad: dict[str, object],
                                                          message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimSettings(seed=1, **bad)  # type: ignore[arg-type]
