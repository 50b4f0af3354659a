"""YAML -> typed, validated node configuration.

Precedence: built-in defaults < the YAML file < overrides (dotted keys such as
``{"cluster.node_id": "n2"}``, e.g. from command-line flags). Any field left out
takes its default; ``conf/ringkv.yaml`` lists every field with its default and
a comment, and a test keeps that file and the defaults below equal.

Validation is strict on purpose: unknown keys are rejected (typo protection),
types are exact (``true`` is not an integer, ``"2000"`` is not a number) and
every value is range-checked. A problem raises ``ConfigError`` whose ``field``
is the dotted field (``timing.phi_threshold``) and whose message names the
source, the field, what was expected and what was found::

    conf/x.yaml: timing.phi_threshold: expected a number > 0, got -1

The source is the file name, ``<overrides>`` for a value that came from the
overrides, ``<defaults>`` for ``load_config(None)`` and ``<dict>`` for
``config_from_dict`` without a source. Problems with the file as a whole
(missing, unreadable, not YAML) use the field ``<file>``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from ringkv.address import check_host, format_address, is_wildcard, parse_address
from ringkv.errors import BadRequest, ConfigError
from ringkv.limits import MAX_KEY_BYTES, MAX_SCAN_ITEMS, MAX_VALUE_BYTES
from ringkv.quorum import ConsistencyLevel, block_for

__all__ = [
    "ClusterConfig",
    "KeyspaceConfig",
    "TimingConfig",
    "StorageConfig",
    "LimitsConfig",
    "TrueTimeConfig",
    "TxnConfig",
    "RepairConfig",
    "TlsFilesConfig",
    "TlsConfig",
    "Config",
    "load_config",
    "config_from_dict",
    "default_config",
]

TIERS = ("eventual", "transactional")
TRANSACTIONAL = "transactional"
ENGINES = ("leveldb", "memory")
COMMIT_SYNCS = ("periodic", "batch")
TOMBSTONE_GC_MODES = ("repair", "timeout")
FILE_FIELD = "<file>"

_NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]+")


# --------------------------------------------------------------------------- #
# The typed config. Field names are exactly the YAML keys; defaults here must  #
# equal conf/ringkv.yaml (tests/test_config.py checks it).                     #
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ClusterConfig:
    # Identity: a node refuses peers from another cluster; node_id names this
    # node in gossip, in `ringkv status` and in its data directory.
    name: str = "ringkv"
    node_id: str = "node1"
    # Addresses: clients use the HTTP JSON API on client_port; nodes talk to
    # each other over the binary protocol on internode_port.
    listen_host: str = "127.0.0.1"
    client_port: int = 7400
    internode_port: int = 7500
    # The native binary client protocol (docs/native-protocol.md): its own
    # port; 0 = no native listener (clients then use HTTP).
    native_port: int = 7600
    # The internode "host:port" this node tells its peers (gossip) when they
    # must reach it elsewhere than listen_host:internode_port: behind NAT, a
    # port forward or a fault-injecting proxy (Cassandra's broadcast_address).
    # None = listen_host:internode_port.
    broadcast_internode: str | None = None
    # The client API "host:port" this node tells peers and clients (/v1/ring)
    # when they must reach it elsewhere than listen_host:client_port.
    # None = listen_host:client_port. Both broadcasts are required when
    # listen_host is a wildcard (0.0.0.0, ::): nobody can dial a wildcard.
    broadcast_client: str | None = None
    # Bootstrap: a starting node gossips with these internode "host:port"
    # addresses first to learn the rest of the cluster.
    seeds: tuple[str, ...] = ("127.0.0.1:7500",)
    # A node with no saved ring that reaches none of its seeds waits for
    # them (it would otherwise form a cluster of its own and acknowledge
    # quorum writes alone); true lets it start a new cluster alone. Not
    # needed when the node is its own only seed.
    bootstrap_new_cluster: bool = False
    # A new node that takes a dead node's place (``ringkv node --replace``):
    # the dead node's id. The new node takes its tokens and streams their
    # ranges from the other replicas before it serves. None = a plain join.
    replace_node_id: str | None = None
    # Storage location: this node's data lives under data_dir / node_id, so
    # several local nodes can share one data_dir.
    data_dir: Path = Path("./data")
    # Ring and placement: vnodes per node (load balance), and the dc/rack
    # the placement strategy uses to spread replicas.
    num_tokens: int = 16
    dc: str = "dc1"
    rack: str = "rack1"

    @property
    def internode_address(self) -> str:
        """The internode "host:port" peers use to reach this node (what it gossips)."""
        if self.broadcast_internode is not None:
            return self.broadcast_internode
        return format_address(self.listen_host, self.internode_port)

    @property
    def client_address(self) -> str:
        """The "host:port" of this node's client API (what it gossips)."""
        if self.broadcast_client is not None:
            return self.broadcast_client
        return format_address(self.listen_host, self.client_port)

    @property
    def native_address(self) -> str | None:
        """The "host:port" of this node's native protocol (what it gossips), or None when
        it has none. Its host is the client API's (``broadcast_client``'s, when set)."""
        if self.native_port == 0:
            return None
        host = parse_address(self.client_address)[0]
        return format_address(host, self.native_port)

    @property
    def seed_addresses(self) -> tuple[tuple[str, int], ...]:
        """``seeds`` as (host, port) pairs; IPv6 brackets are removed."""
        return tuple(parse_address(seed) for seed in self.seeds)


MAX_RANGES = 256  # slices per transactional keyspace: each is a Paxos group on RF nodes


@dataclass(frozen=True)
class KeyspaceConfig:
    # A keyspace groups keys that share a replication factor, a tier
    # (eventual = Dynamo-style, transactional = Paxos groups + 2PC) and the
    # consistency level used when a request does not choose one (SERIAL, the
    # only level, on a transactional keyspace). A transactional keyspace is cut
    # into ``ranges`` fixed slices of the token space, one Paxos group each
    # (ringkv/txn/ranges.py); fixed, so that groups move with the ring.
    name: str
    replication_factor: int = 3
    tier: str = "eventual"
    default_consistency: ConsistencyLevel = ConsistencyLevel.QUORUM
    ranges: int = 1


