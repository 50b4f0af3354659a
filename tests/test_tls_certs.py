"""`ringkv certs`: a development CA, and node and client certificates it signs."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from ringkv.tools.certs import build_ca, build_leaf, init_ca, issue

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def test_node_certificate_chains_to_the_ca_and_names_its_hosts(tmp_path):
    init_ca(tmp_path, NOW)
    cert_path, key_path, serial = issue(tmp_path, "node1", NOW, hosts=("127.0.0.1", "db1.local"))
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.serial_number == serial
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["db1.local"]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The standard library accepts the pair and trusts the chain.
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    assert client.get_ca_certs()[0]["subject"] == ((("commonName", "ringkv development CA"),),)


def test_client_certificate_is_for_client_auth_only(tmp_path):
    init_ca(tmp_path, NOW)
    cert_path, _, _ = issue(tmp_path, "alice", NOW, client_only=True)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_keys_are_private_and_another_ca_does_not_verify(tmp_path):
    init_ca(tmp_path, NOW)
    _, key_path, _ = issue(tmp_path, "node1", NOW, hosts=("127.0.0.1",))
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    # Another CA with the very same name: only the signature tells them apart.
    other = build_ca("ringkv development CA", NOW)
    leaf = build_leaf(other.cert_pem, other.key_pem, "node1", NOW, hosts=("127.0.0.1",))
    ours = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    with pytest.raises(InvalidSignature):
        x509.load_pem_x509_certificate(leaf.cert_pem).verify_directly_issued_by(ours)


def test_reissue_rotates_and_init_keeps_an_existing_ca(tmp_path):
    init_ca(tmp_path, NOW)
    first = issue(tmp_path, "node1", NOW, hosts=("127.0.0.1",))[2]
    second = issue(tmp_path, "node1", NOW, hosts=("127.0.0.1",))[2]
    assert first != second
    with pytest.raises(FileExistsError):
        init_ca(tmp_path, NOW)


def test_cli_flow(tmp_path):
    run = [sys.executable, "-m", "ringkv.cli", "certs"]
    subprocess.run([*run, "init", "--dir", str(tmp_path)], check=True, capture_output=True)
    out = subprocess.run([*run, "issue", "node1", "--dir", str(tmp_path), "--host", "127.0.0.1"],
                         check=True, capture_output=True, text=True).stdout
    assert "serial" in out and (tmp_path / "node1.crt").exists()
    bad = subprocess.run([*run, "issue", "../x", "--dir", str(tmp_path)], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "NAME" in bad.stderr
