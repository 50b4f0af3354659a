"""``ringkv get|put|del|scan|txn``: the data commands, run as an operator runs them.

One two-node cluster (RF 2) for the module, with TLS on the client link and
authentication on, so every command also proves the --ca-file flag and the
credentials from ``$RINGKV_USER``/``$RINGKV_PASSWORD`` (or ``$RINGKV_TOKEN``).
The commands run through ``ringkv.cli.main`` in this process (their stdout,
stderr and exit code captured), and once as a real ``python -m ringkv.cli``
process reading a transaction from its stdin. Every exit code of the table in
``data_view.EXIT_CODES`` is reached: not found, unavailable (a level the
cluster cannot meet; an unreachable URL), not applied (a failed condition),
unauthorized, usage errors, and timeout (ALL with a killed replica, on a
second small cluster without auth, whose user store the kill would stop).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ringkv import cli
from ringkv.data_cli import credentials
from ringkv.data_view import (
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_NOT_APPLIED,
    EXIT_NOT_FOUND,
    EXIT_TIMEOUT,
    EXIT_UNAUTHORIZED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    exit_code,
    parse_txn_document,
    parse_value,
)
from ringkv.errors import BY_CODE, BadRequest, NoNodeAvailable, RingKVError
from ringkv.tools.launcher import NodeProcess, free_port_block
from ringkv.tools.local_cluster import NO_STREAMING, LocalCluster
from tests.procs import REPO, http, wait_until

pytestmark = pytest.mark.cluster

PRINTED = re.compile(r"superuser 'admin' with password (\S+)")
DATA_COMMANDS = ("get", "put", "del", "delete", "scan", "txn")


# ---- the pure parts: exit codes, values, transaction documents --------------------------

# Every error code a node or the client can raise, and the exit code it must end with.
EXPECTED_EXIT = {
    "bad_request": EXIT_USAGE, "not_found": EXIT_NOT_FOUND, "method_not_allowed": EXIT_ERROR,
    "too_large": EXIT_USAGE, "request_timeout": EXIT_TIMEOUT, "unavailable": EXIT_UNAVAILABLE,
    "timeout": EXIT_TIMEOUT, "overloaded": EXIT_UNAVAILABLE, "shutting_down": EXIT_UNAVAILABLE,
    "not_joined": EXIT_UNAVAILABLE, "clock_uncertain": EXIT_UNAVAILABLE,
    "storage_error": EXIT_ERROR, "corrupt_record": EXIT_ERROR, "snapshot_too_old": EXIT_USAGE,
    "protocol_error": EXIT_USAGE, "peer_unreachable": EXIT_UNAVAILABLE,
    "peer_timeout": EXIT_TIMEOUT, "remote_error": EXIT_ERROR,
    "condition_failed": EXIT_NOT_APPLIED, "aborted": EXIT_NOT_APPLIED,
    "cross_range": EXIT_USAGE, "range_moving": EXIT_UNAVAILABLE, "no_leader": EXIT_UNAVAILABLE,
    "repair_running": EXIT_ERROR, "replica_down": EXIT_UNAVAILABLE,
    "topology_refused": EXIT_ERROR, "unauthenticated": EXIT_UNAUTHORIZED,
    "forbidden": EXIT_UNAUTHORIZED, "too_many_attempts": EXIT_UNAUTHORIZED,
    "snapshot_refused": EXIT_ERROR, "compacted": EXIT_ERROR,
    "lease_expired": EXIT_ERROR,
}


def test_every_error_code_has_its_exit_code() -> None:
    assert set(EXPECTED_EXIT) == set(BY_CODE), "a new error code needs its exit code here"
    for code, cls in BY_CODE.items():
        error = RingKVError.from_json({"error": {"code": code, "message": "m"}},
                                      http_status=cls.http_status)
        assert exit_code(error) == EXPECTED_EXIT[code], code
    # An unknown code falls back on its HTTP status.
    unknown = RingKVError.from_json({"error": {"code": "new_thing", "message": "m"}},
                                    http_status=503)
    assert exit_code(unknown) == EXIT_UNAVAILABLE


def test_no_node_answering_is_unavailable_unless_the_outcome_is_unknown() -> None:
    refused = NoNodeAvailable("x", tried=["u"], reasons=["u: cannot connect: refused"])
    assert exit_code(refused) == EXIT_UNAVAILABLE
    silent = NoNodeAvailable("x", tried=["u"], reasons=["u: no answer within 5 s"],
                             timed_out=True)
    assert exit_code(silent) == EXIT_TIMEOUT
    # Judged by the flag the client sets, never by the words of a reason.
    worded = NoNodeAvailable("x", tried=["u"], reasons=["u: no answer within 5 s"])
    assert exit_code(worded) == EXIT_UNAVAILABLE
    lost_write = NoNodeAvailable("x", tried=["u"], reasons=["u: connection lost: reset"],
                                 maybe_applied=True)
    assert exit_code(lost_write) == EXIT_TIMEOUT


def test_a_value_is_json_when_it_parses_else_a_string() -> None:
    assert parse_value("42") == 42
    assert parse_value('"42"') == "42"
    assert parse_value("42", as_string=True) == "42"
    assert parse_value('{"a": [1, null]}') == {"a": [1, None]}
    assert parse_value("true") is True
    assert parse_value("null") is None
    assert parse_value("hello world") == "hello world"
    assert parse_value("{broken") == "{broken"
    assert parse_value("NaN") == "NaN"  # not JSON, so not a float
    assert parse_value("") == ""


def test_a_bad_transaction_document_names_what_is_wrong() -> None:
    cases = {
        "[1]": "stdin", "{": "stdin", '{"reads": "k"}': "reads",
        '{"writes": [1]}': "writes", '{"id": 5}': "id", '{"read": ["k"]}': "read",
    }
    for text, field in cases.items():
        with pytest.raises(BadRequest) as caught:
            parse_txn_document(text, "stdin")
        assert caught.value.field == field, text
    doc = parse_txn_document('{"keyspace": "txn", "reads": ["a"], "writes": '
                             '[{"op": "delete", "key": "b"}]}', "stdin")
    assert (doc.keyspace, doc.reads, doc.writes) == ("txn", ["a"], [{"op": "delete", "key": "b"}])


def test_credentials_come_from_the_operator_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RINGKV_TOKEN", "RINGKV_USER", "RINGKV_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    assert credentials() == {}
    monkeypatch.setenv("RINGKV_PASSWORD", "pw")
    assert credentials() == {"user": "admin", "password": "pw"}
    monkeypatch.setenv("RINGKV_USER", "app")
    assert credentials() == {"user": "app", "password": "pw"}
    monkeypatch.setenv("RINGKV_TOKEN", "rk1.t")
    assert credentials() == {"token": "rk1.t"}


def test_the_exit_codes_are_documented_in_help_and_readme(capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    with pytest.raises(SystemExit):
        cli.main(["get", "--help"])
    shown = capsys.readouterr().out
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Data commands"):]
    for code, meaning in EXIT_CODES:
        assert f"  {code}  {meaning}" in shown
        assert re.search(rf"^\| {code} \|", section, re.MULTILINE), f"exit code {code}"
    assert "RINGKV_URL" in shown


# ---- against a cluster ------------------------------------------------------------------


@dataclass
class Cluster:
    procs: list[NodeProcess]
    ca_file: str
    admin_password: str

    @property
    def url(self) -> str:
        return self.procs[0].url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    local = LocalCluster(tmp_path_factory.mktemp("datacli"), nodes=2, rf=2, tls=True,
                         base_client_port=free_port_block(2),
                         base_internode_port=free_port_block(2),
                         config_overrides={
                             "auth.enabled": True, "auth.replication_factor": 2,
                             "auth.cache_ttl_s": 0.5})
    try:
        for proc in local.build():
            proc.extra_args.append(NO_STREAMING)  # a new cluster: nothing to stream
            proc.launch()
        for proc in local.procs:
            # /v1/health is open with auth on: it answers 200 once the node is NORMAL.
            wait_until(proc._ready, timeout_s=30, what=f"{proc.node_id} to join")  # noqa: SLF001
        for proc in local.procs:
            proc.extra_args.remove(NO_STREAMING)  # a restart must rejoin as it is

        def printed() -> str | None:
            for proc in local.procs:
                assert proc.log_path is not None
                found = PRINTED.findall(proc.log_path.read_text(errors="replace"))
                if found:
                    return str(found[0])
            return None

        password = wait_until(printed, timeout_s=30, interval_s=0.1,
                              what="a node to create the superuser")
        admin = {"Authorization": "Basic " + base64.b64encode(
            f"admin:{password}".encode()).decode()}

        def logged_in_everywhere() -> bool:  # each node reads the new user store in turn
            return all(http("GET", f"{proc.url}/v1/auth/whoami", headers=admin)[0] == 200
                       for proc in local.procs)

        wait_until(logged_in_everywhere, timeout_s=30, interval_s=0.1,
                   what="every node to know the superuser")
        yield Cluster(local.procs, str(local.certs_dir / "ca.crt"), password)
    finally:
        local.down()


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)  # one document, or this fails


@pytest.fixture
def ringkv(cluster: Cluster, capsys: pytest.CaptureFixture[str],
           monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``ringkv ARGS`` in this process as the cluster's admin, with
    ``$RINGKV_URL`` naming node1; a data command gets the cluster's --ca-file.
    ``stdin``: what the command reads from its standard input."""
    monkeypatch.setenv("RINGKV_URL", cluster.url)
    monkeypatch.setenv("RINGKV_PASSWORD", cluster.admin_password)
    monkeypatch.delenv("RINGKV_USER", raising=False)
    monkeypatch.delenv("RINGKV_TOKEN", raising=False)

    def run(*args: str, stdin: str | None = None) -> Run:
        argv = list(args)
        if argv[0] in DATA_COMMANDS and "--ca-file" not in argv:
            argv += ["--ca-file", cluster.ca_file]
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
        capsys.readouterr()
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse's usage errors (and --help)
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


