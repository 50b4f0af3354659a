"""A local cluster of node processes: `ringkv cluster up` and the demo.

Nodes run on loopback (``build``), or one per network-namespace host, each
binding its host's own address (``build_on_hosts``: `ringkv cluster up
--netns`, the Jepsen-style run across hosts, the rack and rolling-restart
tests). With ``racks``, node i sits in rack ``rack{i % racks + 1}`` (its own
config file says so), so rack-aware placement spreads each key's replicas.

Nodes start one at a time, each joining through the first node (the seed), so
every node allocates its tokens knowing the ring so far and ownership stays
balanced; or all at once (``up(together=True)``), which is faster and, since
joiners take turns, still balanced. The cluster is up when every node sees
every other node UP.
"""

from __future__ import annotations

import datetime
import json
import secrets
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ringkv.address import format_address
from ringkv.clock import SystemClock
from ringkv.tools.cluster_state import NodeRecord
from ringkv.tools.launcher import NodeProcess, free_port_block, http, wait_until

if TYPE_CHECKING:
    from ringkv.tools.netns import NetnsHosts

_CLOCK = SystemClock()
NO_STREAMING = "--no-auto-bootstrap"
# Every namespace host has its own address, so all nodes can use the same ports.
HOST_CLIENT_PORT = 7400
HOST_INTERNODE_PORT = 7500
HOST_NATIVE_PORT = 7600


def rack_of(index: int, racks: int) -> str:
    """The rack of the ``index``-th node (from 0) when ``racks`` racks share the nodes."""
    return f"rack{index % racks + 1}"