@dataclass(frozen=True)
class TimingConfig:
    # Request deadlines: after these a coordinator answers Timeout.
    read_timeout_ms: int = 2000
    write_timeout_ms: int = 2000
    # Membership: gossip round period and the phi-accrual failure detector's
    # threshold (higher = slower to mark a peer down, fewer false alarms).
    gossip_interval_ms: int = 1000
    phi_threshold: float = 8.0
    # Heartbeat intervals longer than this are outages (partitions, pauses),
    # not samples, and stay out of the detector's history; otherwise one long
    # partition stretches the learned distribution until later partitions of
    # the same node are never detected. 2000 is Cassandra's default
    # (fd_max_interval_ms), twice its 1 s gossip round: a heartbeat relayed a
    # round late is still learned. It also equals the acceptable pause the
    # node adds (2 rounds), so with 1 s gossip every silence long enough to
    # mark a peer DOWN is longer than the bound. Must exceed gossip_interval_ms.
    phi_max_interval_ms: int = 2000
    # Hinted handoff: how long hints are kept for a down replica, and how fast
    # they are replayed so a returning node is not flooded.
    max_hint_window_s: int = 10800
    hint_replay_rate_per_s: int = 1000
    # Deletes and expiry: tombstones live gc_grace_s so repair can spread
    # them; default TTL for writes without one (0 = none); sweep period.
    gc_grace_s: int = 864000
    default_ttl_s: int = 0
    tombstone_sweep_interval_s: int = 3600
    # Speculative retry: ask another replica when one is slower than this
    # latency percentile, but not sooner than speculative_retry_min_ms.
    speculative_retry_percentile: float = 99.0
    speculative_retry_min_ms: int = 20
    # Shutdown: how long in-flight requests may finish (0 = do not wait).
    shutdown_drain_timeout_s: int = 10


@dataclass(frozen=True)
class StorageConfig:
    # Engine: leveldb (durable) or memory (tests, benchmarks).
    engine: str = "leveldb"
    # Durability: periodic fsync (faster, a crash may lose the last interval)
    # or batch (group commit, fsync before the write is acknowledged).
    commit_sync: str = "periodic"
    periodic_sync_interval_ms: int = 1000
    # LevelDB memory: block cache and memtable (write buffer) sizes.
    leveldb_cache_mb: int = 64
    leveldb_write_buffer_mb: int = 16


@dataclass(frozen=True)
class LimitsConfig:
    # Size limits keep one bad request from exhausting a node's memory; the
    # API answers TooLarge naming the limit. Keys are counted in UTF-8 bytes,
    # values in bytes of their JSON encoding.
    max_key_bytes: int = 1024
    max_value_bytes: int = 1048576
    max_request_bytes: int = 4194304
    # Per-request work limits for batch and scan.
    max_batch_ops: int = 1000
    max_scan_page: int = 1000
    # The client door (ringkv.door): how long a client connection may hold
    # the node without sending, and how many may. A request's head (request
    # line and headers) must arrive within header_timeout_s of its first
    # byte; on a new connection, of the connect. A body must arrive within
    # body_timeout_s plus one second per body_min_rate_bytes_per_s received
    # (Apache mod_reqtimeout's MinRate), so a slow honest upload finishes and
    # a trickle does not. A keep-alive connection with no request is closed
    # after idle_timeout_s (above the Python client's 15 s pool timeout).
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    body_min_rate_bytes_per_s: int = 16384
    idle_timeout_s: float = 60.0
    # Open client connections at most. At the cap a new connection takes the
    # place of the longest idle one, or gets 503 overloaded when none is
    # idle. Lowered at start-up when the open-files limit cannot hold it
    # beside the descriptors kept for LevelDB and internode links.
    max_client_connections: int = 1024


@dataclass(frozen=True)
class TrueTimeConfig:
    # TrueTime (the transactional tier's clock): epsilon is this floor, plus
    # max_drift_ppm times the age of the last offset sample, plus the offset
    # bound measured by pinging peers every sync_interval_ms. A node whose
    # epsilon exceeds max_uncertainty_ms refuses transactional work.
    min_uncertainty_ms: float = 1.0
    max_drift_ppm: int = 200
    max_uncertainty_ms: int = 250
    sync_interval_ms: int = 1000


@dataclass(frozen=True)
class TxnConfig:
    # Paxos leader leases (Spanner's are 10 s); old MVCC versions kept this
    # long for snapshot reads; how often an idle group's leader advances its
    # safe time (so followers serve snapshot reads); how many times a leader
    # retries a transaction wounded by an older one before answering aborted.
    lease_s: float = 2.0
    mvcc_gc_s: int = 600
    safe_time_interval_ms: int = 200
    max_conflict_retries: int = 8
    # A transaction across ranges whose client ran operations and then went
    # silent this long is aborted where it holds locks (its session is gone).
    idle_timeout_s: float = 30.0
    # An interactive transaction (POST /v1/txn/begin) lives at most this long.
    max_duration_s: float = 60.0
    # A transaction that names its id is answered from its commit record for this
    # long (a retry after that runs it again), as an idempotency key is.
    outcome_retention_s: int = 86_400
    # Watches (GET /v1/watch/...): at most max_watches streams open per node
    # (503 overloaded beyond); each polls its ranges every watch_poll_ms and
    # holds at most watch_buffer_events events its client has not read (a
    # client that stays that far behind is cut off: watcher_too_slow).
    max_watches: int = 256
    watch_poll_ms: int = 50
    watch_buffer_events: int = 10_000
    # Session leases (POST /v1/lease, txn/leases.py): at most max_leases live in
    # one transactional keyspace (503 overloaded beyond), each with at most
    # max_keys_per_lease keys (its expiry deletes them in one transaction) and a
    # TTL of at most max_lease_ttl_s; a lease's keys are deleted at most about
    # lease_sweep_ms after it expires (plus one transaction across ranges).
    max_leases: int = 1024
    max_keys_per_lease: int = 64
    max_lease_ttl_s: int = 86_400
    lease_sweep_ms: int = 250


@dataclass(frozen=True)
class RepairConfig:
    # Anti-entropy repair (ringkv/repair/): the built-in scheduler repairs every
    # range this node replicates at least once per interval_s (0 = half of
    # timing.gc_grace_s, so a deletion reaches every replica before its
    # tombstone may go); trees are built by a scan throttled to
    # scan_rate_mib_s; a peer's tree or sync must answer within
    # request_timeout_s. tombstone_gc: repair = a tombstone (or expired cell)
    # is purged only after gc_grace AND a repair of its range that began after
    # it was written (ScyllaDB's tombstone_gc: repair); timeout = after
    # gc_grace alone (Cassandra's default, which can resurrect deleted data
    # when a replica missed the delete and no repair ran in time).
    scheduled: bool = True
    interval_s: int = 0
    scan_rate_mib_s: float = 32.0
    request_timeout_s: int = 600
    tombstone_gc: str = "repair"


