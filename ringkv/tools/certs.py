"""A development certificate authority: `ringkv certs init` and `ringkv certs issue`.

``init`` makes a CA (an EC P-256 key and a self-signed certificate) in a
directory; ``issue`` signs a node certificate (serverAuth and clientAuth, so
one certificate serves both ends of an internode link and the client API,
with a SAN for every host or IP given) or a client certificate (clientAuth
only) with it. Keys are written 0600. Building a certificate
(``build_ca``, ``build_leaf``) takes ``now`` and returns PEM bytes; only
``init_ca`` and ``issue`` touch files.

This is for development and tests, like CockroachDB's ``cockroach cert``:
a production cluster may use certificates from any CA, as long as each node's
chains to the ``tls.*.ca_file`` its peers trust.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_VALIDITY_DAYS = 3650
LEAF_VALIDITY_DAYS = 825  # the most browsers and most TLS stacks accept for a leaf
# Clocks of freshly started test hosts may lag a little: certificates start
# this long before "now".
BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes
    serial: int


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def build_ca(name: str, now: datetime.datetime) -> Issued:
    """A self-signed CA certificate (may sign leaves, not other CAs) and its key."""
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), serial)


def build_leaf(
    ca_cert_pem: bytes, ca_key_pem: bytes, common_name: str, now: datetime.datetime, *,
    hosts: tuple[str, ...] = (), client_only: bool = False,
) -> Issued:
    """A certificate for ``common_name`` signed by the CA.

    A node's (``client_only=False``) is for serverAuth and clientAuth, with a
    SAN for each of ``hosts`` (IP addresses as IP SANs, names as DNS SANs);
    a client's is for clientAuth only.
    """
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key made by `ringkv certs init`")
    key = _new_key()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client_only else [
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    serial = x509.random_serial_number()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=LEAF_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_encipherment=False, key_cert_sign=False, crl_sign=False,
            content_commitment=False, data_encipherment=False, key_agreement=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [_san(host) for host in hosts]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), serial)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


# Files.


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` whole or not at all (a reader never sees half a PEM file), with
    ``mode`` from the start: a key is never readable by others, even while written."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # a leftover temporary file keeps its old mode through O_CREAT
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_secret(path: Path, data: bytes) -> None:
    write_file(path, data, 0o600)


def init_ca(directory: Path, now: datetime.datetime, *, name: str = "ringkv development CA",
            force: bool = False) -> Path:
    """Create ``ca.crt`` and ``ca.key`` in ``directory``; the certificate's path.

    An existing CA is kept unless ``force``: replacing it would orphan every
    certificate it issued.
    """
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not force and (cert_path.exists() or key_path.exists()):
        raise FileExistsError(f"{directory} already holds a CA ({CA_CERT}/{CA_KEY})")
    ca = build_ca(name, now)
    write_secret(key_path, ca.key_pem)
    write_file(cert_path, ca.cert_pem)
    return cert_path


def issue(directory: Path, name: str, now: datetime.datetime, *, hosts: tuple[str, ...] = (),
          client_only: bool = False) -> tuple[Path, Path, int]:
    """Sign ``name.crt`` / ``name.key`` in ``directory`` with its CA: (cert, key, serial).
    Issuing again for the same name replaces them (rotation)."""
    ca_cert = (directory / CA_CERT).read_bytes()
    ca_key = (directory / CA_KEY).read_bytes()
    leaf = build_leaf(ca_cert, ca_key, name, now, hosts=hosts, client_only=client_only)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    # Key first, then certificate: a reload that reads them in between finds a
    # mismatched pair and keeps the old one, rather than a new cert with an old key.
    write_secret(key_path, leaf.key_pem)
    write_file(cert_path, leaf.cert_pem)
    return cert_path, key_path, leaf.serial
