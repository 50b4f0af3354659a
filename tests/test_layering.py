"""The dependency rule of ARCHITECTURE.md, enforced by reading imports.

Every module is a pure core unless it is listed in ``SHELL`` below. A pure
module imports no asyncio, aiohttp, plyvel, socket, threading, time or other
I/O module, draws no unseeded randomness, and reaches no shell module through
its imports either: the check follows ringkv imports transitively, package
``__init__`` files included (importing ``ringkv.net.codec`` runs
``ringkv/net/__init__.py`` first). Imports under ``if TYPE_CHECKING:`` are
for type checkers only and do not count, nor do a package's lazy exports
(a module-level ``__getattr__``, PEP 562), which run only when used.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ringkv"
FORBIDDEN_IN_PURE = frozenset({
    "asyncio", "aiohttp", "plyvel", "socket", "time", "threading", "uvloop", "subprocess",
    "signal", "selectors", "select", "http", "urllib3", "concurrent", "multiprocessing",
})

# The shell: modules that do I/O, hold tasks, or read the real clock. Keep it
# short; a new module is pure unless there is a reason to list it here.
SHELL = frozenset({
    "clock.py",  # the one sanctioned reader of real time
    "node.py",  # the composition root
    "cli.py",
    "identity.py",  # files in the data directory
    "metrics.py",  # prometheus_client holds locks and threads
    "coordinator/driver.py",
    "coordinator/__init__.py",  # re-exports the driver
    "replica/client.py", "replica/local.py", "replica/router.py", "replica/internode.py",
    "repair/hints.py", "repair/handoff.py", "repair/history.py", "repair/service.py",
    "gossip/service.py",
    "topology/streamer.py",  # pages scans from peers into the store, paced on the clock
    "net/rpc.py", "net/sockets.py", "net/transport.py", "net/tls.py",
    "storage/store.py", "storage/leveldb.py",
    "storage/snapshot.py",  # copies a node's data in a worker thread; restore before start
    "snapshot_cli.py",  # `ringkv snapshot`
    "txn/mvcc.py",  # runs engine calls off the loop (LevelDB fsyncs)
    "txn/paxos_log.py",  # fsyncs a group's Paxos records through the engine
    "txn/group.py",  # runs one group: timers, a drain task, fsyncs off the loop
    "txn/service.py",  # the tier on a node: groups, clock pings, forwarding, commit wait
    "txn/twopc_group.py",  # 2PC at a group's leader: lock waits, proposals, commit-wait timers
    "txn/twopc_records.py",  # a group's 2PC records in the engine
    "txn/cross_range.py",  # a transaction across ranges: its operations at each leader
    "txn/sessions.py",  # interactive transactions: open sessions, their operations and expiry
    "txn/lease_service.py",  # session leases: their transactions, and the sweeper's task
    "server/*",
    "auth/store.py", "auth/service.py", "auth/http.py",  # the user store, checks, routes
    "auth/admin_cli.py",  # `ringkv user`
    "data_cli.py",  # `ringkv get|put|del|scan|txn`: the client, stdin, the environment
    "client/base.py", "client/blocking.py", "client/aio.py",
    "client/recipes.py", "client/recipes_aio.py",  # the recipes' waits: watches, leases, the clock
    "tools/*", "chaos/*",
    # The simulator is a shell around virtual time; its histories and checkers are pure.
    "sim/*",
})
PURE_IN_SHELL_PACKAGES = frozenset({
    "sim/__init__.py", "sim/history.py", "sim/checkers.py", "sim/linearizability.py",
    "sim/snapshot_reads.py", "sim/list_append.py", "sim/bank.py", "sim/jepsen_history.py",
    "sim/watch_stream.py", "sim/lock_history.py", "sim/lock_fence.py",
    "server/__init__.py", "server/validation.py", "server/txn_validation.py",
    # The dashboard's history decides rates and percentiles; its sampler and routes are shell.
    "server/dashboard/__init__.py", "server/dashboard/history.py",
})


def relative(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def is_shell(name: str) -> bool:
    if name in PURE_IN_SHELL_PACKAGES:
        return False
    return name in SHELL or any(
        pattern.endswith("/*") and name.startswith(pattern[:-1]) for pattern in SHELL
    )


ALL_MODULES = sorted(relative(path) for path in PACKAGE.rglob("*.py"))
PURE_MODULES = [name for name in ALL_MODULES if not is_shell(name)]


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports that do not run when the module is imported:
    those under ``if TYPE_CHECKING:``, and a package's lazy exports (a
    module-level ``__getattr__``, PEP 562), which run only when that name is used."""
    lines: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            lines.update(inner.lineno for inner in ast.walk(node) if hasattr(inner, "lineno"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
            (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
            or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
        ):
            for child in node.body:
                for inner in ast.walk(child):
                    if hasattr(inner, "lineno"):
                        lines.add(inner.lineno)
    return lines


@cache
def imports_of(name: str) -> tuple[frozenset[str], frozenset[str]]:
    """(top-level modules imported, ringkv modules imported as paths) by ``name``."""
    path = PACKAGE / name
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_only(tree)
    top: set[str] = set()
    ours: set[str] = set()
    package_parts = name.split("/")[:-1]
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        dotted: list[str] = []
        if isinstance(node, ast.Import):
            dotted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                module = ".".join(["ringkv", *base] + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            dotted = [module] + [f"{module}.{alias.name}" for alias in node.names]
        for item in dotted:
            top.add(item.split(".")[0])
            if item.startswith("ringkv"):
                ours.update(_module_paths(item))
    return frozenset(top), frozenset(ours)


def _module_paths(dotted: str) -> list[str]:
    """The files that importing ``dotted`` runs: each package's __init__ on the way."""
    parts = dotted.split(".")[1:]
    found = ["__init__.py"] if (PACKAGE / "__init__.py").exists() else []
    for depth in range(1, len(parts) + 1):
        stem = "/".join(parts[:depth])
        if (PACKAGE / stem / "__init__.py").exists():
            found.append(f"{stem}/__init__.py")
        elif (PACKAGE / f"{stem}.py").exists():
            found.append(f"{stem}.py")
            break
        else:
            break  # a name imported from a module, not a module
    return found


def reachable(name: str) -> dict[str, str]:
    """Every ringkv module ``name`` reaches through imports, with one path to it."""
    seen: dict[str, str] = {}
    stack = [(name, name)]
    while stack:
        current, route = stack.pop()
        for nxt in imports_of(current)[1]:
            if nxt not in seen and nxt != name:
                seen[nxt] = f"{route} -> {nxt}"
                stack.append((nxt, seen[nxt]))
    return seen


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_cores_import_no_io(module: str) -> None:
    bad = imports_of(module)[0] & FORBIDDEN_IN_PURE
    assert not bad, f"{module} imports {sorted(bad)}; list it in SHELL or move the I/O out"


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_cores_reach_no_shell_module(module: str) -> None:
    shells = {target: route for target, route in reachable(module).items() if is_shell(target)}
    assert not shells, f"{module} reaches shell modules: {sorted(shells.values())}"


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


def test_the_shell_list_names_only_modules_that_exist() -> None:
    """A stale entry would silently exempt whatever later takes its name."""
    for entry in SHELL | PURE_IN_SHELL_PACKAGES:
        if entry.endswith("/*"):
            assert (PACKAGE / entry[:-2]).is_dir(), entry
        else:
            assert (PACKAGE / entry).is_file(), entry


def test_the_checker_catches_a_planted_violation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pure module that reaches asyncio through another module is caught."""
    planted = tmp_path / "ringkv"
    (planted / "sub").mkdir(parents=True)
    (planted / "__init__.py").write_text("")
    (planted / "sub" / "__init__.py").write_text("from ringkv.sub.io import x\n")
    (planted / "sub" / "io.py").write_text("import asyncio\nx = 1\n")
    (planted / "core.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import socket\n"
        "from ringkv.sub.codec import y\n"
    )
    (planted / "sub" / "codec.py").write_text("y = 2\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", planted)
    imports_of.cache_clear()
    try:
        assert "socket" not in imports_of("core.py")[0]  # type-only: ignored
        routes = reachable("core.py")
        assert "sub/io.py" in routes  # through the package __init__
        assert "asyncio" in imports_of("sub/io.py")[0]
    finally:
        imports_of.cache_clear()


def test_only_the_leveldb_engine_imports_plyvel() -> None:
    offenders = [
        name for name in ALL_MODULES
        if "plyvel" in imports_of(name)[0] and name != "storage/leveldb.py"
    ]
    assert offenders == []


def test_only_system_clock_reads_time() -> None:
    """One sanctioned clock: no other module imports ``time``."""
    offenders = [
        name for name in ALL_MODULES if "time" in imports_of(name)[0] and name != "clock.py"
    ]
    assert offenders == []


def test_timers_and_sleeps_go_through_the_clock() -> None:
    """Waiting is reading time too: no module outside the clock and the simulator's
    own loop arms a loop timer or sleeps on the loop directly."""
    allowed = {"clock.py", "sim/loop.py", "sim/clock.py"}
    # The simulator's harness (clients, nemeses, the run itself) lives on the
    # world's virtual time, not on any node's skewed clock.
    allowed |= {"sim/run.py", "sim/workload.py", "sim/cluster.py", "sim/nemesis.py",
                "sim/txn_client.py", "sim/bank_workload.py", "sim/list_append_workload.py",
                "sim/coordination.py", "sim/sim_client.py", "sim/locks.py"}
    offenders = []
    for name in ALL_MODULES:
        if name in allowed or name.startswith(("chaos/", "tools/", "client")):
            continue  # test and operator tools, and clients, run on the real loop
        text = (PACKAGE / name).read_text()
        for needle in ("asyncio.sleep(", ".call_later(", ".call_at("):
            if needle in text.replace("self._clock.call_later(", "").replace(
                "clock.call_later(", ""
            ):
                offenders.append(f"{name}: {needle}")
    assert offenders == []


def test_the_architecture_map_names_every_module() -> None:
    """ARCHITECTURE.md is kept true: a module added or moved is named there too."""
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    missing = [
        name for name in ALL_MODULES
        if not name.endswith("__init__.py") and f"`{name}`" not in text and name not in text
    ]
    assert missing == [], f"ARCHITECTURE.md does not name {missing}"