@dataclass(frozen=True)
class StreamingConfig:
    # Bootstrap streaming: a joining node copies the ranges it takes over
    # from their current replicas at most this fast (MiB/s, Cassandra's
    # stream_throughput_outbound), in scan pages of at most page_cells cells.
    throughput_mib_s: float = 32.0
    page_cells: int = 500
    # false: a new node takes its tokens and goes NORMAL at once, streaming
    # nothing (Cassandra's auto_bootstrap: false). Only for forming a new
    # cluster that holds no data yet; `ringkv cluster up` uses it for the
    # nodes it starts together on fresh data directories.
    auto_bootstrap: bool = True


@dataclass(frozen=True)
class TlsFilesConfig:
    # PEM files for one link. cert_file may hold the chain (leaf first);
    # key_file is its unencrypted private key; ca_file the certificates the
    # other end's must chain to. All None = plain TCP on that link.
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class TlsConfig:
    # client: HTTPS on client_port and TLS on native_port (cert_file and
    # key_file; with ca_file, clients must also present a certificate that
    # chains to it). internode: mutual TLS between nodes, all three files
    # required: each end proves itself with cert_file and accepts only a
    # peer whose certificate chains to ca_file (the cluster CA).
    # SIGHUP rereads every file here without a restart: new connections then
    # trust exactly the CAs ca_file holds (open ones carry on as they were).
    client: TlsFilesConfig = field(default_factory=TlsFilesConfig)
    internode: TlsFilesConfig = field(default_factory=TlsFilesConfig)


# Token secrets kept, besides the current one, after a rotation (auth.previous_secrets).
MAX_PREVIOUS_SECRETS = 16
# The user store's keyspace (ringkv/auth/store.py), added when auth is enabled.
AUTH_KEYSPACE = "system_auth"


@dataclass(frozen=True)
class AuthConfig:
    # enabled: every API route but /v1/health and POST /v1/auth/token needs
    # credentials (HTTP Basic or a bearer token; the native protocol's hello).
    # Off by default so that the local quick start stays open. The users live
    # in the transactional keyspace system_auth, replicated to
    # replication_factor nodes (min(that, nodes)): a Paxos group, so a user
    # added at one node logs in at every other. Nodes cache what they read
    # for cache_ttl_s (a revoke or password change applies within it); tokens
    # live token_ttl_s; each source address may fail login_burst logins,
    # then one more per 1 / login_refill_per_s seconds. The token secret
    # rotates (POST /v1/auth/secret/rotate); previous_secrets earlier secrets
    # still verify their tokens, older ones are retired (0: none).
    enabled: bool = False
    replication_factor: int = 3
    token_ttl_s: int = 3600
    cache_ttl_s: float = 2.0
    login_burst: int = 10
    login_refill_per_s: float = 0.2
    previous_secrets: int = 2


def _default_keyspaces() -> dict[str, KeyspaceConfig]:
    # Both tiers out of the box: `default` (Dynamo-style) and `txn` (Paxos
    # groups per range, strictly serializable), as conf/ringkv.yaml lists them.
    return {
        "default": KeyspaceConfig("default"),
        "txn": KeyspaceConfig(
            "txn", tier=TRANSACTIONAL, default_consistency=ConsistencyLevel.SERIAL
        ),
    }