@dataclass
class LocalCluster:
    data_dir: Path
    nodes: int = 3
    rf: int = 3
    base_client_port: int = 7400
    base_internode_port: int = 7500
    # The native protocol's ports; None = a block of free ports.
    base_native_port: int | None = None
    host_prefix: str = "127.0.0.1"
    extra_args: list[str] = field(default_factory=list)
    config_overrides: dict[str, Any] = field(default_factory=dict)
    procs: list[NodeProcess] = field(default_factory=list)
    # TLS on both links: a CA and a certificate per node (and one for a client)
    # under data_dir/certs, each node's files in its own config (see ``tls_config``).
    tls: bool = False
    # The nodes outlive this process (`ringkv cluster up --detach`, see NodeProcess).
    detached: bool = False

    @property
    def certs_dir(self) -> Path:
        return self.data_dir / "certs"

    def tls_config(self, node_id: str, *, host: str | None = None,
                   base: Path | None = None) -> Path:
        """``node_id``'s config: the shared one (or ``base``) plus its certificate on
        both links, for ``host`` (default: ``host_prefix``), issued now unless an
        earlier run left one (a restart keeps its certificates)."""
        from ringkv.tools.certs import CA_CERT, init_ca, issue

        now = datetime.datetime.now(datetime.timezone.utc)
        certs = self.certs_dir
        if not (certs / CA_CERT).exists():
            init_ca(certs, now)
        if not (certs / "client.crt").exists():
            issue(certs, "client", now, client_only=True)
        if not (certs / f"{node_id}.crt").exists():
            issue(certs, node_id, now, hosts=(host or self.host_prefix, "localhost"))
        files = {"cert_file": str(certs / f"{node_id}.crt"),
                 "key_file": str(certs / f"{node_id}.key")}
        config = yaml.safe_load((base or self.config_file()).read_text())
        config["tls"] = {"client": dict(files),
                         "internode": {**files, "ca_file": str(certs / CA_CERT)}}
        path = self.data_dir / f"{node_id}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def config_file(self, rack: str | None = None) -> Path:
        """A config shared by every node; per-node fields come from flags. With
        ``rack``, the config of the nodes in that rack (there is no rack flag)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "keyspaces": {
                "default": {"replication_factor": self.rf, "tier": "eventual",
                            "default_consistency": "QUORUM"},
                "txn": {"replication_factor": self.rf, "tier": "transactional",
                        "default_consistency": "SERIAL"},
            },
        }
        for dotted, value in self.config_overrides.items():
            section, _, name = dotted.partition(".")
            config.setdefault(section, {})[name] = value
        if rack is not None:
            config.setdefault("cluster", {})["rack"] = rack
        path = self.data_dir / ("cluster.yaml" if rack is None else f"cluster-{rack}.yaml")
        path.write_text(yaml.safe_dump(config))
        return path

    def build(self) -> list[NodeProcess]:
        config = self.config_file()
        seed = format_address(self.host_prefix, self.base_internode_port)
        native = (self.base_native_port if self.base_native_port is not None
                  else free_port_block(self.nodes))
        self.procs = [
            NodeProcess(
                f"node{i + 1}",
                self.data_dir,
                host=self.host_prefix,
                client_port=self.base_client_port + i,
                internode_port=self.base_internode_port + i,
                native_port=native + i,
                extra_args=["--seeds", seed, *self.extra_args],
                config_path=self.tls_config(f"node{i + 1}") if self.tls else config,
                tls_dir=self.certs_dir if self.tls else None,
                detached=self.detached,
            )
            for i in range(self.nodes)
        ]
        return self.procs

    def build_on_hosts(self, hosts: NetnsHosts, *, racks: int = 0) -> list[NodeProcess]:
        """One node per namespace host, binding that host's address (the same
        ports on every host); the first host is the seed. ``racks`` > 0 puts
        node i in rack ``rack_of(i, racks)``."""
        if racks < 0 or racks > len(hosts.hosts):
            raise ValueError(f"racks must be 0..{len(hosts.hosts)}, not {racks}")
        self.nodes = len(hosts.hosts)
        seed = format_address(hosts.hosts[0], HOST_INTERNODE_PORT)
        configs = ([self.config_file(rack_of(i, racks)) for i in range(racks)] if racks
                   else [self.config_file()])
        self.procs = [
            NodeProcess(
                f"node{i + 1}",
                self.data_dir,
                host=host,
                client_port=HOST_CLIENT_PORT,
                internode_port=HOST_INTERNODE_PORT,
                native_port=HOST_NATIVE_PORT,
                extra_args=["--seeds", seed, *self.extra_args],
                config_path=(self.tls_config(f"node{i + 1}", host=host, base=configs[i % len(configs)])
                             if self.tls else configs[i % len(configs)]),
                tls_dir=self.certs_dir if self.tls else None,
                wrapper=hosts.wrapper(i),
            )
            for i, host in enumerate(hosts.hosts)
        ]
        return self.procs

    def up(self, timeout_s: float = 60.0, *, together: bool = False) -> None:
        """Form the cluster: start every node, one at a time (or ``together``).

        Nodes on fresh data directories form a new cluster that holds no
        data, so they join without streaming (``--no-auto-bootstrap``, as
        Cassandra forms a new cluster); a node that joins later streams.
        """
        if not self.procs:
            self.build()
        forming = [proc for proc in self.procs if not (self.data_dir / proc.node_id).exists()]
        for proc in forming:
            proc.extra_args.append(NO_STREAMING)
        try:
            if together:
                for proc in self.procs:
                    proc.launch()
                self.wait_all_up(None, timeout_s)
            else:
                for proc in self.procs:
                    proc.start()
                    # Wait for each node to join before starting the next one.
                    self.wait_all_up(self.procs[: self.procs.index(proc) + 1], timeout_s)
        except BaseException:
            self.down()
            raise
        finally:
            for proc in forming:
                proc.extra_args.remove(NO_STREAMING)

    def wait_all_up(self, procs: list[NodeProcess] | None = None, timeout_s: float = 60.0) -> None:
        procs = self.procs if procs is None else procs
        expected = {proc.node_id for proc in procs}

        def everyone_sees_everyone() -> bool:
            for proc in procs:
                if proc.proc is not None and proc.proc.poll() is not None:
                    raise RuntimeError(f"{proc.node_id} exited early:\n{proc.log_tail()}")
                view = node_view(proc)
                if view is None:
                    return False
                up = {n for n, row in view.items() if row["liveness"] == "UP"
                      and row["status"] == "NORMAL"}
                if not expected <= up:
                    return False
            return True

        wait_until(everyone_sees_everyone, timeout_s=timeout_s, interval_s=0.2,
                   what=f"{sorted(expected)} to see each other UP")

    def down(self) -> None:
        """Stop every node, even when stopping one of them fails; then raise that."""
        errors: list[BaseException] = []
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # noqa: BLE001 - the others must still be stopped
                errors.append(exc)
        if errors:
            raise errors[0]

    def endpoints(self) -> list[str]:
        return [proc.url for proc in self.procs]

    def reuses_data(self) -> list[str]:
        """The nodes whose data directory an earlier run left (they keep data and tokens)."""
        return [proc.node_id for proc in self.procs if (self.data_dir / proc.node_id).exists()]


def node_record(proc: NodeProcess) -> NodeRecord:
    """What the state file of a detached cluster keeps of a started node."""
    assert proc.pid is not None and proc.log_path is not None
    return NodeRecord(
        node_id=proc.node_id, pid=proc.pid, host=proc.host, client_port=proc.client_port,
        internode_port=proc.internode_port, native_port=proc.native_port, url=proc.url,
        data_dir=str(proc.data_dir / proc.node_id), log_path=str(proc.log_path),
        config_path=str(proc.config_path or ""))


def node_of_record(record: NodeRecord, data_dir: Path, tls_dir: Path | None) -> NodeProcess:
    """A handle on a node another process started: its addresses, no process object."""
    return NodeProcess(record.node_id, data_dir, host=record.host,
                       client_port=record.client_port, internode_port=record.internode_port,
                       native_port=record.native_port, tls_dir=tls_dir,
                       config_path=Path(record.config_path) if record.config_path else None)


def node_view(proc: NodeProcess) -> dict[str, dict[str, Any]] | None:
    """node id -> status row, as ``proc`` sees the cluster; None if it does not answer."""
    try:
        status, body = http("GET", f"{proc.url}/v1/status", timeout_s=2)
    except (OSError, HTTPException):
        return None
    if status != 200 or not isinstance(body, dict):
        return None
    return {row["node_id"]: row for row in body.get("nodes", [])}


def format_status(status: dict[str, Any]) -> str:
    """A nodetool-status style table."""
    header = f"{'':3}{'Address':<22}{'Node':<10}{'State':<9}{'Load':>11}{'Tokens':>8}" \
             f"{'Owns':>8}  {'DC/Rack'}"
    lines = [f"Cluster: {status.get('cluster')}   (seen from {status.get('node_id')})",
             "Status: U=Up D=Down | State: NORMAL/JOINING/LEAVING/LEFT", header]
    for row in status.get("nodes", []):
        flag = "U" if row.get("liveness") == "UP" else "D"
        state = str(row.get("status", "?"))
        lines.append(
            f"{flag + state[0]:<3}{row.get('address', '?'):<22}{row.get('node_id', '?'):<10}"
            f"{state:<9}{_human_bytes(row.get('load_bytes', 0)):>11}{row.get('tokens', 0):>8}"
            f"{100 * float(row.get('owns', 0.0)):>7.1f}%  {row.get('dc', '?')}/{row.get('rack', '?')}"
        )
    repair = status.get("repair")
    if isinstance(repair, dict):
        lines.append(f"Repair (ranges {status.get('node_id')} replicates):")
        for keyspace, view in sorted(repair.get("keyspaces", {}).items()):
            age = view.get("oldest_age_s")
            oldest = "never (some range not yet repaired)" if age is None else f"{age:.0f}s ago"
            lines.append(f"  {keyspace}: {view.get('repaired')}/{view.get('ranges')} ranges "
                         f"repaired; oldest repair {oldest}")
        if repair.get("running"):
            run = repair["running"]
            lines.append(f"  running ({run.get('trigger')}): {run.get('ranges_done')}/"
                         f"{run.get('ranges_total')} ranges")
    streaming = status.get("streaming")
    if isinstance(streaming, dict) and streaming.get("state") not in (None, "idle"):
        lines.append(
            f"Streaming ({status.get('node_id')}): {streaming.get('state')}, ranges "
            f"{streaming.get('ranges_done', 0)}/{streaming.get('ranges_total', 0)}, "
            f"{_human_bytes(streaming.get('bytes', 0))} at {streaming.get('rate_mib_s', 0)} MiB/s, "
            f"{streaming.get('fallbacks', 0)} fallbacks")
    return "\n".join(lines)


def _human_bytes(value: Any) -> str:
    size = float(value or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def demo_run_id() -> str:
    """A tag for one run of the demo. Its keys and counter carry it, so that a run on
    a data directory an earlier run left checks only what it wrote itself: the
    earlier keys are already on every replica, and the earlier counter is not 0."""
    return secrets.token_hex(3)


def run_demo(cluster: LocalCluster, say=print, run_id: str | None = None) -> str:
    """Both tiers: the eventual one (``run_eventual_demo``), then the
    transactional one (``run_txn_demo``). Returns the run's tag."""
    run_id = run_id or demo_run_id()
    say(f"(demo run {run_id}: its keys are demo-{run_id}-*, its counter "
        f"{demo_counter(run_id)})")
    run_eventual_demo(cluster, say, run_id)
    run_txn_demo(cluster, say, run_id)
    return run_id


