"""TLS against real node processes on 127.0.0.1: HTTPS and TLS-native for clients,
mutual TLS between nodes, client certificates, and rotation on SIGHUP (certificates,
and a replaced CA).

One three-node cluster started like `ringkv cluster up --tls` (a CA, a certificate
per node, TLS on both links) for the module, and one single node per test that
needs its own TLS settings.
"""

from __future__ import annotations

import asyncio
import datetime
from http.client import HTTPException
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from ringkv.client import AsyncClient, Client
from ringkv.client import native as client_native
from ringkv.errors import RingKVError
from ringkv.net.codec import FrameDecoder
from ringkv.tools.certs import init_ca, issue
from ringkv.tools.launcher import NodeProcess, free_port_block, http
from ringkv.tools.local_cluster import LocalCluster, node_view
from tests.procs import FAST_GOSSIP, wait_until

pytestmark = pytest.mark.cluster

DEADLINE_S = 15.0


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("tls"), nodes=3, rf=3, tls=True,
                           base_client_port=free_port_block(3),
                           base_internode_port=free_port_block(3),
                           extra_args=["--engine", "memory"],
                           config_overrides={**FAST_GOSSIP})  # a quicker start-up
    try:
        cluster.up(timeout_s=60)
        yield cluster
    finally:
        cluster.down()


def ca_of(cluster: LocalCluster) -> str:
    return str(cluster.certs_dir / "ca.crt")


def log_of(proc: NodeProcess) -> str:
    assert proc.log_path is not None
    return proc.log_path.read_text(errors="replace")