@dataclass(frozen=True)
class Config:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    keyspaces: dict[str, KeyspaceConfig] = field(default_factory=_default_keyspaces)
    timing: TimingConfig = field(default_factory=TimingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    truetime: TrueTimeConfig = field(default_factory=TrueTimeConfig)
    txn: TxnConfig = field(default_factory=TxnConfig)
    repair: RepairConfig = field(default_factory=RepairConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    # Where the config came from (file path), None for defaults or a dict.
    # Not part of equality: two configs with the same values are equal.
    source: str | None = field(default=None, compare=False)

    @property
    def node_data_dir(self) -> Path:
        """This node's own data directory: ``cluster.data_dir / cluster.node_id``."""
        return self.cluster.data_dir / self.cluster.node_id

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict in the YAML layout (``config_from_dict`` reads it back)."""
        cluster = dataclasses.asdict(self.cluster)
        cluster["seeds"] = list(self.cluster.seeds)
        cluster["data_dir"] = str(self.cluster.data_dir)
        keyspaces = {
            name: {
                "replication_factor": ks.replication_factor,
                "tier": ks.tier,
                "default_consistency": ks.default_consistency.value,
                **({"ranges": ks.ranges} if ks.tier == TRANSACTIONAL else {}),
            }
            for name, ks in self.keyspaces.items()
            if name != AUTH_KEYSPACE  # auth.enabled adds it back
        }
        return {
            "cluster": cluster,
            "keyspaces": keyspaces,
            "timing": dataclasses.asdict(self.timing),
            "storage": dataclasses.asdict(self.storage),
            "limits": dataclasses.asdict(self.limits),
            "truetime": dataclasses.asdict(self.truetime),
            "txn": dataclasses.asdict(self.txn),
            "repair": dataclasses.asdict(self.repair),
            "streaming": dataclasses.asdict(self.streaming),
            "tls": {
                link: {name: None if path is None else str(path)
                       for name, path in dataclasses.asdict(getattr(self.tls, link)).items()}
                for link in _TLS_LINKS
            },
            "auth": dataclasses.asdict(self.auth),
        }

    def repair_interval_s(self) -> int:
        """The scheduler's interval: repair.interval_s, or half of gc_grace_s (at least 1 s)."""
        return self.repair.interval_s or max(1, self.timing.gc_grace_s // 2)

    def transactional_keyspaces(self) -> list[str]:
        return [name for name, ks in self.keyspaces.items() if ks.tier == TRANSACTIONAL]


# --------------------------------------------------------------------------- #
# Public entry points                                                          #
# --------------------------------------------------------------------------- #


def default_config() -> Config:
    """The config with every field at its default."""
    return config_from_dict({})


def config_from_dict(data: Mapping[str, Any], source: str | None = None) -> Config:
    """Validate ``data`` (the YAML layout) into a Config; missing fields take defaults."""
    ctx = _Context(label=source or "<dict>", overridden=frozenset())
    return _build(ctx, data, source)


def load_config(
    path: str | os.PathLike[str] | None, overrides: Mapping[str, object] | None = None
) -> Config:
    """Read the YAML file at ``path`` (None: all defaults), apply ``overrides``, validate.

    ``overrides`` maps dotted keys to values, e.g. ``{"cluster.node_id": "n2",
    "cluster.seeds": ["10.0.0.1:7500"], "keyspaces.orders.replication_factor": 5}``.
    A key names a section, a field, a keyspace or a keyspace field.
    """
    if path is None:
        source = None
        label = "<defaults>"
        data: dict[str, Any] = {}
    else:
        source = label = str(path)
        data = _read_yaml(label, Path(path))
    overrides = overrides or {}
    for key in overrides:
        _check_override_key(key)
    data = copy.deepcopy(data)
    if data.get("keyspaces") is None and any(key.startswith("keyspaces.") for key in overrides):
        # Adding one keyspace by override keeps the default keyspaces.
        data["keyspaces"] = Config().to_dict()["keyspaces"]
    for key, value in overrides.items():
        _apply_override(label, data, key, value)
    ctx = _Context(label=label, overridden=frozenset(overrides))
    return _build(ctx, data, source)


# --------------------------------------------------------------------------- #
# Reading the file and applying overrides                                      #
# --------------------------------------------------------------------------- #


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, str) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(label: str, path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        reason = err.strerror or str(err)
        raise ConfigError(
            f"{label}: {FILE_FIELD}: expected a readable config file, got {reason}",
            field=FILE_FIELD,
            source=label,
        ) from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{label}: {FILE_FIELD}: expected UTF-8 text, got {err}", field=FILE_FIELD, source=label
        ) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        where = ""
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(
            f"{label}: {FILE_FIELD}: expected valid YAML, got {problem}{where}",
            field=FILE_FIELD,
            source=label,
        ) from None
    if data is None:  # an empty file (or only comments) means all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{label}: {FILE_FIELD}: expected a mapping of sections "
            f"({', '.join(_SECTIONS)}), got {_show_typed(data)}",
            field=FILE_FIELD,
            source=label,
        )
    return data


def _check_override_key(key: object) -> None:
    """Allowed: 'section', 'section.field', 'keyspaces.<name>', 'keyspaces.<name>.<field>'."""
    if not isinstance(key, str):
        _override_error(repr(key), "a dotted key such as 'cluster.node_id'", _show_typed(key))
    parts = key.split(".")
    section = parts[0]
    if section not in _SECTIONS:
        _override_error(key, _known_key_hint(section, _SECTIONS), f"unknown section {section!r}")
    if section == "tls" and len(parts) == 3:
        if parts[1] not in _TLS_LINKS:
            _override_error(key, _known_key_hint(parts[1], _TLS_LINKS), f"unknown key {parts[1]!r}")
        if parts[2] not in _TLS_FILE_KEYS:
            _override_error(
                key, _known_key_hint(parts[2], _TLS_FILE_KEYS), f"unknown key {parts[2]!r}"
            )
        return
    if section == "keyspaces":
        if len(parts) > 3:
            _override_error(key, "keyspaces.<name>.<field>", repr(key))
        if len(parts) == 3 and parts[2] not in _KEYSPACE_KEYS:
            _override_error(
                key, _known_key_hint(parts[2], _KEYSPACE_KEYS), f"unknown key {parts[2]!r}"
            )
        return
    if len(parts) > 2:
        _override_error(key, f"{section}.<field>", repr(key))
    if len(parts) == 2 and parts[1] not in _SECTIONS[section]:
        _override_error(
            key, _known_key_hint(parts[1], _SECTIONS[section]), f"unknown key {parts[1]!r}"
        )


def _override_error(key: str, expected: str, got: str) -> NoReturn:
    raise ConfigError(
        f"<overrides>: {key}: expected {expected}, got {got}", field=key, source="<overrides>"
    )


def _apply_override(label: str, data: dict[str, Any], key: str, value: object) -> None:
    """Set data[a][b]... = value for key 'a.b...', creating missing mappings."""
    *parents, last = key.split(".")
    node = data
    walked: list[str] = []
    for part in parents:
        walked.append(part)
        child = node.get(part)
        if child is None:
            child = {}
        elif isinstance(child, Mapping):
            child = dict(child)
        else:  # the file has a scalar where a mapping belongs: report the file's mistake
            dotted = ".".join(walked)
            raise ConfigError(
                f"{label}: {dotted}: expected a mapping, got {_show_typed(child)}",
                field=dotted,
                source=label,
            )
        node[part] = child
        node = child
    node[last] = value


# --------------------------------------------------------------------------- #
# Validation                                                                   #
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _Context:
    label: str  # file name, "<defaults>" or "<dict>"
    overridden: frozenset[str]  # dotted keys set by overrides

    def source_of(self, *fields: str) -> str:
        """'<overrides>' if any of ``fields`` (or a parent of one) was overridden."""
        for name in fields:
            for key in self.overridden:
                if name == key or name.startswith(key + ".") or name.startswith(key + "["):
                    return "<overrides>"
        return self.label

    def fail(
        self, name: str, expected: str, got: str, *, related: tuple[str, ...] = ()
    ) -> NoReturn:
        source = self.source_of(name, *related)
        raise ConfigError(
            f"{source}: {name}: expected {expected}, got {got}", field=name, source=source
        )


class _Section:
    """One mapping being validated: rejects unknown keys, collects checked values.

    Only keys present in the input are checked and collected; the dataclass
    supplies defaults for the rest.
    """

    def __init__(self, ctx: _Context, prefix: str, raw: object, keys: tuple[str, ...]) -> None:
        self.ctx = ctx
        self.prefix = prefix
        self.keys = keys
        if raw is None:  # a section with every line commented out
            raw = {}
        if not isinstance(raw, Mapping):
            ctx.fail(prefix, "a mapping", _show_typed(raw))
        for key in raw:
            if key not in keys:
                ctx.fail(f"{prefix}.{key}", _known_key_hint(str(key), keys), f"unknown key {key!r}")
        self.raw: Mapping[str, object] = raw
        self.values: dict[str, Any] = {}

    def dotted(self, key: str) -> str:
        return f"{self.prefix}.{key}"

    def take(self, key: str, check: Any, *args: Any, **kwargs: Any) -> None:
        """If ``key`` is present, validate it with ``check(ctx, field, value, ...)``."""
        assert key in self.keys, key
        if key in self.raw:
            self.values[key] = check(self.ctx, self.dotted(key), self.raw[key], *args, **kwargs)

    def done(self) -> dict[str, Any]:
        unchecked = set(self.raw) - set(self.values)
        if unchecked:  # a programming error: a known key has no check
            raise RuntimeError(f"config fields without a check: {sorted(unchecked)}")
        return self.values


def _build(ctx: _Context, data: Mapping[str, Any], source: str | None) -> Config:
    if not isinstance(data, Mapping):
        ctx.fail(FILE_FIELD, "a mapping of sections", _show_typed(data))
    for key in data:
        if key not in _SECTIONS:
            ctx.fail(str(key), _known_key_hint(str(key), _SECTIONS), f"unknown section {key!r}")
    cluster = _read_cluster(ctx, data.get("cluster"))
    # A keyspaces section replaces the default keyspaces; an absent or null one keeps them.
    raw_keyspaces = data.get("keyspaces")
    keyspaces = (
        _default_keyspaces() if raw_keyspaces is None else _read_keyspaces(ctx, raw_keyspaces)
    )
    timing = _read_timing(ctx, data.get("timing"))
    storage = _read_storage(ctx, data.get("storage"))
    limits = _read_limits(ctx, data.get("limits"))
    truetime = _read_truetime(ctx, data.get("truetime"))
    txn = _read_txn(ctx, data.get("txn"))
    repair = _read_repair(ctx, data.get("repair"), timing)
    streaming = _read_streaming(ctx, data.get("streaming"))
    tls = _read_tls(ctx, data.get("tls"))
    auth = _read_auth(ctx, data.get("auth"))
    if auth.enabled:
        keyspaces = {**keyspaces, AUTH_KEYSPACE: KeyspaceConfig(
            AUTH_KEYSPACE, replication_factor=auth.replication_factor, tier=TRANSACTIONAL,
            default_consistency=ConsistencyLevel.SERIAL)}
    return Config(cluster, keyspaces, timing, storage, limits, truetime, txn, repair, streaming,
                  tls, auth, source)


def _read_auth(ctx: _Context, raw: object) -> AuthConfig:
    sec = _Section(ctx, "auth", raw, _SECTIONS["auth"])
    sec.take("enabled", _check_bool)
    sec.take("replication_factor", _check_int, 1, 15)
    sec.take("token_ttl_s", _check_int, 10, 30 * _DAY_S)
    sec.take("cache_ttl_s", _check_number_from, 0.0, 60.0)
    sec.take("login_burst", _check_int, 1, 10_000)
    sec.take("login_refill_per_s", _check_number_from, 0.0001, 1000.0)
    sec.take("previous_secrets", _check_int, 0, MAX_PREVIOUS_SECRETS)
    return AuthConfig(**sec.done())


def _read_cluster(ctx: _Context, raw: object) -> ClusterConfig:
    sec = _Section(ctx, "cluster", raw, _SECTIONS["cluster"])
    sec.take("name", _check_name, 64)
    sec.take("node_id", _check_name, 64)
    sec.take("listen_host", _check_host)
    sec.take("client_port", _check_int, 1, 65535)
    sec.take("internode_port", _check_int, 1, 65535)
    sec.take("native_port", _check_int, 0, 65535)
    sec.take("broadcast_internode", _check_advertised_address)
    sec.take("broadcast_client", _check_advertised_client)
    sec.take("seeds", _check_seeds)
    sec.take("bootstrap_new_cluster", _check_bool)
    sec.take("replace_node_id", _check_optional_name, 64)
    sec.take("data_dir", _check_path)
    sec.take("num_tokens", _check_int, 1, 256)
    sec.take("dc", _check_name, 64)
    sec.take("rack", _check_name, 64)
    cluster = ClusterConfig(**sec.done())
    if cluster.broadcast_client is not None and _bare_host(cluster.broadcast_client):
        # Just a host: clients reach the API there on the port it listens on.
        cluster = dataclasses.replace(cluster, broadcast_client=format_address(
            cluster.broadcast_client.strip("[]"), cluster.client_port))
    if cluster.client_port == cluster.internode_port:
        ctx.fail(
            "cluster.internode_port",
            f"a port different from cluster.client_port ({cluster.client_port})",
            _show(cluster.internode_port),
            related=("cluster.client_port",),
        )
    if cluster.native_port in (cluster.client_port, cluster.internode_port):
        ctx.fail(
            "cluster.native_port",
            f"0 (no native listener) or a port different from cluster.client_port "
            f"({cluster.client_port}) and cluster.internode_port ({cluster.internode_port})",
            _show(cluster.native_port),
            related=("cluster.client_port", "cluster.internode_port"),
        )
    if is_wildcard(cluster.listen_host):
        # Peers and clients would be told to dial 0.0.0.0, i.e. themselves:
        # every node forms a cluster of one (issue #10).
        missing = [
            f"cluster.{name}"
            for name in ("broadcast_internode", "broadcast_client")
            if getattr(cluster, name) is None
        ]
        if missing:
            also = f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""
            ctx.fail(
                missing[0],
                f'the "host:port" others dial, because cluster.listen_host '
                f"{cluster.listen_host!r} is a wildcard that nobody can dial",
                f"null{also}",
                related=("cluster.listen_host",),
            )
    return cluster


def _read_keyspaces(ctx: _Context, raw: object) -> dict[str, KeyspaceConfig]:
    if not isinstance(raw, Mapping):
        ctx.fail("keyspaces", "a mapping of keyspace name to settings", _show_typed(raw))
    keyspaces: dict[str, KeyspaceConfig] = {}
    for name, settings in raw.items():
        name = _check_name(ctx, f"keyspaces.{name}", name, 48)
        if name == AUTH_KEYSPACE:
            ctx.fail(f"keyspaces.{name}", "another keyspace name: system_auth is the user "
                     "store's (auth.enabled adds it)", _show(name))
        sec = _Section(ctx, f"keyspaces.{name}", settings, _KEYSPACE_KEYS)
        sec.take("replication_factor", _check_int, 1, 15)
        sec.take("tier", _check_choice, TIERS)
        sec.take("default_consistency", _check_consistency)
        sec.take("ranges", _check_int, 1, MAX_RANGES)
        values = sec.done()
        if "ranges" in values and values.get("tier") != TRANSACTIONAL:
            ctx.fail(sec.dotted("ranges"), "no ranges setting: only a transactional keyspace is "
                     "cut into ranges (an eventual one follows the ring)", _show(values["ranges"]),
                     related=(sec.dotted("tier"),))
        if values.get("tier") == TRANSACTIONAL:
            # Paxos groups serve every request serializably: SERIAL is the only level.
            level = values.setdefault("default_consistency", ConsistencyLevel.SERIAL)
            if level is not ConsistencyLevel.SERIAL:
                ctx.fail(sec.dotted("default_consistency"), "SERIAL on a transactional keyspace "
                         "(eventual levels would break what the tier promises)", _show(level.value),
                         related=(sec.dotted("tier"),))
        elif values.get("default_consistency") is ConsistencyLevel.SERIAL:
            ctx.fail(sec.dotted("default_consistency"), "an eventual level (ONE, QUORUM, ...): "
                     "SERIAL needs tier: transactional", "'SERIAL'", related=(sec.dotted("tier"),))
        keyspace = KeyspaceConfig(name, **values)
        needed = block_for(keyspace.default_consistency, keyspace.replication_factor)
        if needed > keyspace.replication_factor:
            ctx.fail(
                sec.dotted("default_consistency"),
                f"a level that replication_factor {keyspace.replication_factor} can meet",
                f"{keyspace.default_consistency.value} (needs {needed} replicas)",
                related=(sec.dotted("replication_factor"),),
            )
        keyspaces[name] = keyspace
    return keyspaces


# Upper bounds: a number too large to mean anything (10**400 ms, say) is a
# config error naming the field, not an overflow when the node starts.
_HOUR_MS = 3_600_000
_DAY_S = 86_400
_MAX_TTL_S = 20 * 365 * _DAY_S  # Cassandra's TTL limit


def _read_timing(ctx: _Context, raw: object) -> TimingConfig:
    sec = _Section(ctx, "timing", raw, _SECTIONS["timing"])
    sec.take("read_timeout_ms", _check_int, 1, _HOUR_MS)
    sec.take("write_timeout_ms", _check_int, 1, _HOUR_MS)
    sec.take("gossip_interval_ms", _check_int, 1, 60_000)
    sec.take("phi_threshold", _check_number, 0.0, None)
    sec.take("phi_max_interval_ms", _check_int, 1, _HOUR_MS)
    sec.take("max_hint_window_s", _check_int, 0, 30 * _DAY_S)
    sec.take("hint_replay_rate_per_s", _check_int, 1, 1_000_000)
    sec.take("gc_grace_s", _check_int, 0, _MAX_TTL_S)
    sec.take("default_ttl_s", _check_int, 0, _MAX_TTL_S)
    sec.take("tombstone_sweep_interval_s", _check_int, 1, 30 * _DAY_S)
    sec.take("speculative_retry_percentile", _check_number, 0.0, 100.0)
    sec.take("speculative_retry_min_ms", _check_int, 0, _HOUR_MS)
    sec.take("shutdown_drain_timeout_s", _check_int, 0, 3600)
    timing = TimingConfig(**sec.done())
    if timing.phi_max_interval_ms <= timing.gossip_interval_ms:
        # Heartbeats come once a gossip round at best: nothing would be learned.
        ctx.fail(
            "timing.phi_max_interval_ms",
            f"more than timing.gossip_interval_ms ({timing.gossip_interval_ms})",
            _show(timing.phi_max_interval_ms),
            related=("timing.gossip_interval_ms",),
        )
    return timing


def _read_storage(ctx: _Context, raw: object) -> StorageConfig:
    sec = _Section(ctx, "storage", raw, _SECTIONS["storage"])
    sec.take("engine", _check_choice, ENGINES)
    sec.take("commit_sync", _check_choice, COMMIT_SYNCS)
    sec.take("periodic_sync_interval_ms", _check_int, 1, _HOUR_MS)
    sec.take("leveldb_cache_mb", _check_int, 1, 1_048_576)
    sec.take("leveldb_write_buffer_mb", _check_int, 1, 65_536)
    return StorageConfig(**sec.done())


def _read_limits(ctx: _Context, raw: object) -> LimitsConfig:
    sec = _Section(ctx, "limits", raw, _SECTIONS["limits"])
    # A key and a value travel to a replica in one internode frame: see ringkv.limits.
    sec.take("max_key_bytes", _check_int, 1, MAX_KEY_BYTES)
    sec.take("max_value_bytes", _check_int, 1, MAX_VALUE_BYTES)
    sec.take("max_request_bytes", _check_int, 1, 2**31)
    sec.take("max_batch_ops", _check_int, 1, 100_000)
    sec.take("max_scan_page", _check_int, 1, MAX_SCAN_ITEMS)  # no replica returns more
    sec.take("header_timeout_s", _check_number, 0.0, 3600.0)
    sec.take("body_timeout_s", _check_number, 0.0, 3600.0)
    sec.take("body_min_rate_bytes_per_s", _check_int, 1, 2**31)
    sec.take("idle_timeout_s", _check_number, 0.0, 86_400.0)
    sec.take("max_client_connections", _check_int, 1, 1_000_000)
    limits = LimitsConfig(**sec.done())
    if limits.max_value_bytes > limits.max_request_bytes:
        ctx.fail(
            "limits.max_value_bytes",
            f"at most limits.max_request_bytes ({limits.max_request_bytes})",
            _show(limits.max_value_bytes),
            related=("limits.max_request_bytes",),
        )
    return limits


def _read_truetime(ctx: _Context, raw: object) -> TrueTimeConfig:
    sec = _Section(ctx, "truetime", raw, _SECTIONS["truetime"])
    sec.take("min_uncertainty_ms", _check_number_from, 0.0, 1000.0)
    sec.take("max_drift_ppm", _check_int, 0, 100_000)
    sec.take("max_uncertainty_ms", _check_int, 1, 60_000)
    sec.take("sync_interval_ms", _check_int, 10, 60_000)
    truetime = TrueTimeConfig(**sec.done())
    if truetime.max_uncertainty_ms <= truetime.min_uncertainty_ms:
        ctx.fail("truetime.max_uncertainty_ms",
                 f"more than truetime.min_uncertainty_ms ({truetime.min_uncertainty_ms:g})",
                 _show(truetime.max_uncertainty_ms), related=("truetime.min_uncertainty_ms",))
    return truetime


def _read_txn(ctx: _Context, raw: object) -> TxnConfig:
    sec = _Section(ctx, "txn", raw, _SECTIONS["txn"])
    sec.take("lease_s", _check_number, 0.0, 60.0)
    sec.take("mvcc_gc_s", _check_int, 1, 30 * _DAY_S)
    sec.take("safe_time_interval_ms", _check_int, 10, 60_000)
    sec.take("max_conflict_retries", _check_int, 0, 100)
    sec.take("idle_timeout_s", _check_number, 0.1, 3600.0)
    sec.take("max_duration_s", _check_number, 0.1, 86_400.0)
    sec.take("outcome_retention_s", _check_int, 60, 30 * _DAY_S)
    sec.take("max_watches", _check_int, 0, 100_000)
    sec.take("watch_poll_ms", _check_int, 10, 10_000)
    sec.take("watch_buffer_events", _check_int, 2, 1_000_000)
    sec.take("max_leases", _check_int, 0, 100_000)
    sec.take("max_keys_per_lease", _check_int, 1, 1000)
    sec.take("max_lease_ttl_s", _check_int, 1, 30 * _DAY_S)
    sec.take("lease_sweep_ms", _check_int, 10, 60_000)
    txn = TxnConfig(**sec.done())
    if txn.lease_s < 0.2:
        # Heartbeats renew the lease four times per lease_s at the Paxos core's pace.
        ctx.fail("txn.lease_s", "a number from 0.2 to 60", _show(txn.lease_s))
    return txn


def _read_repair(ctx: _Context, raw: object, timing: TimingConfig) -> RepairConfig:
    sec = _Section(ctx, "repair", raw, _SECTIONS["repair"])
    sec.take("scheduled", _check_bool)
    sec.take("interval_s", _check_int, 0, _MAX_TTL_S)
    sec.take("scan_rate_mib_s", _check_number_from, 0.01, 100_000.0)
    sec.take("request_timeout_s", _check_int, 1, 86_400)
    sec.take("tombstone_gc", _check_choice, TOMBSTONE_GC_MODES)
    repair = RepairConfig(**sec.done())
    if repair.interval_s and repair.interval_s >= timing.gc_grace_s:
        # A range repaired less often than gc_grace lets tombstones wait past it
        # (tombstone_gc: repair) or go before the delete reached every replica.
        ctx.fail("repair.interval_s",
                 f"less than timing.gc_grace_s ({timing.gc_grace_s}), or 0 for half of it",
                 _show(repair.interval_s), related=("timing.gc_grace_s",))
    return repair
def _read_streaming(ctx: _Context, raw: object) -> StreamingConfig:
    sec = _Section(ctx, "streaming", raw, _SECTIONS["streaming"])
    sec.take("throughput_mib_s", _check_number_from, 0.1, 100_000.0)
    sec.take("page_cells", _check_int, 1, MAX_SCAN_ITEMS)  # no replica returns more
    sec.take("auto_bootstrap", _check_bool)
    return StreamingConfig(**sec.done())


# Which files each link needs together: a client link may leave ca_file out
# (no client certificates); mutual TLS between nodes needs all three.
_TLS_REQUIRED = {
    "client": ("cert_file", "key_file"),
    "internode": ("cert_file", "key_file", "ca_file"),
}
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
_PEM_KEY = b"PRIVATE KEY-----"


def _read_tls(ctx: _Context, raw: object) -> TlsConfig:
    sec = _Section(ctx, "tls", raw, _SECTIONS["tls"])
    for link in _TLS_LINKS:
        sec.take(link, _check_tls_files, _TLS_REQUIRED[link])
    return TlsConfig(**sec.done())


def _check_tls_files(
    ctx: _Context, name: str, value: object, required: tuple[str, ...]
) -> TlsFilesConfig:
    """One link's files: present together, readable, PEM, and the key matching the cert."""
    sec = _Section(ctx, name, value, _TLS_FILE_KEYS)
    sec.take("cert_file", _check_pem_file, _PEM_CERT, "a certificate")
    sec.take("key_file", _check_pem_file, _PEM_KEY, "a private key")
    sec.take("ca_file", _check_pem_file, _PEM_CERT, "CA certificates")
    files = TlsFilesConfig(**sec.done())
    given = [key for key in _TLS_FILE_KEYS if getattr(files, key) is not None]
    missing = [key for key in required if getattr(files, key) is None]
    if given and missing:
        ctx.fail(f"{name}.{missing[0]}",
                 f"a file path: {name} needs {', '.join(required)} together",
                 "null", related=tuple(f"{name}.{key}" for key in given))
    if files.cert_file is not None and files.key_file is not None:
        _check_key_matches(ctx, name, files.cert_file, files.key_file)
    return files


def _check_pem_file(ctx: _Context, name: str, value: object, marker: bytes, what: str) -> Path | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    wanted = f"a readable PEM file holding {what}"
    if not isinstance(value, str) or not value:
        ctx.fail(name, wanted, _show_typed(value))
    path = Path(value)
    try:
        data = path.read_bytes()
    except OSError as exc:
        ctx.fail(name, wanted, f"{_show(value)} ({exc.strerror or exc})")
    if marker not in data:
        ctx.fail(name, wanted, f"{_show(value)} (no {marker.decode().strip('-')} in it)")
    return path


def _check_key_matches(ctx: _Context, name: str, cert_file: Path, key_file: Path) -> None:
    """The key must be the certificate's: the TLS handshake would fail on every connection."""
    # Imported here: only configs that use TLS pay for loading it.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except ValueError as exc:
        ctx.fail(f"{name}.cert_file", "a readable PEM file holding a certificate",
                 f"{_show(str(cert_file))} ({exc})")
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:  # TypeError: the key is encrypted
        ctx.fail(f"{name}.key_file", "an unencrypted PEM private key",
                 f"{_show(str(key_file))} ({exc})")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, public)
            != cert.public_key().public_bytes(serialization.Encoding.DER, public)):
        ctx.fail(f"{name}.key_file", f"the private key of {name}.cert_file ({str(cert_file)!r})",
                 f"{_show(str(key_file))}, a key that does not match it",
                 related=(f"{name}.cert_file",))


