"""Transport security through real servers, over each transport: TLS, mutual TLS, certificates
standing for keys, the client's and the CLI's TLS options, and the server's TLS settings."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import icegate
from harness.icegate_server import TEST_ADMIN_KEY
from harness.pki import CertFiles, TestCA
from harness.server_process import ServerProcess

BIN = Path(sys.executable).parent
IDENTITY_A = "spiffe://corp/web"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - the warning under test is about exactly this
FAST = 3.0  # seconds: a TLS failure is immediate, the deadline only bounds a hang


HOUR = datetime.timedelta(hours=1)
CLIENT_PROJECTS = (
    (f"uri:{IDENTITY_A}", "acme"), ("cn:billing.internal", "billing"),
    ("dns:ops.internal", "*"), ("email:mail@corp.example", "billing"),
    ("ip:10.0.0.7", "acme"), ("dns:both.internal", "billing"))
"""The mapping every mutual-TLS test server runs with (typed names, canonical)."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """One CA for servers and clients, a stranger CA, and the certificates the tests use."""
    directory = tmp_path_factory.mktemp("pki")
    ca = TestCA(directory)
    return {
        "ca": ca,
        "stranger_ca": TestCA(directory, "stranger CA"),
        "server": ca.issue_server(),
        # Mapped by its URI SAN (a SPIFFE id); its CN is unmapped.
        "web": ca.issue("web", "web-frontend", uris=(IDENTITY_A,)),
        # Mapped by its CN: it has no SAN at all.
        "billing": ca.issue("billing", "billing.internal"),
        "ops": ca.issue("ops", "ops.internal", dns=("ops.internal",)),
        "email": ca.issue("email", "mailer", emails=("mail@corp.example",)),
        "ip": ca.issue("ip", "by-address", ips=("10.0.0.7",)),
        "nobody": ca.issue("nobody", "nobody.internal", dns=("nobody.internal",)),
        # The spelling collisions: each holds a mapped name under another type.
        "cn_spiffe": ca.issue("cn-spiffe", IDENTITY_A),
        "cn_ops": ca.issue("cn-ops", "ops.internal"),
        "uri_ops": ca.issue("uri-ops", "someone", uris=("ops.internal",)),
        "email_ops": ca.issue("email-ops", "someone", emails=("ops.internal",)),
        "cn_billing_with_san": ca.issue("cn-billing-san", "billing.internal",
                                        dns=("elsewhere.internal",)),
        # Names that map to two callers: refused, never resolved by order.
        "ambiguous": ca.issue("ambiguous", "x", uris=(IDENTITY_A,), dns=("ops.internal",)),
        # Two names for one project: one caller.
        "two_names": ca.issue("two-names", "x", dns=("both.internal",),
                              emails=("mail@corp.example",)),
        "expired": ca.issue("expired", "web-frontend", uris=(IDENTITY_A,),
                            valid_for=(-48 * HOUR, -24 * HOUR)),
        "not_yet_valid": ca.issue("not-yet-valid", "web-frontend", uris=(IDENTITY_A,),
                                  valid_for=(24 * HOUR, 48 * HOUR)),
    }


def tls_overrides(pki, *, mutual: bool) -> dict[str, str]:
    """The TLS settings of a test server: its certificate, and for mutual TLS the client CA
    and the mapping of certificate names to projects."""
    server: CertFiles = pki["server"]
    overrides = dict(tls_cert=server.cert, tls_key=server.key)
    if mutual:
        overrides.update(tls_client_ca=pki["ca"].cert, tls_client_projects=CLIENT_PROJECTS)
    return overrides


@pytest.fixture
def tls_server(transport, server_factory, pki):
    return server_factory(**tls_overrides(pki, mutual=False))


@pytest.fixture
def mtls_server(transport, server_factory, pki):
    running = server_factory(**tls_overrides(pki, mutual=True))
    with icegate.Client(running.target, TEST_ADMIN_KEY, tls=client_tls(pki, "ops")) as admin:
        admin.create_project("acme")
        admin.create_project("billing")
    return running


def client_tls(pki, cert_name: str | None = None, *, ca: str = "ca") -> icegate.TlsConfig:
    cert = pki[cert_name] if cert_name else None
    return icegate.TlsConfig(ca_file=pki[ca].cert, cert_file=cert.cert if cert else None,
                             key_file=cert.key if cert else None)


def expiry_and_user(username: str) -> tuple[int, str]:
    expiry, _, user = username.partition(":")
    return int(expiry), user


class TestTls:
    def test_credentials_over_tls_with_a_key(self, tls_server, pki):
        with icegate.Client(tls_server.target, TEST_ADMIN_KEY, tls=client_tls(pki)) as client:
            credential = client.issue_turn_credentials("alice", ttl=600, timeout=FAST)
        assert expiry_and_user(credential.username) == (int(tls_server.clock.now()) + 600,
                                                         "default/alice")

    def test_async_client_over_tls(self, tls_server, pki):
        async def call():
            async with icegate.AsyncClient(tls_server.target, TEST_ADMIN_KEY,
                                           tls=client_tls(pki)) as client:
                return await client.get_ice_servers("alice", timeout=FAST)

        assert asyncio.run(call()).ice_servers

    def test_a_client_trusting_another_ca_cannot_connect(self, tls_server, pki):
        with icegate.Client(tls_server.target, TEST_ADMIN_KEY,
                            tls=client_tls(pki, ca="stranger_ca")) as client, \
                pytest.raises(icegate.UnavailableError):
            client.issue_turn_credentials("alice", timeout=FAST)

    def test_a_plaintext_client_cannot_call_a_tls_server(self, tls_server):
        with icegate.Client(tls_server.target, TEST_ADMIN_KEY) as client, \
                pytest.raises(icegate.UnavailableError):
            client.issue_turn_credentials("alice", timeout=FAST)

    def test_tls_settings_from_the_environment(self, tls_server, pki, monkeypatch):
        monkeypatch.setenv("ICEGATE_TLS_CA", pki["ca"].cert)
        with icegate.Client(tls_server.target, TEST_ADMIN_KEY) as client:
            assert client.health(timeout=FAST) == "SERVING"


class TestMutualTls:
    def test_a_client_without_a_certificate_cannot_connect(self, mtls_server, pki):
        with icegate.Client(mtls_server.target, TEST_ADMIN_KEY, tls=client_tls(pki)) as client, \
                pytest.raises(icegate.UnavailableError):
            client.issue_turn_credentials("alice", timeout=FAST)

    def test_a_certificate_from_another_ca_cannot_connect(self, mtls_server, pki, tmp_path):
        forged = TestCA(tmp_path / "forged", "forger").issue("web", "web", uris=(IDENTITY_A,))
        tls = icegate.TlsConfig(ca_file=pki["ca"].cert, cert_file=forged.cert,
                                key_file=forged.key)
        with icegate.Client(mtls_server.target, tls=tls) as client, \
                pytest.raises(icegate.UnavailableError):
            client.issue_turn_credentials("alice", timeout=FAST)

    def test_a_mapped_certificate_acts_for_its_project_only(self, mtls_server, pki):
        with icegate.Client(mtls_server.target, tls=client_tls(pki, "web")) as web:
            credential = web.issue_turn_credentials("alice", ttl=600, timeout=FAST)
            assert expiry_and_user(credential.username)[1] == "acme/alice"
            named = web.issue_turn_credentials("bob", project_id="acme", timeout=FAST)
            assert expiry_and_user(named.username)[1] == "acme/bob"
            with pytest.raises(icegate.ProjectForbiddenError) as caught:
                web.issue_turn_credentials("alice", project_id="billing", timeout=FAST)
            assert "billing" in str(caught.value)
            with pytest.raises(icegate.ProjectForbiddenError):
                web.create_project("sneaky", timeout=FAST)
            # Its calls count against its project's rate limit, as a key's would.
            assert web.get_usage(timeout=FAST).project_id == "acme"

    def test_a_certificate_without_san_is_mapped_by_its_common_name(self, mtls_server, pki):
        with icegate.Client(mtls_server.target, tls=client_tls(pki, "billing")) as billing:
            credential = billing.issue_turn_credentials("carol", timeout=FAST)
        assert expiry_and_user(credential.username)[1] == "billing/carol"

    @pytest.mark.parametrize(("cert_name", "project"), [
        ("web", "acme"), ("billing", "billing"), ("ops", "default"), ("email", "billing"),
        ("ip", "acme"), ("two_names", "billing")])
    def test_each_name_type_maps_to_its_project(self, mtls_server, pki, cert_name, project):
        with icegate.Client(mtls_server.target, tls=client_tls(pki, cert_name)) as client:
            credential = client.issue_turn_credentials("carol", timeout=FAST)
        assert expiry_and_user(credential.username)[1] == f"{project}/carol"

    @pytest.mark.parametrize("cert_name", [
        "cn_spiffe",  # CN spiffe://corp/web, no SAN: not uri:spiffe://corp/web
        "cn_ops", "uri_ops", "email_ops",  # ops.internal, but not as a DNS SAN
        "cn_billing_with_san",  # cn:billing.internal, but the certificate has a SAN
    ])
    def test_a_name_of_another_type_is_not_a_mapped_name(self, mtls_server, pki, cert_name):
        with icegate.Client(mtls_server.target, tls=client_tls(pki, cert_name)) as client:
            with pytest.raises(icegate.AuthenticationError) as caught:
                client.issue_turn_credentials("carol", timeout=FAST)
            assert caught.value.reason == "INVALID_API_KEY"
            with pytest.raises(icegate.AuthenticationError):
                client.create_project("by-look-alike", timeout=FAST)

    def test_names_that_map_to_two_callers_are_refused(self, mtls_server, pki):
        with icegate.Client(mtls_server.target, tls=client_tls(pki, "ambiguous")) as client, \
                pytest.raises(icegate.AuthenticationError) as caught:
            client.issue_turn_credentials("carol", project_id="acme", timeout=FAST)
        message = str(caught.value)
        assert "different projects" in message
        assert f"uri:{IDENTITY_A}" in message and "dns:ops.internal" in message

    @pytest.mark.parametrize("cert_name", ["expired", "not_yet_valid"])
    def test_a_certificate_outside_its_validity_fails_the_handshake(self, mtls_server, pki,
                                                                     cert_name):
        with icegate.Client(mtls_server.target, tls=client_tls(pki, cert_name)) as client, \
                pytest.raises(icegate.UnavailableError):
            client.health(timeout=FAST)

    def test_an_admin_certificate_administers(self, mtls_server, pki):
        with icegate.Client(mtls_server.target, tls=client_tls(pki, "ops")) as ops:
            ops.create_project("from-ops", timeout=FAST)
            credential = ops.issue_turn_credentials("dan", project_id="from-ops", timeout=FAST)
        assert expiry_and_user(credential.username)[1] == "from-ops/dan"

    def test_an_unmapped_certificate_without_a_key_is_unauthenticated(self, mtls_server, pki):
        with icegate.Client(mtls_server.target, tls=client_tls(pki, "nobody")) as nobody, \
                pytest.raises(icegate.AuthenticationError) as caught:
            nobody.issue_turn_credentials("alice", timeout=FAST)
        assert "dns:nobody.internal" in str(caught.value)

    def test_a_key_over_mutual_tls_still_works_and_wins(self, mtls_server, pki):
        with icegate.Client(mtls_server.target, TEST_ADMIN_KEY,
                            tls=client_tls(pki, "ops")) as admin:
            billing_key = admin.create_api_key("billing", timeout=FAST).secret
        with icegate.Client(mtls_server.target, TEST_ADMIN_KEY,
                            tls=client_tls(pki, "nobody")) as keyed:
            assert expiry_and_user(keyed.issue_turn_credentials(
                "erin", timeout=FAST).username)[1] == "default/erin"
        # The web certificate stands for acme, but the billing key it carries decides.
        with icegate.Client(mtls_server.target, billing_key,
                            tls=client_tls(pki, "web")) as web_with_key:
            assert expiry_and_user(web_with_key.issue_turn_credentials(
                "erin", timeout=FAST).username)[1] == "billing/erin"
            with pytest.raises(icegate.ProjectForbiddenError):
                web_with_key.issue_turn_credentials("erin", project_id="acme", timeout=FAST)
        # A wrong key is refused, not rescued by the certificate.
        with icegate.Client(mtls_server.target, "igk_wrong_" + "x" * 40,
                            tls=client_tls(pki, "web")) as wrong, \
                pytest.raises(icegate.AuthenticationError):
            wrong.issue_turn_credentials("erin", timeout=FAST)

    def test_health_is_open_to_any_verified_certificate(self, mtls_server, pki):
        with icegate.Client(mtls_server.target, tls=client_tls(pki, "nobody")) as nobody:
            assert nobody.health(timeout=FAST) == "SERVING"


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICEGATE_")}
    env.update(extra)
    return env


def test_cli_with_ca_cert_and_key_against_mutual_tls(mtls_server, pki, tmp_path):
    web: CertFiles = pki["web"]
    result = subprocess.run(
        [str(BIN / "icegate"), "--target", mtls_server.target, "--timeout", str(FAST),
         "--ca-file", pki["ca"].cert, "--cert", web.cert, "--key", web.key,
         "turn-credentials", "--user", "alice"],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["username"].endswith(":acme/alice")

    result = subprocess.run(
        [str(BIN / "icegate"), "--target", mtls_server.target, "--timeout", str(FAST),
         "--ca-file", pki["ca"].cert, "health"],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1  # no client certificate: the handshake fails
    assert result.stderr.startswith("icegate: ")


def test_cli_reads_tls_files_from_the_environment(tls_server, pki, tmp_path):
    result = subprocess.run(
        [str(BIN / "icegate"), "--target", tls_server.target, "--timeout", str(FAST),
         "ice-servers", "--user", "alice"],
        cwd=tmp_path, env=cli_env(ICEGATE_TLS_CA=pki["ca"].cert, ICEGATE_API_KEY=TEST_ADMIN_KEY),
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)


def run_server(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """Runs `icegate-server` with settings meant to be refused (it must exit by itself)."""
    process = ServerProcess(tmp_path)
    process.env.update({f"ICEGATE_{k.upper()}": v for k, v in settings.items()})
    return subprocess.run([str(BIN / "icegate-server")], cwd=tmp_path, env=process.env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("settings", "named"), [
    (lambda p: {"tls_cert": p["server"].cert}, "ICEGATE_TLS_KEY"),
    (lambda p: {"tls_key": p["server"].key}, "ICEGATE_TLS_CERT"),
    (lambda p: {"tls_cert": "/nonexistent/cert.pem", "tls_key": p["server"].key},
     "ICEGATE_TLS_CERT"),
    (lambda p: {"tls_cert": p["server"].cert, "tls_key": p["web"].key}, "ICEGATE_TLS_KEY"),
    (lambda p: {"tls_cert": p["server"].key, "tls_key": p["server"].key}, "ICEGATE_TLS_CERT"),
    (lambda p: {"tls_cert": p["server"].cert, "tls_key": p["server"].key,
                "tls_client_ca": p["server"].key}, "ICEGATE_TLS_CLIENT_CA"),
    (lambda p: {"tls_cert": p["server"].cert, "tls_key": p["server"].key,
                "tls_client_projects": "dns:web=acme"}, "ICEGATE_TLS_CLIENT_PROJECTS"),
    # The old, untyped spelling: refused, the line showing the typed one.
    (lambda p: {"tls_cert": p["server"].cert, "tls_key": p["server"].key,
                "tls_client_ca": p["ca"].cert,
                "tls_client_projects": "spiffe://corp/web=acme,ops.internal=*"},
     "ICEGATE_TLS_CLIENT_PROJECTS: 'spiffe://corp/web' has no name type: write "
     "uri:spiffe://corp/web=acme"),
    (lambda p: {"tls_cert": p["server"].cert, "tls_key": p["server"].key,
                "tls_client_ca": p["ca"].cert,
                "tls_client_projects": "dns:ops.internal=*,dns:OPS.internal=acme"},
     "ICEGATE_TLS_CLIENT_PROJECTS: maps the same name twice ('dns:ops.internal')"),
], ids=["cert-without-key", "key-without-cert", "unreadable-cert", "mismatched-key",
        "key-as-cert", "key-as-client-ca", "projects-without-client-ca",
        "untyped-client-projects", "same-name-twice"])
def test_bad_tls_settings_stop_the_server_with_one_line(tmp_path, pki, settings, named):
    result = run_server(tmp_path, **settings(pki))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
    # No private key material is ever printed, whichever file was wrong.
    for name in ("server", "web"):
        key_body = Path(pki[name].key).read_text().splitlines()[1]
        assert key_body not in result.stderr + result.stdout


def serve_and_read_log(tmp_path: Path, host: str, **settings: str) -> str:
    """Starts `icegate-server` on `host` (and a free port), stops it, returns its log."""
    process = ServerProcess(tmp_path, **settings)
    process.env["ICEGATE_LISTEN"] = f"{host}:{process.port}"
    process.start()
    try:
        deadline = time.monotonic() + 10
        while "listening on" not in process.read_log() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        assert process.stop(signal.SIGTERM) == 0
    return process.read_log()


def log_records(log: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def test_listening_without_tls_beyond_loopback_warns(tmp_path):
    log = serve_and_read_log(tmp_path, ALL_INTERFACES)
    warnings = [record["msg"] for record in log_records(log)
                if record["level"] == "WARNING" and "TLS" in record["msg"]]
    assert len(warnings) == 1, log
    assert "ICEGATE_TLS_CERT" in warnings[0] and ALL_INTERFACES in warnings[0]


def test_no_warning_with_tls_or_on_loopback(tmp_path, pki):
    server: CertFiles = pki["server"]
    tls_log = serve_and_read_log(tmp_path / "tls", ALL_INTERFACES,
                                 tls_cert=server.cert, tls_key=server.key)
    loopback_log = serve_and_read_log(tmp_path / "loopback", "127.0.0.1")
    for log in (tls_log, loopback_log):
        messages = [record["msg"] for record in log_records(log)]
        assert any("listening on" in message for message in messages), log
        assert not any("ICEGATE_TLS_CERT" in message for message in messages), log
    assert "(TLS, store sqlite)" in tls_log