def served_serial(host: str, port: int, ca_file: Path, client: Path | None = None) -> int:
    """The serial of the certificate a new TLS connection to (host, port) is shown
    (showing ``client``.crt/.key when given)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = False
    if client is not None:
        context.load_cert_chain(client.with_suffix(".crt"), client.with_suffix(".key"))
    with socket.create_connection((host, port), timeout=DEADLINE_S) as raw:
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


# ---- the client link -------------------------------------------------------------------


def test_https_with_the_blocking_and_the_asyncio_client(cluster: LocalCluster) -> None:
    urls = cluster.endpoints()
    assert all(url.startswith("https://") for url in urls)
    with Client(urls, ca_file=ca_of(cluster), consistency="QUORUM", protocol="http") as kv:
        kv.put("tls-sync", {"n": 1})
        assert kv.get("tls-sync") == {"n": 1}
        kv.refresh_ring()
        assert all(node.url and node.url.startswith("https://") for node in kv.nodes())

    async def run() -> object:
        async with AsyncClient(urls, ca_file=ca_of(cluster), consistency="QUORUM",
                               protocol="http") as kv:
            await kv.put("tls-async", [1, 2])
            return await kv.get("tls-async")

    assert asyncio.run(run()) == [1, 2]


def test_a_client_without_the_ca_is_refused(cluster: LocalCluster) -> None:
    # Nodes' certificates come from a development CA the system does not trust.
    with Client(cluster.endpoints()[:1], protocol="http", max_retries=0) as kv:
        with pytest.raises(RingKVError):
            kv.get("anything")


def test_plain_http_to_the_tls_port_fails_cleanly(cluster: LocalCluster) -> None:
    proc = cluster.procs[0]
    plain = f"http://127.0.0.1:{proc.client_port}/v1/health"
    with pytest.raises((HTTPException, ConnectionError)):
        http("GET", plain, timeout_s=DEADLINE_S)
    wait_until(lambda: "client API: refused a TLS connection from 127.0.0.1:" in log_of(proc),
               timeout_s=DEADLINE_S, what="the refusal in the node's log")
    assert http("GET", f"{proc.url}/v1/health")[0] == 200  # and the node serves on


def test_native_protocol_over_tls(cluster: LocalCluster) -> None:
    proc = cluster.procs[1]
    # By hand: TLS first, then the versioned native handshake inside it.
    context = ssl.create_default_context(cafile=ca_of(cluster))
    with socket.create_connection(("127.0.0.1", proc.native_port), timeout=DEADLINE_S) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(client_native.hello_frame())
            decoder, frames = FrameDecoder(), []
            while not frames:
                data = tls.recv(65536)
                assert data, "the node closed the native connection"
                frames = decoder.feed(data)
            assert client_native.check_hello(frames[0]) >= 1
    # Plain text on the native port gets no native answer.
    with socket.create_connection(("127.0.0.1", proc.native_port), timeout=DEADLINE_S) as raw:
        raw.sendall(client_native.hello_frame())
        assert raw.recv(65536)[:1] in (b"", b"\x15")  # closed, or a TLS alert record
    # The client, native by default, goes over TLS and never falls back to HTTP.
    with Client(cluster.endpoints(), ca_file=ca_of(cluster), consistency="QUORUM") as kv:
        kv.refresh_ring()
        kv.put("tls-native", "v")
        assert kv.get("tls-native") == "v"
        assert kv._native_down == {}

    async def run() -> object:
        async with AsyncClient(cluster.endpoints(), ca_file=ca_of(cluster)) as kv:
            await kv.refresh_ring()
            await kv.put("tls-native-async", 7)
            got = await kv.get("tls-native-async")
            assert kv._native_down == {}
            return got

    assert asyncio.run(run()) == 7


# ---- the internode link ------------------------------------------------------------------


def test_quorum_writes_and_reads_over_internode_mtls(cluster: LocalCluster) -> None:
    with Client(cluster.endpoints(), ca_file=ca_of(cluster), consistency="QUORUM",
                protocol="http") as kv:
        for i in range(20):
            kv.put(f"q{i}", i)
        assert [kv.get(f"q{i}") for i in range(20)] == list(range(20))
    # Each node holds every key (RF 3): replicas were written over the TLS links.
    for proc in cluster.procs:
        status, body = http("GET", f"{proc.url}/v1/kv/default/q7?local=true")
        assert status == 200 and body["value"] == 7


def test_a_node_from_another_ca_cannot_join(cluster: LocalCluster, tmp_path: Path) -> None:
    rogue_certs = tmp_path / "certs"
    init_ca(rogue_certs, now())
    issue(rogue_certs, "rogue", now(), hosts=("127.0.0.1",))
    files = {"cert_file": str(rogue_certs / "rogue.crt"),
             "key_file": str(rogue_certs / "rogue.key")}
    config = tmp_path / "rogue.yaml"
    # It trusts the cluster's CA (a CA certificate is no secret), but its own
    # certificate comes from another CA.
    config.write_text(yaml.safe_dump({"tls": {
        "client": files, "internode": {**files, "ca_file": ca_of(cluster)}}}))
    seed = cluster.procs[0]
    rogue = NodeProcess("rogue", tmp_path, config_path=config, tls_dir=rogue_certs,
                        extra_args=["--seeds", f"127.0.0.1:{seed.internode_port}",
                                    "--engine", "memory"])
    try:
        rogue.launch()
        # The seed refuses the rogue's dial in the handshake, and logs who it was.
        wait_until(lambda: "internode: refused a TLS connection from 127.0.0.1:" in log_of(seed),
                   timeout_s=DEADLINE_S, what="the seed to refuse the rogue")
        line = next(line for line in log_of(seed).splitlines()
                    if "internode: refused a TLS connection" in line)
        assert "WARNING" in line and "certificate" in line
        # The rogue never learns the ring, and nobody counts it as a member.
        status, body = http("GET", f"{rogue.url}/v1/status")
        assert status == 200 and {row["node_id"] for row in body["nodes"]} <= {"rogue"}
        for proc in cluster.procs:
            view = node_view(proc)
            assert view is not None and "rogue" not in view
    finally:
        rogue.stop()


# ---- one node with its own TLS settings ---------------------------------------------------


@pytest.fixture
def solo(tmp_path: Path) -> Iterator[tuple[NodeProcess, Path]]:
    """One node whose clients must present a certificate from its CA (tls.client.ca_file)."""
    certs = tmp_path / "certs"
    init_ca(certs, now())
    issue(certs, "solo", now(), hosts=("127.0.0.1",))
    issue(certs, "client", now(), client_only=True)
    files = {"cert_file": str(certs / "solo.crt"), "key_file": str(certs / "solo.key"),
             "ca_file": str(certs / "ca.crt")}
    config = tmp_path / "solo.yaml"
    config.write_text(yaml.safe_dump({"tls": {"client": files, "internode": files}}))
    proc = NodeProcess("solo", tmp_path, config_path=config, tls_dir=certs,
                       extra_args=["--engine", "memory"])
    try:
        proc.start()
        yield proc, certs
    finally:
        proc.stop()


def test_client_certificate_required_when_client_ca_is_set(
        solo: tuple[NodeProcess, Path]) -> None:
    proc, certs = solo
    ca = str(certs / "ca.crt")
    with Client([proc.url], ca_file=ca, cert_file=str(certs / "client.crt"),
                key_file=str(certs / "client.key"), consistency="ONE") as kv:
        kv.put("k", 1)
        assert kv.get("k") == 1
    with Client([proc.url], ca_file=ca, protocol="http", max_retries=0) as kv:
        with pytest.raises(RingKVError):
            kv.get("k")
    wait_until(lambda: "client API: refused a TLS connection from 127.0.0.1:" in log_of(proc),
               timeout_s=DEADLINE_S, what="the refusal in the node's log")


def test_sighup_rotates_certificates_without_a_restart(solo: tuple[NodeProcess, Path]) -> None:
    proc, certs = solo
    pid = proc.proc.pid if proc.proc is not None else None
    first = served_serial("127.0.0.1", proc.client_port, certs / "ca.crt")
    _, _, second = issue(certs, "solo", now(), hosts=("127.0.0.1",))
    assert served_serial("127.0.0.1", proc.client_port, certs / "ca.crt") == first
    proc.signal(signal.SIGHUP)
    wait_until(lambda: served_serial("127.0.0.1", proc.client_port, certs / "ca.crt") == second,
               timeout_s=DEADLINE_S, what="new connections to see the new certificate")
    assert served_serial("127.0.0.1", proc.native_port, certs / "ca.crt") == second
    # The internode port too (it wants a certificate from its CA from us).
    assert served_serial("127.0.0.1", proc.internode_port, certs / "ca.crt",
                         client=certs / "client") == second
    # A bad file: the reload is refused, named in the log, and the old certificates stay.
    (certs / "solo.key").write_text("not a key")
    proc.signal(signal.SIGHUP)
    wait_until(lambda: "TLS reload: kept the old client certificates" in log_of(proc),
               timeout_s=DEADLINE_S, what="the failed reload in the log")
    line = next(line for line in log_of(proc).splitlines() if "kept the old client" in line)
    assert "ERROR" in line and "tls.client.key_file" in line and "solo.key" in line
    assert served_serial("127.0.0.1", proc.client_port, certs / "ca.crt") == second
    assert proc.proc is not None and proc.proc.pid == pid and proc.proc.poll() is None


def handshake(port: int, trusted: Path, client: Path) -> bool:
    """Whether a new TLS connection to ``port`` showing ``client``.crt/.key is accepted.
    TLS 1.2, where the node's verdict on the client's certificate is part of the
    handshake (under 1.3 it would come after it)."""
    context = ssl.create_default_context(cafile=str(trusted))
    context.check_hostname = False
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(client.with_suffix(".crt"), client.with_suffix(".key"))
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as raw:
        try:
            with context.wrap_socket(raw):
                return True
        except (ssl.SSLError, ConnectionError):
            return False


def test_sighup_replaces_the_trusted_ca(solo: tuple[NodeProcess, Path], tmp_path: Path) -> None:
    """The CA file replaced and SIGHUP sent: a client or peer certificate signed only by
    the old CA is refused on a new connection (client, native and internode ports), one
    from the new CA is accepted, without a restart."""
    proc, certs = solo
    new = tmp_path / "new-ca"
    init_ca(new, now())
    _, _, serial = issue(new, "solo", now(), hosts=("127.0.0.1",))
    issue(new, "client", now(), client_only=True)
    both = tmp_path / "both.crt"  # what the test trusts the node's certificate by
    both.write_bytes((certs / "ca.crt").read_bytes() + (new / "ca.crt").read_bytes())
    ports = (proc.client_port, proc.native_port, proc.internode_port)
    assert all(handshake(port, both, certs / "client") for port in ports)
    assert not any(handshake(port, both, new / "client") for port in ports)
    for name in ("solo.key", "solo.crt", "ca.crt"):  # key first: see tools/certs.py
        (certs / name).write_bytes((new / name).read_bytes())
    proc.signal(signal.SIGHUP)
    wait_until(lambda: served_serial("127.0.0.1", proc.client_port, both,
                                     client=new / "client") == serial,
               timeout_s=DEADLINE_S, what="the reload to serve the new CA's certificate")
    assert all(handshake(port, both, new / "client") for port in ports)
    # certs/client.* are still the old CA's.
    assert not any(handshake(port, both, certs / "client") for port in ports)
    assert "kept the old" not in log_of(proc)