# Field checks: each returns the typed value or raises through ctx.fail.


def _check_number_from(
    ctx: _Context, name: str, value: object, lo: float, hi: float
) -> float:
    """A finite number in [lo, hi]; integers are accepted."""
    wanted = f"a number from {lo:g} to {hi:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ctx.fail(name, wanted, _show_typed(value))
    if not math.isfinite(value) or not lo <= value <= hi:
        ctx.fail(name, wanted, _show(value))
    return float(value)


def _check_int(ctx: _Context, name: str, value: object, lo: int, hi: int | None = None) -> int:
    wanted = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
    if isinstance(value, bool) or not isinstance(value, int):  # bool is an int subclass
        ctx.fail(name, wanted, _show_typed(value))
    if value < lo or (hi is not None and value > hi):
        ctx.fail(name, wanted, _show(value))
    return value


def _check_number(
    ctx: _Context, name: str, value: object, above: float, at_most: float | None
) -> float:
    """A finite number > ``above`` (and <= ``at_most``); integers are accepted."""
    wanted = (
        f"a number > {above:g}" if at_most is None else f"a number > {above:g} and <= {at_most:g}"
    )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ctx.fail(name, wanted, _show_typed(value))
    if not math.isfinite(value) or value <= above or (at_most is not None and value > at_most):
        ctx.fail(name, wanted, _show(value))
    return float(value)


