"""A throwaway certificate authority for TLS tests: a CA, a server certificate for this
machine's loopback (SAN IP 127.0.0.1 and DNS localhost), and client certificates with any
CN and SANs (DNS, URI, email, IP) and any validity period, written as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its private key as PEM files."""

    cert: str
    key: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> str:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return str(path)


class TestCA:
    """A CA that signs certificates into `directory`."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "icegate test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = _name(name)
        now = datetime.datetime.now(datetime.timezone.utc)
        self._certificate = (
            x509.CertificateBuilder()
            .subject_name(self._name).issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256()))
        slug = name.replace(" ", "-")
        self.cert = str(directory / f"{slug}.pem")
        Path(self.cert).write_bytes(self._certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, file_stem: str, common_name: str, *, dns: tuple[str, ...] = (),
              uris: tuple[str, ...] = (), ips: tuple[str, ...] = (),
              emails: tuple[str, ...] = (), server: bool = False,
              valid_for: tuple[datetime.timedelta, datetime.timedelta] | None = None,
              ) -> CertFiles:
        """Signs a leaf certificate (server or client use) and writes it with its key.

        `valid_for` is (not before, not after) relative to now; by default an hour ago to a
        day ahead. A certificate without `dns`, `uris`, `ips` and `emails` has no SAN
        extension at all.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        not_before, not_after = valid_for or (datetime.timedelta(hours=-1),
                                              datetime.timedelta(days=1))
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
        names += [x509.UniformResourceIdentifier(uri) for uri in uris]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        names += [x509.RFC822Name(email) for email in emails]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + not_before)
            .not_valid_after(now + not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        cert_path = self.directory / f"{file_stem}.pem"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return CertFiles(cert=str(cert_path),
                         key=_write_key(self.directory / f"{file_stem}.key", key))

    def issue_server(self, file_stem: str = "server") -> CertFiles:
        """A server certificate for 127.0.0.1 and localhost."""
        return self.issue(file_stem, "localhost", dns=("localhost",), ips=("127.0.0.1",),
                          server=True)