def rows(table: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in table.strip().splitlines()]


def test_put_get_del_round_trip_as_tables(ringkv: Any) -> None:
    put = ringkv("put", "tour:hello", "world")
    assert (put.code, put.err) == (0, "")
    header, row = rows(put.out)
    assert header == ["KEY", "OP", "WRITTEN", "ACKED BY"]
    assert row[:2] == ["tour:hello", "put"] and set(row[3].split(",")) == {"node1", "node2"}
    got = ringkv("get", "tour:hello")
    assert got.code == 0
    assert rows(got.out)[0] == ["KEY", "VALUE", "WRITTEN", "EXPIRES"]
    assert rows(got.out)[1][:2] == ["tour:hello", '"world"'] and rows(got.out)[1][3] == "-"
    deleted = ringkv("del", "tour:hello")
    assert deleted.code == 0 and rows(deleted.out)[1][:2] == ["tour:hello", "del"]
    gone = ringkv("get", "tour:hello")
    assert (gone.code, gone.out) == (EXIT_NOT_FOUND, "")
    assert gone.err == "ringkv: error: not_found: key 'tour:hello' not found in 'default'\n"


def test_json_output_is_the_apis_answer_and_values_keep_their_type(ringkv: Any) -> None:
    cases = [(["42"], 42), (["42", "--string"], "42"), (['{"a": [1, null]}'], {"a": [1, None]}),
             (["hello world"], "hello world"), (["NaN"], "NaN"), (['"quoted"'], "quoted")]
    for i, (args, value) in enumerate(cases):
        put = ringkv("put", f"json:{i}", *args, "-o", "json")
        assert put.code == 0 and put.json()["ok"] is True, put
        assert len(put.json()["timestamp"]) == 2
        got = ringkv("get", f"json:{i}", "-o", "json")
        assert got.code == 0
        assert got.json()["value"] == value, args
        assert got.json()["key"] == f"json:{i}" and "receipt" in got.json()
    ringkv("put", "json:ttl", "1", "--ttl", "100")
    doc = ringkv("get", "json:ttl", "-o", "json").json()
    assert doc["expires_at_us"] == doc["timestamp"][0] + 100_000_000
    missing = ringkv("get", "json:absent", "-o", "json")
    assert missing.code == EXIT_NOT_FOUND
    assert missing.json()["error"]["code"] == "not_found"
    assert missing.err.startswith("ringkv: error: not_found: ")