def _check_choice(ctx: _Context, name: str, value: object, choices: tuple[str, ...]) -> str:
    wanted = "one of " + ", ".join(choices)
    if not isinstance(value, str):
        ctx.fail(name, wanted, _show_typed(value))
    if value not in choices:
        ctx.fail(name, wanted, _show(value))
    return value


def _check_name(ctx: _Context, name: str, value: object, max_len: int) -> str:
    """Names become gossip fields and path parts: a safe charset, and never '.' or '..'."""
    wanted = f"a name of 1-{max_len} characters from A-Z a-z 0-9 _ . - (not '.' or '..')"
    if not isinstance(value, str):
        ctx.fail(name, wanted, _show_typed(value))
    if len(value) > max_len or not _NAME_CHARS.fullmatch(value) or value in (".", ".."):
        ctx.fail(name, wanted, _show(value))
    return value


def _check_optional_name(ctx: _Context, name: str, value: object, max_len: int) -> str | None:
    return None if value is None else _check_name(ctx, name, value, max_len)


def _check_host(ctx: _Context, name: str, value: object) -> str:
    wanted = "a host name or IP address (IPv6 without brackets)"
    if not isinstance(value, str):
        ctx.fail(name, wanted, _show_typed(value))
    try:
        return check_host(value)
    except ValueError as exc:
        ctx.fail(name, wanted, f"{_show(value)} ({exc})")