def run_eventual_demo(cluster: LocalCluster, say=print, run_id: str | None = None) -> None:
    """Write at QUORUM, kill a node, read at QUORUM, restart it, watch its hints replay."""
    run_id = run_id or demo_run_id()
    first, victim = cluster.procs[0], cluster.procs[-1]
    keys = [f"demo-{run_id}-{i}" for i in range(10)]
    hints_before = _hint_counts(first)
    say("\n== demo: write at QUORUM")
    for i, key in enumerate(keys[:5]):
        status, body = http("PUT", f"{first.url}/v1/kv/default/{key}?consistency=QUORUM",
                            {"value": {"n": i, "run": run_id}})
        say(f"PUT {key} -> {status}, answered by {body['receipt']['answered']}")
    say(f"\n== demo: kill {victim.node_id} (SIGKILL)")
    victim.kill()
    wait_until(lambda: (node_view(first) or {}).get(victim.node_id, {}).get("liveness") == "DOWN",
               timeout_s=30, interval_s=0.2, what=f"{victim.node_id} to be marked DOWN")
    say(f"{first.node_id} now sees {victim.node_id} DOWN")
    for i, key in enumerate(keys[5:], start=5):
        status, body = http("PUT", f"{first.url}/v1/kv/default/{key}?consistency=QUORUM",
                            {"value": {"n": i, "run": run_id}})
        say(f"PUT {key} -> {status}, hints stored: {body['receipt']['hints_stored']}")
    say("\n== demo: read at QUORUM with a node down")
    status, body = http("GET", f"{first.url}/v1/kv/default/{keys[7]}?consistency=QUORUM")
    say(f"GET {keys[7]} -> {status} {json.dumps(body.get('value'))}, answered by "
        f"{body['receipt']['answered']}")
    status, body = http("GET", f"{first.url}/v1/kv/default/{keys[7]}?consistency=ALL")
    say(f"GET {keys[7]} at ALL -> {status} {body.get('error', {}).get('code')}: "
        f"required={body.get('error', {}).get('required')} alive={body.get('error', {}).get('alive')}")
    say(f"\n== demo: restart {victim.node_id}; hints are replayed to it")
    victim.start()
    cluster.wait_all_up()

    def victim_has_all() -> bool:
        # This run's values: keys of an earlier run would be there from the start.
        for i, key in enumerate(keys):
            status, got = http("GET", f"{victim.url}/v1/kv/default/{key}?local=true")
            if status != 200 or got.get("value") != {"n": i, "run": run_id}:
                return False
        return True

    wait_until(victim_has_all, timeout_s=60, interval_s=0.2, what="hints to be replayed")
    say(f"{victim.node_id}'s own replica now holds all 10 keys (read with local=true)")

    def replayed_all() -> tuple[int, int] | None:
        stored, replayed = (now - before for now, before in
                            zip(_hint_counts(first), hints_before))
        return (stored, replayed) if stored and replayed >= stored else None

    stored, replayed = wait_until(replayed_all, timeout_s=30, interval_s=0.2,
                                  what="the hint counters to show the replay")
    say(f"hints stored by {first.node_id} in this run: {stored}, replayed: {replayed}")
    status, body = http("GET", f"{first.url}/v1/status")
    say("\n== `ringkv status`\n" + format_status(body))