def test_the_url_comes_from_the_flag_else_RINGKV_URL(ringkv: Any, cluster: Cluster,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert ringkv("put", "url:k", "1").code == 0  # $RINGKV_URL alone names the node
    monkeypatch.setenv("RINGKV_URL", "https://127.0.0.1:1")  # nothing listens on port 1
    refused = ringkv("get", "url:k")
    assert refused.code == EXIT_UNAVAILABLE
    assert refused.err.startswith("ringkv: error: no_node_available: ") and "127.0.0.1:1" \
        in refused.err
    assert ringkv("get", "url:k", "--url", cluster.url).code == 0  # the flag wins
    # Several nodes, comma-separated: a dead one first is passed over.
    both = ringkv("get", "url:k", "--url", f"https://127.0.0.1:1,{cluster.procs[1].url}")
    assert both.code == 0


def test_keyspace_and_consistency_reach_the_node(ringkv: Any) -> None:
    put = ringkv("put", "ks:k", "7", "--keyspace", "txn", "-o", "json")
    assert put.code == 0 and isinstance(put.json()["version"], int)  # the transactional tier
    assert ringkv("get", "ks:k").code == EXIT_NOT_FOUND  # not in default
    got = ringkv("get", "ks:k", "--keyspace", "txn")
    assert rows(got.out) == [["KEY", "VALUE", "VERSION"], ["ks:k", "7", str(put.json()["version"])]]
    ringkv("put", "ks:e", "1")
    one = ringkv("get", "ks:e", "--consistency", "one", "-o", "json")
    assert one.json()["receipt"]["consistency"] == "ONE"
    # THREE of two replicas: refused by the node (503), nothing tried.
    three = ringkv("get", "ks:e", "--consistency", "THREE", "-o", "json")
    assert three.code == EXIT_UNAVAILABLE
    assert three.json()["error"]["code"] == "unavailable"
    assert three.json()["error"]["required"] == 3
    assert three.err.startswith("ringkv: error: unavailable: ")
    # An eventual level on a transactional keyspace is the caller's mistake.
    assert ringkv("get", "ks:k", "--keyspace", "txn", "--consistency", "ONE").code == EXIT_USAGE
    assert ringkv("get", "ks:k", "--keyspace", "nope").code == EXIT_NOT_FOUND


def scan_all(ringkv: Any, *args: str) -> list[str]:
    """Keys of a scan resumed with --page-token until the end (bounded)."""
    keys: list[str] = []
    token: list[str] = []
    for _ in range(50):
        page = ringkv("scan", *args, *token, "-o", "json")
        assert page.code == 0, page
        doc = page.json()
        keys += [item["key"] for item in doc["items"]]
        if doc["next_page_token"] is None:
            return keys
        token = ["--page-token", doc["next_page_token"]]
    raise AssertionError("the scan did not end")


def test_scan_pages_with_a_bound_and_resumes_exactly(ringkv: Any) -> None:
    wanted = {f"scan:{i:02d}" for i in range(25)}
    for key in sorted(wanted):
        assert ringkv("put", key, key[-2:]).code == 0
    # --prefix filters token-ordered pages; each run stops at --limit, and its
    # token resumes right after the last key shown: nothing missed, nothing twice.
    with_prefix = scan_all(ringkv, "--prefix", "scan:", "--limit", "7")
    assert sorted(with_prefix) == sorted(wanted)
    everything = scan_all(ringkv, "--limit", "1000")
    without = scan_all(ringkv, "--limit", "6")
    assert sorted(without) == sorted(everything) and len(set(without)) == len(without)
    assert wanted <= set(everything)
    # --max-scanned bounds the keys read looking for a prefix.
    bounded = ringkv("scan", "--prefix", "none-such:", "--max-scanned", "3", "-o", "json").json()
    assert (bounded["items"], bounded["scanned"]) == ([], 3)
    assert bounded["next_page_token"] is not None
    table = ringkv("scan", "--prefix", "scan:", "--limit", "2")
    assert [row[0] for row in rows(table.out)] == ["KEY", *with_prefix[:2]]
    assert "more may remain: resume with --page-token " in table.err
    assert ringkv("scan", "--limit", "0").code == EXIT_USAGE
    assert ringkv("scan", "--keyspace", "txn").code == EXIT_USAGE  # not served on that tier


def test_txn_from_stdin_a_file_and_flags(ringkv: Any, tmp_path: Any) -> None:
    seeded = ringkv("txn", "--keyspace", "txn", "--put", "t:a", "100", "--put", "t:b", "0",
                    "--if-absent", "t:a", "-o", "json")
    assert seeded.code == 0 and seeded.json()["committed"] is True, seeded
    document = {"reads": ["t:a", "t:b", "t:none"],
                "conditions": [{"key": "t:a", "equals": 100}],
                "writes": [{"op": "put", "key": "t:a", "value": 70},
                           {"op": "put", "key": "t:b", "value": 30}]}
    moved = ringkv("txn", "--keyspace", "txn", stdin=json.dumps(document))
    assert moved.code == 0, moved
    lines = rows(moved.out)
    assert lines[0] == ["KEY", "VALUE", "VERSION"]
    assert [line[:2] for line in lines[1:4]] == [["t:a", "100"], ["t:b", "0"],
                                                 ["t:none", "(absent)"]]
    assert lines[4][0].startswith("committed ")
    # The keyspace may come from the document; the file may be named.
    path = tmp_path / "read.json"
    path.write_text(json.dumps({"keyspace": "txn", "reads": ["t:a", "t:b"]}))
    read = ringkv("txn", "--file", str(path), "-o", "json").json()
    assert {r["key"]: r["value"] for r in read["reads"]} == {"t:a": 70, "t:b": 30}
    assert read["commit_ts"] is None  # reads only: nothing committed
    deleted = ringkv("txn", "--keyspace", "txn", "--delete", "t:b", "--read", "t:a")
    assert deleted.code == 0
    assert ringkv("get", "t:b", "--keyspace", "txn").code == EXIT_NOT_FOUND


def test_a_failed_condition_is_not_applied(ringkv: Any) -> None:
    first = ringkv("put", "cas:c", "1", "--keyspace", "txn", "--if-absent", "-o", "json")
    assert first.code == 0
    version = first.json()["version"]
    again = ringkv("put", "cas:c", "2", "--keyspace", "txn", "--if-absent")
    assert again.code == EXIT_NOT_APPLIED
    assert again.err.startswith("ringkv: error: condition_failed: ")
    assert ringkv("put", "cas:c", "2", "--keyspace", "txn", "--if-version", str(version)
                  ).code == 0
    stale = ringkv("del", "cas:c", "--keyspace", "txn", "--if-version", str(version),
                   "-o", "json")
    assert stale.code == EXIT_NOT_APPLIED
    assert stale.json()["error"]["current_value"] == 2
    txn = ringkv("txn", "--keyspace", "txn", "--if-equals", "cas:c", "1",
                 "--put", "cas:d", "x", "-o", "json")
    assert txn.code == EXIT_NOT_APPLIED
    assert txn.json()["error"]["code"] == "condition_failed"
    assert ringkv("get", "cas:d", "--keyspace", "txn").code == EXIT_NOT_FOUND


def test_bad_input_is_a_usage_error(ringkv: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = [
        ("get",),  # no KEY: argparse
        ("get", "k", "--consistency", "MOST"),
        ("get", "k", "--consistency", "ANY"),  # for writes only
        ("put", "k", "v", "--ttl", "soon"),
        ("put", "k", "v", "--keyspace", "txn", "--ttl", "5"),  # no TTL on that tier
        ("put", "k", "v", "--keyspace", "txn", "--if-equals", "{not json"),
        ("put", "k", "v", "--if-absent"),  # a condition on an eventual keyspace
        ("txn", "--keyspace", "txn", "--if-version", "k", "soon", "--read", "k"),
        ("txn", "--read", "k"),  # default is eventual
        ("get", "k", "--url", "ftp://x"),
    ]
    for args in cases:
        run = ringkv(*args)
        assert run.code == EXIT_USAGE, (args, run)
        assert run.err.strip(), args
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    waiting = ringkv("txn", "--keyspace", "txn")  # nothing to read: says so, never hangs
    assert waiting.code == EXIT_USAGE and "--file" in waiting.err
    broken = ringkv("txn", "--keyspace", "txn", "-o", "json", stdin='{"reads": ')
    assert broken.code == EXIT_USAGE
    assert broken.json()["error"]["field"] == "stdin"


def test_credentials_and_permissions(ringkv: Any, cluster: Cluster,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    admin = {"Authorization": "Basic " + base64.b64encode(
        f"admin:{cluster.admin_password}".encode()).decode()}
    status, body = http("POST", f"{cluster.url}/v1/auth/users", {
        "name": "reader", "password": "reader-pw",
        "grants": [{"permission": "read", "keyspace": "default"}]}, headers=admin)
    assert status in (200, 201), body
    reader = {"Authorization": "Basic " + base64.b64encode(b"reader:reader-pw").decode()}

    def known_everywhere() -> bool:  # each node's user cache lives auth.cache_ttl_s
        return all(http("GET", f"{proc.url}/v1/auth/whoami", headers=reader)[0] == 200
                   for proc in cluster.procs)

    wait_until(known_everywhere, timeout_s=10, interval_s=0.1, what="every node to know reader")
    assert ringkv("put", "auth:k", "1").code == 0
    monkeypatch.setenv("RINGKV_USER", "reader")
    monkeypatch.setenv("RINGKV_PASSWORD", "reader-pw")
    assert ringkv("get", "auth:k").code == 0
    denied = ringkv("put", "auth:k", "2")
    assert denied.code == EXIT_UNAUTHORIZED
    assert denied.err.startswith("ringkv: error: forbidden: ")
    monkeypatch.setenv("RINGKV_PASSWORD", "wrong")
    assert ringkv("get", "auth:k").code == EXIT_UNAUTHORIZED
    monkeypatch.delenv("RINGKV_PASSWORD")
    nobody = ringkv("get", "auth:k", "-o", "json")
    assert nobody.code == EXIT_UNAUTHORIZED
    assert nobody.json()["error"]["code"] == "unauthenticated"
    status, token = http("POST", f"{cluster.url}/v1/auth/token", headers=admin)
    assert status == 200, token
    monkeypatch.setenv("RINGKV_TOKEN", token["token"])
    assert ringkv("put", "auth:k", "3").code == 0


def test_https_needs_the_ca(ringkv: Any, cluster: Cluster) -> None:
    # Without --ca-file the node's certificate cannot be checked: no node is reached.
    unchecked = ringkv("get", "x", "--ca-file", os.devnull)
    assert unchecked.code == EXIT_USAGE  # a CA file that holds no certificate
    untrusted = subprocess.run(
        [sys.executable, "-m", "ringkv.cli", "get", "x", "--url", cluster.url],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "RINGKV_PASSWORD": cluster.admin_password})
    assert untrusted.returncode == EXIT_UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr


def test_the_command_as_a_process_reads_a_transaction_on_stdin(cluster: Cluster) -> None:
    env = {**os.environ, "RINGKV_URL": cluster.url, "RINGKV_PASSWORD": cluster.admin_password}
    done = subprocess.run(
        [sys.executable, "-m", "ringkv.cli", "txn", "--keyspace", "txn", "-o", "json",
         "--ca-file", cluster.ca_file],
        input=json.dumps({"id": "cli-proc-1", "writes": [{"op": "put", "key": "p:k",
                                                          "value": [1, 2]}]}),
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["id"] == "cli-proc-1"
    failed = subprocess.run(
        [sys.executable, "-m", "ringkv.cli", "txn", "--keyspace", "txn", "--ca-file",
         cluster.ca_file, "--if-absent", "p:k", "--put", "p:k", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert failed.returncode == EXIT_NOT_APPLIED
    assert failed.stdout == "" and failed.stderr.count("\n") == 1


def test_all_with_a_killed_replica_times_out(tmp_path: Any, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster of its own, without auth: a killed node would also take the user
    store's Paxos group (RF 2) down with it in the shared one."""
    local = LocalCluster(tmp_path, nodes=2, rf=2, base_client_port=free_port_block(2),
                         base_internode_port=free_port_block(2),
                         extra_args=["--engine", "memory"],
                         # The killed node stays UP to the survivor, which asks it and
                         # waits: a 504 timeout (exit 5) rather than a 503 (exit 4).
                         config_overrides={"timing.phi_threshold": 1e9})
    for name in ("RINGKV_TOKEN", "RINGKV_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RINGKV_URL", f"http://127.0.0.1:{local.base_client_port}")

    def ringkv(*args: str) -> Run:
        capsys.readouterr()
        code = cli.main(list(args))
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    try:
        local.up(timeout_s=60)
        assert ringkv("put", "kill:k", "1", "--consistency", "ALL").code == 0
        local.procs[1].kill()
        timed_out = ringkv("get", "kill:k", "--consistency", "ALL", "-o", "json")
        assert timed_out.code == EXIT_TIMEOUT, timed_out
        assert timed_out.json()["error"]["code"] == "timeout"
        assert timed_out.err.startswith("ringkv: error: timeout: ")
        assert ringkv("get", "kill:k", "--consistency", "ONE").code == 0
    finally:
        local.down()
