"""The dependency rule from DESIGN.md, enforced by reading imports.

Pure cores import no asyncio, aiohttp, plyvel, socket or time; only
``clock.SystemClock`` reads the real time, and only ``storage.leveldb``
imports plyvel.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ringkv"
FORBIDDEN_IN_PURE = {"asyncio", "aiohttp", "plyvel", "socket", "time", "threading", "uvloop"}
PURE_MODULES = [
    "address.py",
    "limits.py",
    "ring.py",
    "versioning.py",
    "quorum.py",
    "replica_plan.py",
    "storage/keys.py",
    "storage/engine.py",
    "storage/memory.py",
    "gossip/state.py",
    "gossip/gossiper.py",
    "gossip/failure_detector.py",
    "net/codec.py",
]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_cores_import_no_io(module: str) -> None:
    path = PACKAGE / module
    bad = imported_modules(path) & FORBIDDEN_IN_PURE
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_cores_draw_no_unseeded_randomness(module: str) -> None:
    """Randomness comes from a random.Random passed in, so one seed replays a run."""
    tree = ast.parse((PACKAGE / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "random":
            raise AssertionError(f"{module} imports names from random; take a random.Random")
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "random"
            and node.attr != "Random"
        ):
            raise AssertionError(f"{module} calls random.{node.attr}; take a random.Random")


def test_only_the_leveldb_engine_imports_plyvel() -> None:
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "plyvel" in imported_modules(path) and path != PACKAGE / "storage" / "leveldb.py"
    ]
    assert offenders == []


def test_only_system_clock_reads_time() -> None:
    """One sanctioned clock: no other module imports ``time``."""
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "time" in imported_modules(path) and path != PACKAGE / "clock.py"
    ]
    assert offenders == []