def _check_seeds(ctx: _Context, name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        ctx.fail(name, 'a list of "host:port" strings', _show_typed(value))
    for i, seed in enumerate(value):
        _check_address(ctx, f"{name}[{i}]", seed)
    return tuple(value)


def _check_advertised_address(ctx: _Context, name: str, value: object) -> str | None:
    """An address told to others: a dialable "host:port" (never a wildcard), or null."""
    if value is None:
        return None
    address = _check_address(ctx, name, value)
    if is_wildcard(parse_address(address)[0]):
        ctx.fail(name, 'a "host:port" others can dial (not a wildcard such as 0.0.0.0 or ::)',
                 _show(value))
    return address


def _bare_host(address: str) -> bool:
    """A host without a port: a name, an IPv4 address or a bracketed IPv6 one."""
    return ":" not in address or (address.startswith("[") and address.endswith("]"))


def _check_advertised_client(ctx: _Context, name: str, value: object) -> str | None:
    """The client API's address told to others: "host:port", or just a host (its port
    is then cluster.client_port); never a wildcard; or null."""
    if not isinstance(value, str) or not _bare_host(value):
        return _check_advertised_address(ctx, name, value)
    try:
        host = check_host(value[1:-1] if value.startswith("[") else value)
    except ValueError as exc:
        ctx.fail(name, 'a "host:port" or a host others can dial', f"{_show(value)} ({exc})")
    if value.startswith("[") and ":" not in host:
        ctx.fail(name, 'a "host:port" or a host others can dial (brackets are for IPv6 '
                 "addresses)", _show(value))
    if is_wildcard(host):
        ctx.fail(name, 'a "host:port" or a host others can dial (not a wildcard such as '
                 "0.0.0.0 or ::)", _show(value))
    return value


def _check_bool(ctx: _Context, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        ctx.fail(name, "true or false", _show_typed(value))
    return value


def _check_address(ctx: _Context, name: str, value: object) -> str:
    if not isinstance(value, str):
        ctx.fail(name, 'a "host:port" string', _show_typed(value))
    try:
        parse_address(value)
    except ValueError as exc:
        ctx.fail(
            name,
            'a "host:port" string with port 1-65535 ([v6addr]:port for IPv6)',
            f"{_show(value)} ({exc})",
        )
    return value


def _check_path(ctx: _Context, name: str, value: object) -> Path:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        ctx.fail(name, "a non-empty directory path", _show_typed(value))
    return Path(value)


def _check_consistency(ctx: _Context, name: str, value: object) -> ConsistencyLevel:
    usable = [level.value for level in ConsistencyLevel if level is not ConsistencyLevel.ANY]
    wanted = "one of " + ", ".join(usable) + " (not ANY: it is write-only; SERIAL: transactional)"
    if not isinstance(value, str):
        ctx.fail(name, wanted, _show_typed(value))
    try:
        # write=False rejects ANY: a keyspace default must also be valid for reads.
        return ConsistencyLevel.parse(value, field=name, write=False)
    except BadRequest:
        ctx.fail(name, wanted, _show(value))


# Messages.


def _show(value: object) -> str:
    """A value as the operator wrote it in YAML terms, cut short if long."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _show_typed(value: object) -> str:
    """A value plus its YAML type, for type errors ('true (a boolean)')."""
    kinds = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        tuple: "a list",
        dict: "a mapping",
        type(None): "no value",
    }
    kind = kinds.get(type(value), type(value).__name__)
    return f"{_show(value)} ({kind})"


def _known_key_hint(key: str, known: Mapping[str, object] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    if close:
        return f"a known key (did you mean {close[0]!r}?)"
    return "one of " + ", ".join(known)


def _field_names(cls: type, skip: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in skip)


# Section name -> its keys, in file order. Drives unknown-key checks and overrides.
_SECTIONS: dict[str, tuple[str, ...]] = {
    "cluster": _field_names(ClusterConfig),
    "keyspaces": (),  # keyed by keyspace name
    "timing": _field_names(TimingConfig),
    "storage": _field_names(StorageConfig),
    "limits": _field_names(LimitsConfig),
    "truetime": _field_names(TrueTimeConfig),
    "txn": _field_names(TxnConfig),
    "repair": _field_names(RepairConfig),
    "streaming": _field_names(StreamingConfig),
    "tls": _field_names(TlsConfig),
    "auth": _field_names(AuthConfig),
}
_TLS_LINKS = _field_names(TlsConfig)
_TLS_FILE_KEYS = _field_names(TlsFilesConfig)
_KEYSPACE_KEYS = _field_names(KeyspaceConfig, skip=("name",))