def _hint_counts(proc: NodeProcess) -> tuple[int, int]:
    """(stored, replayed): the hint counters of ``proc`` (since it started)."""
    _, body = http("GET", f"{proc.url}/v1/status")
    return int(body["hints"]["stored"]), int(body["hints"]["replayed"])


COUNTER = "demo-counter"


def demo_counter(run_id: str) -> str:
    """The counter key of one demo run: a fresh one starts at 0, whatever ran before."""
    return f"{COUNTER}-{run_id}"


def run_txn_demo(cluster: LocalCluster, say=print, run_id: str | None = None) -> None:
    """Compare-and-set on the transactional keyspace ``txn``, surviving the
    SIGKILL of its range's Paxos leader (Spanner §4.1: a new leader takes over
    once the old lease has run out; no increment is lost or applied twice)."""
    counter = demo_counter(run_id or demo_run_id())
    procs = cluster.procs
    say("\n== demo: compare-and-set on the transactional keyspace `txn`")
    value, version, receipt = _cas_increment(procs, procs[0], timeout_s=30, key=counter)
    say(f"CAS {counter} -> {value} (version {version}), committed by leader "
        f"{receipt['leader']} after {receipt['commit_wait_ms']} ms of commit wait")
    status, stale = http("PUT", f"{procs[1].url}/v1/kv/txn/{counter}",
                         {"value": value + 100, "if": {"version": version - 1}})
    error = stale.get("error", {}) if isinstance(stale, dict) else {}
    say(f"CAS with a stale version -> {status} {error.get('code')}, "
        f"current value {error.get('current_value')}")
    leader = next((p for p in procs if p.node_id == receipt["leader"]), None)
    if leader is None or len(procs) < 3:
        say("(a leader kill needs 3 nodes; skipped)")
        return
    say(f"\n== demo: kill {leader.node_id}, the range's Paxos leader (SIGKILL)")
    leader.kill()
    killed_at = _CLOCK.monotonic_s()
    survivors = [p for p in procs if p is not leader]
    value, version, receipt = _cas_increment(survivors, survivors[0], timeout_s=30, key=counter)
    took_s = _CLOCK.monotonic_s() - killed_at
    say(f"CAS {counter} -> {value} (version {version}) through {survivors[0].node_id}, "
        f"{took_s:.1f} s after the kill: {receipt['leader']} leads now "
        f"(the old lease ran out, then an election)")
    status, got = http("GET", f"{survivors[-1].url}/v1/kv/txn/{counter}")
    say(f"GET {counter} through {survivors[-1].node_id} -> {status} {got.get('value')} "
        f"(version {got.get('version')})")
    say(f"\n== demo: restart {leader.node_id}; it catches up from the group's log")
    leader.start()
    cluster.wait_all_up()

    def leader_caught_up() -> bool:
        status, got = http("GET", f"{leader.url}/v1/kv/txn/{counter}?max_staleness_ms=60000")
        return status == 200 and got.get("value") == value

    wait_until(leader_caught_up, timeout_s=60, interval_s=0.2,
               what=f"{leader.node_id} to catch up")
    say(f"{leader.node_id} serves {counter} = {value} again (a snapshot read from its own replica)")


