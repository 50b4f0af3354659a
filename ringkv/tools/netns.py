"""Test hosts on one machine: network namespaces on a bridge, each with its own address.

``NetnsHosts(5).up()`` builds five hosts. Each is a network namespace with
one interface (a veth pair whose other end sits on a bridge in the root
namespace) and its own address in a private /24 that nothing routes beyond
this machine: the namespaces have no default route, and the bridge has no
uplink. The bridge itself holds the subnet's first address, so a process in
the root namespace (a test, its clients) reaches every host, as an
operator's machine would. Nodes run inside with ``ip netns exec`` (see
``NodeProcess.wrapper``) and bind their host's address, not loopback.

Faults are real packet drops: iptables rules in the receiving host's INPUT
chain drop what arrives from the hosts it is cut off from, so both the
kernel's TCP and the nodes see what a broken network looks like (no RST, no
error, just silence). Only node-to-node traffic is dropped; the root
namespace's clients keep reaching every host, as Jepsen's clients do.

Every namespace and the bridge carry this process's PID in their names, so
``down`` removes exactly what ``up`` made, and ``sweep_stale`` removes what
a killed run left behind (its PID no longer alive). Needs root, iproute2's
``ip`` and ``iptables``.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Sequence

DEFAULT_RANGE = "10.213.0.0/16"  # private; each host set takes a free /24 of it
RANGE_ENV = "RINGKV_NETNS_RANGE"
PREFIX = "rkv"
COMMAND_TIMEOUT_S = 10.0
_NAME = re.compile(rf"^{PREFIX}(\d+)([a-z])")
_SEQUENCE = itertools.count()


class NetnsError(RuntimeError):
    """A host set could not be built (no root, no ``ip``, no free subnet) or changed."""


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(args)}: {exc}") from exc
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done


def missing_tools() -> list[str]:
    """What this machine lacks to build hosts (empty when it can)."""
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Remove namespaces and bridges left by runs whose process is gone; returns their names."""
    names = [line.split()[0] for line in _run("ip", "netns", "list").stdout.splitlines() if line]
    links = [line.split(":")[1].strip().split("@")[0]
             for line in _run("ip", "-o", "link", "show").stdout.splitlines()]
    removed = []
    for name in names + links:
        match = _NAME.match(name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        kind = ("netns", "del", name) if name in names else ("link", "del", name)
        if _run("ip", *kind, check=False).returncode == 0:
            removed.append(name)
    return removed


def _used_subnets() -> set[ipaddress.IPv4Network]:
    used = set()
    for line in _run("ip", "-o", "-4", "addr", "show").stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            used.add(ipaddress.IPv4Interface(fields[fields.index("inet") + 1]).network)
    return used


def free_subnet(address_range: str) -> ipaddress.IPv4Network:
    """A /24 of ``address_range`` that no interface on this machine uses."""
    network = ipaddress.IPv4Network(address_range)
    if not network.is_private:
        raise NetnsError(f"{RANGE_ENV}={address_range}: test hosts need a private range")
    used = _used_subnets()
    for subnet in network.subnets(new_prefix=24) if network.prefixlen <= 24 else [network]:
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise NetnsError(f"no free /24 left in {address_range} ({RANGE_ENV})")


class NetnsHosts:
    """``count`` hosts on one bridge; ``up`` builds them, ``down`` removes them."""

    def __init__(self, count: int, address_range: str | None = None) -> None:
        if not 1 <= count <= 200:
            raise ValueError(f"count must be 1..200, not {count}")
        self.count = count
        self.address_range = address_range or os.environ.get(RANGE_ENV, DEFAULT_RANGE)
        # e.g. rkv12345a: fits Linux's 15-character interface names with "h<i>" after it
        self.tag = f"{PREFIX}{os.getpid()}{chr(ord('a') + next(_SEQUENCE) % 26)}"
        self.bridge = f"{self.tag}b"
        self.namespaces = [f"{self.tag}n{i}" for i in range(count)]
        self.hosts: list[str] = []  # the hosts' addresses, in namespace order
        self.gateway = ""  # the bridge's address: where the root namespace's traffic comes from
        self._made: list[tuple[str, ...]] = []  # what to delete, newest last

    def __enter__(self) -> NetnsHosts:
        return self.up()

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    def up(self) -> NetnsHosts:
        missing = missing_tools()
        if missing:
            raise NetnsError(f"test hosts need {', '.join(missing)}")
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        subnet = free_subnet(self.address_range)
        addresses = [str(address) for address in itertools.islice(subnet.hosts(), self.count + 1)]
        self.gateway, self.hosts = addresses[0], addresses[1:]
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", "del", self.bridge))
        _run("ip", "addr", "add", f"{self.gateway}/{subnet.prefixlen}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i, (namespace, address) in enumerate(zip(self.namespaces, self.hosts)):
            _run("ip", "netns", "add", namespace)
            self._made.append(("netns", "del", namespace))  # takes its end of the veth with it
            outside = f"{self.tag}h{i}"
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0",
                 "netns", namespace)
            # Deleted before its namespace: the kernel frees a namespace's
            # interfaces some time after the namespace goes, so leftovers
            # would still show for a moment after ``down``.
            self._made.append(("link", "del", outside))
            _run("ip", "link", "set", outside, "master", self.bridge, "up")
            self.exec(i, "ip", "addr", "add", f"{address}/{subnet.prefixlen}", "dev", "eth0")
            self.exec(i, "ip", "link", "set", "eth0", "up")
            self.exec(i, "ip", "link", "set", "lo", "up")
            self.exec(i, "iptables", "-F", "INPUT")

    def down(self) -> None:
        """Remove everything ``up`` made, even after a failure; never raises for a leftover."""
        errors = []
        while self._made:
            what = self._made.pop()
            done = _run("ip", *what, check=False)
            if done.returncode != 0 and "Cannot find" not in done.stderr \
                    and "No such" not in done.stderr:
                errors.append(f"ip {' '.join(what)}: {done.stderr.strip()}")
        if errors:
            raise NetnsError("; ".join(errors))

    # -- running things inside --------------------------------------------------------

    def wrapper(self, host: int | str) -> list[str]:
        """The command prefix that runs a program on ``host`` (index or address)."""
        return ["ip", "netns", "exec", self.namespaces[self._index(host)]]

    def exec(self, host: int | str, *args: str) -> str:
        return _run(*self.wrapper(host), *args).stdout

    def _index(self, host: int | str) -> int:
        return host if isinstance(host, int) else self.hosts.index(host)

    # -- faults: real packet drops ---------------------------------------------------

    def drop(self, source: str, destination: str) -> None:
        """Packets from ``source`` to ``destination`` are lost (one way)."""
        self.exec(destination, "iptables", "-A", "INPUT", "-s", source, "-j", "DROP")

    def cut(self, a: str, b: str) -> None:
        self.drop(a, b)
        self.drop(b, a)

    def partition(self, *groups: Sequence[str]) -> None:
        """No packet crosses between groups. A host in no group keeps every link:
        ``partition([a, b], [d, e])`` with ``c`` left out is Jepsen's bridge."""
        for left, right in itertools.combinations(groups, 2):
            for a in left:
                for b in right:
                    self.cut(a, b)

    def isolate(self, host: str) -> None:
        self.partition([host], [h for h in self.hosts if h != host])

    def heal(self) -> None:
        for i in range(self.count):
            self.exec(i, "iptables", "-F", "INPUT")

    def rules(self, host: int | str) -> str:
        return self.exec(host, "iptables", "-S", "INPUT")
