"""TURN over TLS: `turns:` URIs that icegate hands out reach a coturn whose config
`icegate-server coturn-config` rendered with the operator's certificate (a self-signed one
here), and browsers allocate over TLS with the credentials icegate issued.
"""

from __future__ import annotations

import datetime
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import icegate
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer, server_settings
from harness.ports import free_tcp_port, free_tcp_udp_port, reserve_relay_range
from harness.pytest_plugin import require_binaries
from harness.rendered_coturn import RenderedCoturn, run_coturn_config_command
from harness.turn_client import TurnClient
from icegate_server.clock import FrozenClock

pytestmark = pytest.mark.coturn

TURN_HOST = "turn.icegate.test"
REALM = "tls.icegate.test"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for TURN_HOST and its key (what `openssl req -x509` makes)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TURN_HOST)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TURN_HOST)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
    cert, pkey = directory / "turn-cert.pem", directory / "turn-key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    pkey.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pkey.chmod(0o600)
    return cert, pkey


@dataclass
class TlsDeployment:
    environment: dict[str, str]
    port: int
    tls_port: int
    cert: Path
    directory: Path
    relay: tuple[int, int]

    def render(self, name: str, *options: str) -> Path:
        config = self.directory / f"{name}.conf"
        rendered = run_coturn_config_command(
            self.environment, config, "--coturn-min-port", str(self.relay[0]),
            "--coturn-max-port", str(self.relay[1]), *options)
        assert rendered.returncode == 0, rendered.stderr
        return config

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cert))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[TlsDeployment]:
    require_binaries("turnserver", "turnutils_uclient")
    cert, key = self_signed(tmp_path)
    port, tls_port = free_tcp_udp_port(), free_tcp_port()
    relay = reserve_relay_range()
    environment = {
        "ICEGATE_TURN_URIS": f"turn:127.0.0.1:{port}?transport=udp,"
                             f"turns:{TURN_HOST}:{tls_port}?transport=tcp",
        "ICEGATE_TURN_REALM": REALM, "ICEGATE_TURN_SECRETS": "tls-test-secret-0123456789",
        "ICEGATE_COTURN_TLS_CERT": str(cert), "ICEGATE_COTURN_TLS_KEY": str(key),
        "ICEGATE_DATA_DIR": str(tmp_path / "data"),
    }
    try:
        yield TlsDeployment(environment, port, tls_port, cert, tmp_path,
                            (relay.min_port, relay.max_port))
    finally:
        relay.release()


def issued(deployment: TlsDeployment, tmp_path: Path) -> tuple[str, str, list[str]]:
    """A credential icegate issued with these settings, and the URIs of its ICE servers."""
    env = deployment.environment
    settings = server_settings(tmp_path / "icegate", turn_realm=REALM,
                               turn_uris=tuple(env["ICEGATE_TURN_URIS"].split(",")),
                               turn_secrets=(env["ICEGATE_TURN_SECRETS"],))
    with RunningServer(settings, FrozenClock(time.time())) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        credential = client.issue_turn_credentials("alice", ttl=600)
        servers = client.get_ice_servers("alice", ttl=600).ice_servers
    return credential.username, credential.password, [u for s in servers for u in s.urls]


def test_turns_uri_allocates_over_tls_with_issued_credentials(deployment, tmp_path):
    config = deployment.render("production")
    text = config.read_text().splitlines()
    assert f"tls-listening-port={deployment.tls_port}" in text and "no-tls" not in text
    username, password, uris = issued(deployment, tmp_path)
    assert f"turns:{TURN_HOST}:{deployment.tls_port}?transport=tcp" in uris

    with RenderedCoturn(config, "127.0.0.1", deployment.port) as coturn:
        context = deployment.client_context()
        with TurnClient("127.0.0.1", deployment.tls_port, tls_context=context,
                        server_name=TURN_HOST) as client:
            answer = client.allocate(username, password)
            assert answer.code == 0, (answer.code, answer.reason, coturn.log[-2000:])
            # The deny-list holds over TLS too.
            assert client.create_permission("127.0.0.1") == 403
            assert client.create_permission("8.8.8.8") == 0
        with TurnClient("127.0.0.1", deployment.tls_port, tls_context=context,
                        server_name=TURN_HOST) as client:
            assert client.allocate(username, "A" + password[1:]).code == 401
        # The certificate is the operator's: a client that checks it against another name
        # (or trusts only the system roots) refuses the connection.
        with pytest.raises(ssl.SSLCertVerificationError):
            TurnClient("127.0.0.1", deployment.tls_port, tls_context=context,
                       server_name="other.icegate.test")
        with pytest.raises(ssl.SSLCertVerificationError):
            TurnClient("127.0.0.1", deployment.tls_port, tls_context=ssl.create_default_context(),
                       server_name=TURN_HOST)


def test_turnutils_uclient_relays_over_tls(deployment, tmp_path):
    """coturn's own client over TLS (-t -S), relaying data between two allocations: only on a
    loopback coturn, whose peers (the other allocation, on 127.0.0.1) it may then reach."""
    config = deployment.render("loopback", "--coturn-allow-loopback-peers")
    username, password, _ = issued(deployment, tmp_path)
    with RenderedCoturn(config, "127.0.0.1", deployment.port):
        result = subprocess.run(
            ["turnutils_uclient", "-t", "-S", "-p", str(deployment.tls_port), "-n", "1",
             "-m", "1", "-l", "100", "-y", "-u", username, "-w", password,
             "-e", "127.0.0.1", "127.0.0.1"],
            capture_output=True, text=True, timeout=30, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-2000:]
    assert "TLSv1.2" in output and "Total lost packets 0" in output


def test_turns_uris_without_a_coturn_certificate_are_refused(deployment):
    environment = {k: v for k, v in deployment.environment.items()
                   if not k.startswith("ICEGATE_COTURN_TLS_")}
    output = deployment.directory / "refused.conf"
    rendered = run_coturn_config_command(environment, output)
    assert rendered.returncode == 2
    assert "ICEGATE_COTURN_TLS_CERT" in rendered.stderr
    assert not output.exists()