def _cas_increment(procs: list[NodeProcess], first: NodeProcess, *,
                   timeout_s: float, key: str = COUNTER) -> tuple[int, int, dict[str, Any]]:
    """Read the counter, then put value + 1 if its version is unchanged; while
    the range has no leader (503, 504), try again through the next node. A
    409 means our own earlier attempt, whose answer was lost, committed, or
    someone else's did: read again and retry. Returns (value, version, receipt)."""
    order = [first, *[p for p in procs if p is not first]]
    attempt = 0

    def try_once() -> tuple[int, int, dict[str, Any]] | None:
        nonlocal attempt
        proc = order[attempt % len(order)]
        attempt += 1
        try:
            status, got = http("GET", f"{proc.url}/v1/kv/txn/{key}", timeout_s=5)
            if status == 404:
                current, condition = 0, {"absent": True}
            elif status == 200:
                current, condition = int(got["value"]), {"version": got["version"]}
            else:
                return None
            status, put = http("PUT", f"{proc.url}/v1/kv/txn/{key}",
                               {"value": current + 1, "if": condition}, timeout_s=5)
        except (OSError, HTTPException):
            return None  # the node is down or cut off: try the next one
        if status != 200:
            return None
        return current + 1, put["version"], put["receipt"]

    return wait_until(try_once, timeout_s=timeout_s, interval_s=0.1,
                      what=f"a compare-and-set on {key}")
