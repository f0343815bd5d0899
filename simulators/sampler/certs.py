"""A small CA and a server certificate for the sampler's TLS (generated once, then reused).

sila2 can generate a self-signed certificate itself, but only with discovery
on (the client learns the CA from the mDNS record). Here the CA is written to
a directory instead, so a client is given it by configuration (``ca`` in the
driver's config) and discovery can stay off.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The SiLA 2 specification's X.509 extension carrying the server UUID.
SILA_UUID_OID = x509.ObjectIdentifier("1.3.6.1.4.1.58583")


@dataclass(frozen=True)
class ServerCertificates:
    ca: Path  # give this to clients (driver config `ca`)
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "equipment-gateway simulators"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ensure_certificates(directory: Path, server_uuid: UUID, host: str) -> ServerCertificates:
    """CA + server certificate for ``host`` in ``directory``; existing files are reused."""
    directory.mkdir(parents=True, exist_ok=True)
    out = ServerCertificates(
        directory / "ca.crt", directory / "server.crt", directory / "server.key"
    )
    if out.ca.exists() and out.cert.exists() and out.key.exists():
        return out
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("sampler simulator CA"))
        .issuer_name(_name("sampler simulator CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    hosts = {host, "127.0.0.1", "::1", socket.gethostname()}
    for h in sorted(hosts):
        if not h or h in ("0.0.0.0", "::"):
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("sampler simulator"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(SILA_UUID_OID, str(server_uuid).encode("ascii")),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out.key.write_bytes(_pem_key(key))
    out.key.chmod(0o600)
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return out
