"""Config loading and validation (ringkv/config.py, conf/ringkv.yaml)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from ringkv.config import (
    ClusterConfig,
    Config,
    KeyspaceConfig,
    LimitsConfig,
    StorageConfig,
    StreamingConfig,
    TimingConfig,
    TrueTimeConfig,
    TxnConfig,
    TlsConfig,
    AuthConfig,
    TlsFilesConfig,
    RepairConfig,
    config_from_dict,
    default_config,
    load_config,
)
from ringkv.errors import ConfigError
from ringkv.quorum import ConsistencyLevel

CONF = Path(__file__).resolve().parent.parent / "conf" / "ringkv.yaml"


def write_yaml(tmp_path: Path, data: object, name: str = "node.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# --- defaults and the reference file ---------------------------------------


def test_defaults():
    config = default_config()
    assert config == Config()
    assert config.source is None
    assert config.cluster.node_id == "node1"
    assert config.cluster.client_port == 7400
    assert config.cluster.seeds == ("127.0.0.1:7500",)
    assert config.cluster.broadcast_internode is None
    assert config.cluster.internode_address == "127.0.0.1:7500"
    assert config.cluster.data_dir == Path("data")
    assert config.keyspaces == {
        "default": KeyspaceConfig("default", 3, "eventual", ConsistencyLevel.QUORUM),
        "txn": KeyspaceConfig("txn", 3, "transactional", ConsistencyLevel.SERIAL),
    }
    assert config.timing.read_timeout_ms == 2000
    assert config.timing.phi_threshold == 8.0
    assert config.timing.phi_max_interval_ms == 2000
    assert config.storage.commit_sync == "periodic"
    assert config.limits.max_value_bytes == 1048576
    assert config.node_data_dir == Path("data") / "node1"
    assert load_config(None) == config


def test_reference_yaml_equals_defaults():
    config = load_config(CONF)
    assert config == default_config()
    assert config.source == str(CONF)


def test_reference_yaml_lists_and_documents_every_field():
    data = yaml.safe_load(CONF.read_text(encoding="utf-8"))
    sections = {
        "cluster": ClusterConfig,
        "timing": TimingConfig,
        "storage": StorageConfig,
        "limits": LimitsConfig,
        "truetime": TrueTimeConfig,
        "txn": TxnConfig,
        "repair": RepairConfig,
        "streaming": StreamingConfig,
        "tls": TlsConfig,
        "auth": AuthConfig,
    }
    assert list(data) == ["cluster", "keyspaces", "timing", "storage", "limits", "truetime", "txn",
                          "repair", "streaming", "tls", "auth"]
    for link in ("client", "internode"):
        assert list(data["tls"][link]) == [f.name for f in dataclasses.fields(TlsFilesConfig)]
    for section, cls in sections.items():
        assert list(data[section]) == [f.name for f in dataclasses.fields(cls)], section
    assert list(data["keyspaces"]["default"]) == [
        "replication_factor",
        "tier",
        "default_consistency",
    ]
    # Every line that sets a key carries a comment explaining it.
    for line in CONF.read_text(encoding="utf-8").splitlines():
        if re.match(r"^\s+\w+:", line):
            assert "#" in line, f"undocumented: {line!r}"


def test_empty_file_and_empty_sections_mean_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n", encoding="utf-8")
    assert load_config(empty) == default_config()
    sections = tmp_path / "sections.yaml"
    sections.write_text("cluster:\ntiming:\nkeyspaces:\n", encoding="utf-8")
    assert load_config(sections) == default_config()


def test_partial_file_keeps_other_defaults(tmp_path):
    path = write_yaml(
        tmp_path, {"timing": {"read_timeout_ms": 50}, "storage": {"engine": "memory"}}
    )
    config = load_config(path)
    assert config.timing.read_timeout_ms == 50
    assert config.timing.write_timeout_ms == 2000
    assert config.storage.engine == "memory"
    assert config.cluster == ClusterConfig()


def test_keyspaces_section_replaces_default_list(tmp_path):
    path = write_yaml(
        tmp_path,
        {
            "keyspaces": {
                "orders": {"replication_factor": 5, "tier": "eventual"},
                "cache": {"replication_factor": 1, "default_consistency": "one"},
            }
        },
    )
    config = load_config(path)
    assert list(config.keyspaces) == ["orders", "cache"]
    assert config.keyspaces["orders"] == KeyspaceConfig(
        "orders", 5, "eventual", ConsistencyLevel.QUORUM
    )
    assert config.keyspaces["cache"].default_consistency is ConsistencyLevel.ONE
    assert load_config(write_yaml(tmp_path, {"keyspaces": {}}, "none.yaml")).keyspaces == {}


def test_to_dict_is_json_safe_and_round_trips():
    config = load_config(
        None,
        {
            "cluster.data_dir": "/var/lib/ringkv",
            "keyspaces.tx.replication_factor": 5,
            "timing.phi_threshold": 12,
        },
    )
    as_dict = json.loads(json.dumps(config.to_dict()))
    assert as_dict["cluster"]["data_dir"] == "/var/lib/ringkv"
    assert as_dict["keyspaces"]["tx"] == {
        "replication_factor": 5,
        "tier": "eventual",
        "default_consistency": "QUORUM",
    }
    assert config_from_dict(as_dict) == config


def test_config_is_frozen():
    config = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.timing.read_timeout_ms = 1  # type: ignore[misc]


def test_seed_addresses():
    config = load_config(
        None, {"cluster.seeds": ["10.0.0.1:7500", "[::1]:7501", "db-2.local:7502"]}
    )
    assert config.cluster.seed_addresses == (
        ("10.0.0.1", 7500),
        ("::1", 7501),
        ("db-2.local", 7502),
    )


def test_broadcast_internode_is_the_address_peers_are_told():
    config = load_config(None, {"cluster.listen_host": "127.0.0.2", "cluster.internode_port": 7501})
    assert config.cluster.internode_address == "127.0.0.2:7501"
    config = load_config(None, {"cluster.broadcast_internode": "127.0.0.2:9501"})
    assert config.cluster.internode_address == "127.0.0.2:9501"
    assert config.cluster.internode_port == 7500  # still where it listens
    assert config_from_dict(config.to_dict()) == config


def test_ipv6_listen_host_is_bracketed_in_the_addresses_it_gossips():
    config = load_config(None, {"cluster.listen_host": "::1", "cluster.seeds": ["[::1]:7500"]})
    assert config.cluster.internode_address == "[::1]:7500"
    assert config.cluster.client_address == "[::1]:7400"
    assert config.cluster.seed_addresses == (("::1", 7500),)


def test_node_flags_are_overrides():
    from ringkv.cli import _node_overrides, build_parser

    args = build_parser().parse_args(
        ["node", "--host", "127.0.0.3", "--broadcast-internode", "127.0.0.3:9502"]
    )
    assert _node_overrides(args) == {
        "cluster.listen_host": "127.0.0.3", "cluster.broadcast_internode": "127.0.0.3:9502"
    }


# --- overrides ---------------------------------------------------------------


def test_overrides_win_over_file(tmp_path):
    path = write_yaml(tmp_path, {"cluster": {"node_id": "a", "client_port": 8000}})
    config = load_config(
        path,
        {
            "cluster.node_id": "n2",
            "cluster.client_port": 7401,
            "cluster.internode_port": 7501,
            "cluster.seeds": ["127.0.0.1:7500", "127.0.0.2:7500"],
            "cluster.data_dir": tmp_path,
            "storage.engine": "memory",
        },
    )
    assert config.cluster.node_id == "n2"
    assert config.cluster.client_port == 7401
    assert config.cluster.internode_port == 7501
    assert config.cluster.seeds == ("127.0.0.1:7500", "127.0.0.2:7500")
    assert config.storage.engine == "memory"
    assert config.node_data_dir == tmp_path / "n2"
    assert config.source == str(path)


def test_override_adds_keyspace_and_keeps_defaults():
    config = load_config(
        None, {"keyspaces.orders.replication_factor": 1, "keyspaces.default.tier": "eventual"}
    )
    assert set(config.keyspaces) == {"default", "txn", "orders"}
    assert config.keyspaces["orders"].replication_factor == 1
    assert config.keyspaces["default"] == KeyspaceConfig("default")


def test_override_does_not_mutate_file_data(tmp_path):
    path = write_yaml(tmp_path, {"cluster": {"node_id": "a"}})
    load_config(path, {"cluster.node_id": "b"})
    assert load_config(path).cluster.node_id == "a"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"cluster.nodeid": "x"}, "cluster.nodeid"),
        ({"clustr.node_id": "x"}, "clustr.node_id"),
        ({"cluster.node_id.x": "x"}, "cluster.node_id.x"),
        ({"keyspaces.default.rf": 1}, "keyspaces.default.rf"),
        ({"cluster.client_port": "7401"}, "cluster.client_port"),
        ({"cluster.seeds": ["nohost"]}, "cluster.seeds[0]"),
        ({"cluster.client_port": 7500}, "cluster.internode_port"),
    ],
)
def test_bad_override_names_overrides(tmp_path, overrides, field):
    path = write_yaml(tmp_path, {"cluster": {"node_id": "a"}})
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert info.value.field == field
    assert info.value.source == "<overrides>"
    assert str(info.value).startswith(f"<overrides>: {field}: expected ")


# --- bad fields ----------------------------------------------------------------

BAD_FIELDS = [
    # (yaml data, expected .field, text the message must contain)
    ({"cluster": {"name": ""}}, "cluster.name", "got ''"),
    ({"cluster": {"node_id": "node 1"}}, "cluster.node_id", "got 'node 1'"),
    ({"cluster": {"node_id": ".."}}, "cluster.node_id", "not '.' or '..'"),
    ({"cluster": {"node_id": "n" * 65}}, "cluster.node_id", "1-64 characters"),
    ({"cluster": {"node_id": 7}}, "cluster.node_id", "got 7 (an integer)"),
    ({"cluster": {"listen_host": ""}}, "cluster.listen_host", "a host name or IP address"),
    (
        {"cluster": {"client_port": 0}},
        "cluster.client_port",
        "expected an integer from 1 to 65535, got 0",
    ),
    ({"cluster": {"internode_port": 65536}}, "cluster.internode_port", "got 65536"),
    ({"cluster": {"client_port": "7400"}}, "cluster.client_port", "got '7400' (a string)"),
    ({"cluster": {"client_port": 7400.0}}, "cluster.client_port", "got 7400.0 (a number)"),
    (
        {"cluster": {"client_port": 7500}},
        "cluster.internode_port",
        "different from cluster.client_port",
    ),
    ({"cluster": {"native_port": 7400}}, "cluster.native_port", "different from cluster.client_port"),
    ({"cluster": {"native_port": 7500}}, "cluster.native_port", "0 (no native listener)"),
    ({"cluster": {"native_port": -1}}, "cluster.native_port", "from 0 to 65535"),
    ({"cluster": {"seeds": "127.0.0.1:7500"}}, "cluster.seeds", "a list of"),
    ({"cluster": {"seeds": ["127.0.0.1"]}}, "cluster.seeds[0]", "got '127.0.0.1'"),
    ({"cluster": {"seeds": ["a:1", "b:99999"]}}, "cluster.seeds[1]", "got 'b:99999'"),
    ({"cluster": {"seeds": ["::1:7500"]}}, "cluster.seeds[0]", "[v6addr]:port"),
    ({"cluster": {"seeds": ["[::1:7500"]}}, "cluster.seeds[0]", "no closing ']'"),
    ({"cluster": {"seeds": ["h:75x"]}}, "cluster.seeds[0]", "'75x' is not a decimal number"),
    ({"cluster": {"listen_host": "[::1]"}}, "cluster.listen_host", "IPv6 without brackets"),
    ({"cluster": {"listen_host": "my host"}}, "cluster.listen_host", "may hold only letters"),
    ({"cluster": {"seeds": [7500]}}, "cluster.seeds[0]", "got 7500 (an integer)"),
    ({"cluster": {"broadcast_internode": "127.0.0.2"}}, "cluster.broadcast_internode",
     "got '127.0.0.2'"),
    ({"cluster": {"broadcast_internode": 9500}}, "cluster.broadcast_internode",
     "got 9500 (an integer)"),
    ({"cluster": {"data_dir": ""}}, "cluster.data_dir", "non-empty directory path"),
    ({"cluster": {"data_dir": None}}, "cluster.data_dir", "got null"),
    ({"cluster": {"num_tokens": 0}}, "cluster.num_tokens", "from 1 to 256, got 0"),
    ({"cluster": {"num_tokens": 257}}, "cluster.num_tokens", "got 257"),
    ({"cluster": {"rack": "rack/1"}}, "cluster.rack", "got 'rack/1'"),
    ({"cluster": "node1"}, "cluster", "expected a mapping"),
    ({"keyspaces": ["default"]}, "keyspaces", "a mapping of keyspace name"),
    ({"keyspaces": {"k" * 49: {}}}, "keyspaces." + "k" * 49, "1-48 characters"),
    ({"keyspaces": {"bad name": {}}}, "keyspaces.bad name", "got 'bad name'"),
    ({"keyspaces": {"ks": 3}}, "keyspaces.ks", "expected a mapping"),
    (
        {"keyspaces": {"ks": {"replication_factor": 0}}},
        "keyspaces.ks.replication_factor",
        "from 1 to 15",
    ),
    (
        {"keyspaces": {"ks": {"replication_factor": 16}}},
        "keyspaces.ks.replication_factor",
        "got 16",
    ),
    (
        {"keyspaces": {"ks": {"tier": "strong"}}},
        "keyspaces.ks.tier",
        "one of eventual, transactional",
    ),
    (  # a transactional keyspace is SERIAL: an eventual level would break what it promises
        {"keyspaces": {"ks": {"tier": "transactional", "default_consistency": "QUORUM"}}},
        "keyspaces.ks.default_consistency",
        "SERIAL on a transactional keyspace",
    ),
    (
        {"keyspaces": {"ks": {"default_consistency": "SERIAL"}}},
        "keyspaces.ks.default_consistency",
        "SERIAL needs tier: transactional",
    ),
    ({"truetime": {"min_uncertainty_ms": -1}}, "truetime.min_uncertainty_ms", "from 0 to 1000"),
    ({"truetime": {"max_drift_ppm": 1.5}}, "truetime.max_drift_ppm", "got 1.5 (a number)"),
    ({"truetime": {"max_uncertainty_ms": 0}}, "truetime.max_uncertainty_ms", "got 0"),
    ({"truetime": {"min_uncertainty_ms": 5, "max_uncertainty_ms": 5}},
     "truetime.max_uncertainty_ms", "more than truetime.min_uncertainty_ms"),
    ({"truetime": {"sync_interval_ms": 1}}, "truetime.sync_interval_ms", "from 10 to 60000"),
    ({"truetime": {"sync": 1}}, "truetime.sync", "unknown key"),
    ({"txn": {"lease_s": 0}}, "txn.lease_s", "a number > 0"),
    ({"txn": {"lease_s": 0.1}}, "txn.lease_s", "from 0.2 to 60"),
    ({"txn": {"lease_s": "2"}}, "txn.lease_s", "(a string)"),
    ({"txn": {"mvcc_gc_s": 0}}, "txn.mvcc_gc_s", "got 0"),
    ({"txn": {"safe_time_interval_ms": 5}}, "txn.safe_time_interval_ms", "from 10 to 60000"),
    ({"txn": {"max_conflict_retries": 101}}, "txn.max_conflict_retries", "got 101"),
    (
        {"keyspaces": {"ks": {"default_consistency": "ANY"}}},
        "keyspaces.ks.default_consistency",
        "got 'ANY'",
    ),
    (
        {"keyspaces": {"ks": {"default_consistency": "MOST"}}},
        "keyspaces.ks.default_consistency",
        "QUORUM",
    ),
    (
        {"keyspaces": {"ks": {"replication_factor": 2, "default_consistency": "THREE"}}},
        "keyspaces.ks.default_consistency",
        "replication_factor 2 can meet",
    ),
    ({"timing": {"phi_threshold": -1}}, "timing.phi_threshold", "expected a number > 0, got -1"),
    ({"timing": {"phi_threshold": 0}}, "timing.phi_threshold", "got 0"),
    ({"timing": {"phi_threshold": float("inf")}}, "timing.phi_threshold", "got inf"),
    ({"timing": {"phi_threshold": "8"}}, "timing.phi_threshold", "(a string)"),
    ({"timing": {"phi_max_interval_ms": 0}}, "timing.phi_max_interval_ms", "from 1 to 3600000, got 0"),
    ({"timing": {"phi_max_interval_ms": 2.5}}, "timing.phi_max_interval_ms", "(a number)"),
    ({"timing": {"phi_max_interval_ms": 10**400}}, "timing.phi_max_interval_ms", "from 1 to 3600000"),
    (
        {"timing": {"phi_max_interval_ms": 1000}},
        "timing.phi_max_interval_ms",
        "more than timing.gossip_interval_ms (1000), got 1000",
    ),
    (
        {"timing": {"gossip_interval_ms": 5000}},
        "timing.phi_max_interval_ms",
        "more than timing.gossip_interval_ms (5000), got 2000",
    ),
    ({"timing": {"read_timeout_ms": 0}}, "timing.read_timeout_ms", "an integer from 1 to 3600000, got 0"),
    ({"timing": {"write_timeout_ms": -5}}, "timing.write_timeout_ms", "got -5"),
    ({"timing": {"gossip_interval_ms": 0}}, "timing.gossip_interval_ms", "from 1 to 60000"),
    ({"timing": {"max_hint_window_s": -1}}, "timing.max_hint_window_s", "an integer from 0 to"),
    ({"timing": {"hint_replay_rate_per_s": 0}}, "timing.hint_replay_rate_per_s", "from 1 to"),
    ({"timing": {"gc_grace_s": 1.5}}, "timing.gc_grace_s", "(a number)"),
    ({"repair": {"interval_s": 864000}}, "repair.interval_s",
     "less than timing.gc_grace_s (864000), or 0 for half of it, got 864000"),
    ({"timing": {"gc_grace_s": 10}, "repair": {"interval_s": 10}}, "repair.interval_s",
     "less than timing.gc_grace_s (10)"),
    ({"repair": {"tombstone_gc": "never"}}, "repair.tombstone_gc", "one of"),
    ({"repair": {"scheduled": "yes"}}, "repair.scheduled", "true or false"),
    ({"repair": {"scan_rate_mib_s": 0}}, "repair.scan_rate_mib_s", "from 0.01"),
    ({"timing": {"default_ttl_s": -1}}, "timing.default_ttl_s", "from 0 to 630720000"),
    ({"timing": {"tombstone_sweep_interval_s": 0}}, "timing.tombstone_sweep_interval_s", "from 1 to"),
    (
        {"timing": {"speculative_retry_percentile": 101}},
        "timing.speculative_retry_percentile",
        "<= 100",
    ),
    ({"timing": {"speculative_retry_min_ms": -1}}, "timing.speculative_retry_min_ms", "from 0 to"),
    ({"timing": {"shutdown_drain_timeout_s": -1}}, "timing.shutdown_drain_timeout_s", "from 0 to 3600"),
    ({"storage": {"engine": "rocksdb"}}, "storage.engine", "one of leveldb, memory, got 'rocksdb'"),
    ({"storage": {"commit_sync": "always"}}, "storage.commit_sync", "one of periodic, batch"),
    ({"storage": {"periodic_sync_interval_ms": 0}}, "storage.periodic_sync_interval_ms", "from 1 to"),
    ({"storage": {"leveldb_cache_mb": 0}}, "storage.leveldb_cache_mb", "from 1 to"),
    ({"storage": {"leveldb_write_buffer_mb": "16MB"}}, "storage.leveldb_write_buffer_mb", "'16MB'"),
    ({"limits": {"max_key_bytes": 65536}}, "limits.max_key_bytes", "from 1 to 65535"),
    ({"limits": {"max_value_bytes": 0}}, "limits.max_value_bytes", "from 1 to 15728640"),
    (
        {"limits": {"max_request_bytes": 100}},
        "limits.max_value_bytes",
        "at most limits.max_request_bytes (100)",
    ),
    ({"limits": {"max_batch_ops": 0}}, "limits.max_batch_ops", "from 1 to"),
    ({"limits": {"max_scan_page": -1}}, "limits.max_scan_page", "from 1 to 10000"),
    # Too large to mean anything: named here, rather than an overflow at start-up.
    ({"timing": {"read_timeout_ms": 10**400}}, "timing.read_timeout_ms", "from 1 to 3600000"),
    ({"storage": {"periodic_sync_interval_ms": 10**400}}, "storage.periodic_sync_interval_ms",
     "from 1 to 3600000"),
    ({"limits": {"max_value_bytes": 64 * 2**20}}, "limits.max_value_bytes", "from 1 to 15728640"),
]


@pytest.mark.parametrize(
    ("data", "field", "text"), BAD_FIELDS, ids=[case[1] for case in BAD_FIELDS]
)
def test_bad_field(tmp_path, data, field, text):
    path = write_yaml(tmp_path, data, "bad.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert info.value.field == field
    assert info.value.source == str(path)
    assert message.startswith(f"{path}: {field}: expected "), message
    assert text in message


def test_bool_is_not_an_int(tmp_path):
    path = tmp_path / "bool.yaml"
    path.write_text("cluster:\n  num_tokens: true\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "cluster.num_tokens"
    assert (
        str(info.value)
        == f"{path}: cluster.num_tokens: expected an integer from 1 to 256, got true (a boolean)"
    )
    with pytest.raises(ConfigError, match="got false"):
        config_from_dict({"timing": {"phi_threshold": False}})


@pytest.mark.parametrize(
    ("text", "field", "hint"),
    [
        (
            "timing:\n  read_timout_ms: 10\n",
            "timing.read_timout_ms",
            "did you mean 'read_timeout_ms'?",
        ),
        ("clustr:\n  node_id: a\n", "clustr", "did you mean 'cluster'?"),
        ("keyspaces:\n  default:\n    rf: 3\n", "keyspaces.default.rf", "replication_factor"),
        ("limits:\n  zzz: 1\n", "limits.zzz", "one of max_key_bytes"),
    ],
)
def test_unknown_key_rejected(tmp_path, text, field, hint):
    path = tmp_path / "typo.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == field
    assert str(info.value).startswith(f"{path}: {field}: expected ")
    assert "unknown" in str(info.value)
    assert hint in str(info.value)


# --- file-level problems ---------------------------------------------------------


def test_bad_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("cluster:\n  node_id: [n1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "<file>"
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: <file>: expected valid YAML, got ")
    assert "line " in str(info.value)


def test_duplicate_key_rejected(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("cluster:\n  node_id: a\n  node_id: b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"duplicate key 'node_id' at line 3") as info:
        load_config(path)
    assert info.value.field == "<file>"


def test_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- cluster\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"expected a mapping of sections") as info:
        load_config(path)
    assert info.value.field == "<file>"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "<file>"
    assert info.value.source == str(path)
    assert (
        str(info.value)
        == f"{path}: <file>: expected a readable config file, got No such file or directory"
    )


def test_config_from_dict_labels():
    with pytest.raises(ConfigError, match=r"^<dict>: cluster.num_tokens: "):
        config_from_dict({"cluster": {"num_tokens": 0}})
    with pytest.raises(ConfigError, match=r"^admin-api: cluster.num_tokens: "):
        config_from_dict({"cluster": {"num_tokens": 0}}, source="admin-api")
    assert config_from_dict({}, source="x").source == "x"


# --- wildcard binds (issue #10) ----------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "0:0::0"])
@pytest.mark.parametrize(
    "given, missing, also",
    [
        ({}, "cluster.broadcast_internode", "also missing: cluster.broadcast_client"),
        ({"cluster.broadcast_client": "10.0.0.1:7400"}, "cluster.broadcast_internode", None),
        ({"cluster.broadcast_internode": "10.0.0.1:7500"}, "cluster.broadcast_client", None),
    ],
)
def test_a_wildcard_listen_host_needs_both_advertised_addresses(host, given, missing, also):
    # Without them every node gossips 0.0.0.0:7500, dials itself and forms a
    # one-node ring of its own: the cluster splits silently.
    with pytest.raises(ConfigError) as err:
        load_config(None, {"cluster.listen_host": host, **given})
    assert err.value.field == missing
    assert err.value.source == "<overrides>"
    assert err.value.message.startswith(f"<overrides>: {missing}: expected")
    assert "is a wildcard" in err.value.message
    if also:
        assert also in err.value.message
    else:
        assert "also missing" not in err.value.message


def test_a_wildcard_listen_host_in_a_file_is_reported_against_the_file(tmp_path):
    path = write_yaml(tmp_path, {"cluster": {"listen_host": "0.0.0.0"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.field == "cluster.broadcast_internode"
    assert err.value.message.startswith(f"{path}: cluster.broadcast_internode: expected")


def test_a_wildcard_listen_host_with_both_broadcasts_advertises_them():
    config = load_config(None, {
        "cluster.listen_host": "0.0.0.0",
        "cluster.broadcast_internode": "10.0.0.1:7500",
        "cluster.broadcast_client": "db-1.example:7400",
    })
    assert config.cluster.listen_host == "0.0.0.0"  # still where it binds
    assert config.cluster.internode_address == "10.0.0.1:7500"
    assert config.cluster.client_address == "db-1.example:7400"
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", ["broadcast_internode", "broadcast_client"])
@pytest.mark.parametrize("address", ["0.0.0.0:7500", "[::]:7500"])
def test_an_advertised_address_may_not_be_a_wildcard(name, address):
    with pytest.raises(ConfigError) as err:
        load_config(None, {f"cluster.{name}": address})
    assert err.value.field == f"cluster.{name}"
    assert "not a wildcard" in err.value.message


def test_a_wildcard_listen_host_in_a_file_names_the_missing_broadcast_client(tmp_path):
    """With the internode side given, the file, field and reason of the one missing."""
    path = write_yaml(tmp_path, {"cluster": {"listen_host": "::",
                                             "broadcast_internode": "[fd00::1]:7500"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.field == "cluster.broadcast_client"
    assert err.value.message.startswith(f"{path}: cluster.broadcast_client: expected")
    assert "'::' is a wildcard" in err.value.message


def test_a_misspelt_broadcast_client_is_pointed_at_the_right_name(tmp_path):
    path = write_yaml(tmp_path, {"cluster": {"listen_host": "0.0.0.0",
                                             "broadcast_internode": "10.0.0.1:7500",
                                             "broadcast_clinet": "10.0.0.1:7400"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.field == "cluster.broadcast_clinet"
    assert "did you mean 'broadcast_client'?" in err.value.message
    assert err.value.message.startswith(f"{path}: ")


@pytest.mark.parametrize("given, advertised", [
    ("db-1.example", "db-1.example:7410"),  # a host alone: the port is client_port
    ("10.0.0.1", "10.0.0.1:7410"),
    ("[fd00::1]", "[fd00::1]:7410"),
    ("lb.example:80", "lb.example:80"),  # a port of its own: a proxy's, a NAT's
])
def test_broadcast_client_may_be_a_host_alone(given, advertised):
    config = load_config(None, {"cluster.listen_host": "0.0.0.0",
                                "cluster.broadcast_internode": "10.0.0.1:7500",
                                "cluster.client_port": 7410,
                                "cluster.broadcast_client": given})
    assert config.cluster.client_address == advertised
    assert config.cluster.native_address == advertised.rpartition(":")[0] + ":7600"
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize("bad", ["0.0.0.0", "::", "[::]", "[db-1.example]", "bad host", "x:0"])
def test_broadcast_client_must_be_dialable(bad):
    with pytest.raises(ConfigError) as err:
        load_config(None, {"cluster.broadcast_client": bad})
    assert err.value.field == "cluster.broadcast_client"


def test_broadcast_client_is_the_client_address_told_to_others():
    config = load_config(None, {"cluster.broadcast_client": "127.0.0.9:9400"})
    assert config.cluster.client_address == "127.0.0.9:9400"
    assert config.cluster.client_port == 7400  # still where it listens


def test_bootstrap_new_cluster_is_a_boolean():
    assert default_config().cluster.bootstrap_new_cluster is False
    assert load_config(None, {"cluster.bootstrap_new_cluster": True}).cluster.bootstrap_new_cluster
    with pytest.raises(ConfigError) as err:
        load_config(None, {"cluster.bootstrap_new_cluster": "yes"})
    assert err.value.field == "cluster.bootstrap_new_cluster"


def test_broadcast_client_and_bootstrap_flags_are_overrides():
    from ringkv.cli import _node_overrides, build_parser

    args = build_parser().parse_args([
        "node", "--host", "0.0.0.0", "--broadcast-internode", "10.0.0.1:7500",
        "--broadcast-client", "10.0.0.1:7400", "--bootstrap-new-cluster",
    ])
    assert _node_overrides(args) == {
        "cluster.listen_host": "0.0.0.0",
        "cluster.broadcast_internode": "10.0.0.1:7500",
        "cluster.broadcast_client": "10.0.0.1:7400",
        "cluster.bootstrap_new_cluster": True,
    }
    assert "cluster.bootstrap_new_cluster" not in _node_overrides(build_parser().parse_args(["node"]))


def test_transactional_keyspace_is_serial_by_default():
    config = config_from_dict({"keyspaces": {"default": {}, "txn": {"tier": "transactional"}}})
    assert config.keyspaces["txn"].default_consistency is ConsistencyLevel.SERIAL
    assert config.keyspaces["default"].default_consistency is ConsistencyLevel.QUORUM
    assert config.transactional_keyspaces() == ["txn"]
    assert config_from_dict(config.to_dict()) == config
    assert default_config().transactional_keyspaces() == ["txn"]
    assert config_from_dict({"keyspaces": {"default": {}}}).transactional_keyspaces() == []
    assert default_config().truetime == TrueTimeConfig(1.0, 200, 250, 1000)
    assert default_config().txn == TxnConfig(2.0, 600, 200, 8)


def test_a_transactional_keyspace_is_cut_into_fixed_ranges_and_only_it() -> None:
    config = config_from_dict({"keyspaces": {"txn": {"tier": "transactional", "ranges": 8}}})
    assert config.keyspaces["txn"].ranges == 8
    assert config_from_dict(config.to_dict()) == config
    assert default_config().keyspaces["txn"].ranges == 1
    with pytest.raises(ConfigError, match="keyspaces.default.ranges") as info:
        config_from_dict({"keyspaces": {"default": {"ranges": 4}}})
    assert "only a transactional keyspace" in str(info.value)
    for bad in (0, 257, "many"):
        with pytest.raises(ConfigError, match="keyspaces.txn.ranges"):
            config_from_dict({"keyspaces": {"txn": {"tier": "transactional", "ranges": bad}}})


def test_the_repair_interval_defaults_to_half_of_gc_grace() -> None:
    """ScyllaDB's tombstone_gc: repair needs a repair within gc_grace; half leaves room."""
    assert default_config().repair_interval_s() == 432000
    small = config_from_dict({"timing": {"gc_grace_s": 1}})
    assert small.repair_interval_s() == 1  # never 0
    explicit = config_from_dict({"timing": {"gc_grace_s": 100}, "repair": {"interval_s": 60}})
    assert explicit.repair_interval_s() == 60


def test_the_native_port_is_advertised_with_the_client_host():
    """cluster.native_port: the native protocol's port, told to clients on the client API's host."""
    assert load_config(None).cluster.native_address == "127.0.0.1:7600"
    behind = load_config(None, {"cluster.broadcast_client": "10.0.0.9:80"})
    assert behind.cluster.native_address == "10.0.0.9:7600"
    assert load_config(None, {"cluster.native_port": 0}).cluster.native_address is None
