"""Transport security pieces: TLS settings, a certificate's typed names, the names admitted by
AccessControl, and the client's TLS configuration."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import icegate
from harness.pki import TestCA
from icegate.connection import Connection, TlsConfig
from icegate_server.access.control import AccessControl, MethodPolicy
from icegate_server.access.tls import (
    canonical_name,
    certificate_names,
    is_loopback_host,
    parse_client_projects,
    peer_identities,
)
from icegate_server.clock import FrozenClock
from icegate_server.errors import (
    InvalidApiKeyError,
    InvalidFieldError,
    NotFoundError,
    ProjectForbiddenError,
    StoreUnavailableError,
)
from icegate_server.projects.records import Project
from icegate_server.settings import ConfigError, load_settings
from icegate_server.store import open_store

# -- server settings ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    return ca, ca.issue_server()


def tls_env(pki, **extra: str) -> dict[str, str]:
    ca, server = pki
    return {"ICEGATE_TLS_CERT": server.cert, "ICEGATE_TLS_KEY": server.key,
            "ICEGATE_TLS_CLIENT_CA": ca.cert, **extra}


def test_client_projects_from_the_environment(pki):
    settings = load_settings({}, tls_env(pki, ICEGATE_TLS_CLIENT_PROJECTS=(
        " uri:spiffe://corp/web=acme , dns:Billing.Internal=billing,"
        "uri:spiffe://x/y?a=b=ops,email:ops@Corp.Example=ops,ip:0:0::1=ops,cn:ops box=*")))
    # Each name in its canonical spelling: DNS names and email domains lower-cased, IPs
    # as `ipaddress` writes them.
    assert settings.tls_client_projects == (
        ("uri:spiffe://corp/web", "acme"), ("dns:billing.internal", "billing"),
        ("uri:spiffe://x/y?a=b", "ops"), ("email:ops@corp.example", "ops"),
        ("ip:::1", "ops"), ("cn:ops box", "*"))


def test_client_projects_from_a_toml_table(pki, tmp_path):
    config = tmp_path / "icegate.toml"
    config.write_text('[tls_client_projects]\n"uri:spiffe://corp/web" = "acme"\n'
                      '"dns:ops.internal" = "*"\n', encoding="utf-8")
    settings = load_settings({}, tls_env(pki, ICEGATE_CONFIG=str(config)))
    assert dict(settings.tls_client_projects) == {"uri:spiffe://corp/web": "acme",
                                                  "dns:ops.internal": "*"}


@pytest.mark.parametrize(("raw", "problem"), [
    ("dns:a=acme,dns:a=billing", "same name twice ('dns:a')"),
    # One name spelled two ways is still one name.
    ("dns:ops.internal=acme,dns:OPS.internal=billing", "same name twice"),
    ("ip:::1=acme,ip:0:0::1=acme", "same name twice ('ip:::1')"),
    ("dns:web=Not_A_Project", "neither a project id nor *"),
    ("dns:web=acme\x00", "neither a project id nor *"),
    ("dns:web=", "type:name=project"),
    # The old, untyped spelling: refused, showing the typed one.
    ("spiffe://corp/web=acme", "write uri:spiffe://corp/web=acme"),
    ("ops.internal=*", "write dns:ops.internal=*"),
    ("ops@corp.example=*", "write email:ops@corp.example=*"),
    ("10.0.0.7=acme", "write ip:10.0.0.7=acme"),
    ("spiffe:corp=acme", "has no name type"),
    ("dn:web=acme", "has no name type"),
    ("dns:ops.internal.=acme", "is not a dns name"),
    ("dns:*.internal=acme", "is not a dns name"),
    ("dns:\u043eps.internal=acme", "is not a dns name"),  # Cyrillic o
    ("ip:10.0.0.256=acme", "is not an IP address"),
    ("uri:spiffe://corp/web x=acme", "is not a uri name"),
    ("email:ops=acme", "is not a email name"),
    ("cn: web=acme", "is not a cn name"),
])
def test_bad_client_projects_are_named(pki, raw, problem):
    with pytest.raises(ConfigError) as caught:
        load_settings({}, tls_env(pki, ICEGATE_TLS_CLIENT_PROJECTS=raw))
    message = str(caught.value)
    assert "ICEGATE_TLS_CLIENT_PROJECTS" in message and "\n" not in message
    assert problem in message


def test_unreadable_key_is_named_and_never_shown(pki, tmp_path):
    _, server = pki
    unreadable = tmp_path / "missing.key"
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {"ICEGATE_TLS_CERT": server.cert,
                           "ICEGATE_TLS_KEY": str(unreadable)})
    assert str(caught.value).startswith("invalid setting ICEGATE_TLS_KEY: cannot read")


def test_encrypted_key_is_refused_without_prompting(pki, tmp_path):
    from cryptography.hazmat.primitives import serialization

    _, server = pki
    key = serialization.load_pem_private_key(Path(server.key).read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {"ICEGATE_TLS_CERT": server.cert, "ICEGATE_TLS_KEY": str(encrypted)})
    assert "ICEGATE_TLS_KEY" in str(caught.value)
    assert encrypted.read_text().splitlines()[1] not in str(caught.value)


def test_parse_client_projects_refuses_other_toml_types():
    with pytest.raises(ValueError, match="identity=project"):
        parse_client_projects(["web=acme"])


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("[::1]", True),
    ("0.0.0.0", False), ("[::]", False), ("10.0.0.5", False),  # noqa: S104
    ("icegate.internal", False),
])
def test_loopback_hosts(host, loopback):
    assert is_loopback_host(host) is loopback


def names_of(files) -> list[str]:
    return certificate_names(Path(files.cert).read_bytes())


def test_every_san_is_named_with_its_type_and_the_cn_is_not(pki):
    ca, _ = pki
    files = ca.issue("typed", "ops.internal", uris=("spiffe://corp/web",),
                     dns=("Web.Internal",), emails=("ops@Corp.Example",),
                     ips=("10.0.0.7", "::1"))
    assert sorted(names_of(files)) == sorted([
        "uri:spiffe://corp/web", "dns:web.internal", "email:ops@corp.example",
        "ip:10.0.0.7", "ip:::1"])


def test_the_cn_counts_only_without_any_san(pki):
    ca, _ = pki
    assert names_of(ca.issue("cn-only", "spiffe://corp/web")) == ["cn:spiffe://corp/web"]
    # Any SAN at all, even of a type never mapped, hides the CN (RFC 6125 6.4.4).
    assert names_of(ca.issue("cn-and-ip", "ops.internal", ips=("10.0.0.7",))) \
        == ["ip:10.0.0.7"]


def test_peer_identities_read_the_verified_certificate(pki):
    ca, _ = pki
    files = ca.issue("peer", "web-frontend", uris=("spiffe://corp/web",))
    auth_context = {"x509_common_name": [b"web-frontend"],
                    "x509_subject_alternative_name": [b"spiffe://corp/web"],
                    "x509_pem_cert": [Path(files.cert).read_bytes()],
                    "transport_security_type": [b"ssl"]}
    assert peer_identities(auth_context) == ["uri:spiffe://corp/web"]
    # grpc's untyped lists alone are never used: no certificate, no names.
    assert peer_identities({"x509_common_name": [b"ops.internal"]}) == []
    assert peer_identities({}) == []
    assert peer_identities({"x509_pem_cert": [b"-----BEGIN CERTIFICATE-----\nno\n"]}) == []


@pytest.mark.parametrize(("kind", "value", "canonical"), [
    ("dns", "OPS.Internal", "dns:ops.internal"),
    ("dns", "a" * 63 + ".b", "dns:" + "a" * 63 + ".b"),
    ("dns", ".".join(["a" * 63] * 3 + ["a" * 61]), "dns:" + ".".join(["a" * 63] * 3 + ["a" * 61])),
    ("uri", "spiffe://corp/web", "uri:spiffe://corp/web"),
    ("email", "Ops@Corp.Example", "email:Ops@corp.example"),
    ("ip", "0:0::1", "ip:::1"),
    ("ip", "10.0.0.7", "ip:10.0.0.7"),
    ("cn", "web frontend", "cn:web frontend"),
    ("cn", "c" * 64, "cn:" + "c" * 64),
])
def test_names_have_one_canonical_spelling(kind, value, canonical):
    assert canonical_name(kind, value) == canonical


@pytest.mark.parametrize(("kind", "value"), [
    *[(kind, value + suffix) for kind, value in (
        ("dns", "ops.internal"), ("uri", "spiffe://corp/web"), ("email", "ops@corp.example"),
        ("ip", "10.0.0.7"), ("cn", "ops.internal"))
      for suffix in ("\n", " ", "\x00")],
    ("dns", " ops.internal"), ("cn", " ops.internal"), ("uri", " spiffe://corp/web"),
    # Non-ASCII look-alikes: Kelvin sign (lower() folds it onto k), Cyrillic o.
    ("dns", "\u212aey.internal"), ("dns", "\u043eps.internal"), ("cn", "\u043eps.internal"),
    ("email", "\u043eps@corp.example"), ("uri", "spiffe://c\u043erp/web"),
    ("dns", "a" * 64 + ".b"), ("dns", ".".join(["a" * 63] * 3 + ["a" * 62])),
    ("cn", "c" * 65), ("dns", "*.internal"), ("dns", ""), ("cn", ""), ("uri", "no-scheme"),
    ("ip", "010.0.0.7"), ("spiffe", "//corp/web"),
])
def test_look_alike_names_are_refused(kind, value):
    with pytest.raises(ValueError):
        canonical_name(kind, value)


# -- AccessControl.admit_identity ----------------------------------------------------------

IDENTITIES = {"uri:spiffe://corp/web": "acme", "dns:billing.internal": "billing",
              "dns:ops.internal": "*"}


class SwitchableStore:
    """A real SQLite store whose `admit` can be made unreachable."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.down = False

    async def admit(self, **kwargs):
        if self.down:
            raise StoreUnavailableError("store down")
        return await self.inner.admit(**kwargs)


def run_admissions(tmp_path, script, *, fail_open: bool = False, identities=IDENTITIES):
    """Runs `script(access, store)` against a fresh store holding projects acme, billing."""

    async def main():
        inner = await open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
        try:
            for project_id in ("acme", "billing", "default"):
                await inner.create_project(Project(project_id))
            store = SwitchableStore(inner)
            access = AccessControl(store, FrozenClock(), ["igk_static_admin_key_0123456789"],
                                   fail_open_rate_limit=fail_open, identity_projects=identities)
            return await script(access, store)
        finally:
            await inner.close()

    return asyncio.run(main())


def test_a_mapped_identity_acts_for_its_project(tmp_path):
    async def script(access, _):
        implied = await access.admit_identity(["cn:web", "uri:spiffe://corp/web"],
                                              MethodPolicy.PROJECT, "")
        named = await access.admit_identity(["uri:spiffe://corp/web"], MethodPolicy.PROJECT, "acme")
        return implied, named

    implied, named = run_admissions(tmp_path, script)
    for context in (implied, named):
        assert context.project.project_id == "acme"
        assert not context.caller.is_admin
        # The entry's position, like static keys' "static-<n>": logs may show it.
        assert context.caller.key_id == "tls-0"


@pytest.mark.parametrize("policy", [MethodPolicy.PROJECT, MethodPolicy.PROJECT_UNCOUNTED])
def test_a_mapped_identity_may_not_name_another_project(tmp_path, policy):
    async def script(access, _):
        return await access.admit_identity(["uri:spiffe://corp/web"], policy, "billing")

    with pytest.raises(ProjectForbiddenError, match="billing"):
        run_admissions(tmp_path, script)


def test_a_malformed_project_id_is_refused_before_any_lookup_or_echo(tmp_path):
    hostile = "x" * 3000

    async def script(access, _):
        return await access.admit_identity(["uri:spiffe://corp/web"], MethodPolicy.PROJECT,
                                           hostile)

    with pytest.raises(InvalidFieldError) as caught:
        run_admissions(tmp_path, script)
    assert hostile not in str(caught.value)


def test_a_project_identity_may_not_administer(tmp_path):
    async def script(access, _):
        return await access.admit_identity(["dns:billing.internal"], MethodPolicy.ADMIN, "")

    with pytest.raises(ProjectForbiddenError):
        run_admissions(tmp_path, script)


def test_an_admin_identity_acts_anywhere(tmp_path):
    async def script(access, _):
        admin = await access.admit_identity(["dns:ops.internal"], MethodPolicy.ADMIN, "")
        billing = await access.admit_identity(["dns:ops.internal"], MethodPolicy.PROJECT, "billing")
        default = await access.admit_identity(["dns:ops.internal"], MethodPolicy.PROJECT, "")
        return admin, billing, default

    admin, billing, default = run_admissions(tmp_path, script)
    assert admin.caller.is_admin and admin.project is None
    assert billing.project.project_id == "billing"
    assert default.project.project_id == "default"


@pytest.mark.parametrize("identities", [[], ["dns:nobody.internal"],
                                        ["uri:spiffe://corp/web", "dns:billing.internal"]])
def test_unmapped_or_ambiguous_identities_are_unauthenticated(tmp_path, identities):
    async def script(access, _):
        return await access.admit_identity(identities, MethodPolicy.PROJECT, "")

    with pytest.raises(InvalidApiKeyError):
        run_admissions(tmp_path, script)


def test_a_mapped_project_that_does_not_exist_is_not_found(tmp_path):
    async def script(access, _):
        return await access.admit_identity(["dns:new.internal"], MethodPolicy.PROJECT, "")

    with pytest.raises(NotFoundError):
        run_admissions(tmp_path, script, identities={"dns:new.internal": "missing"})


def test_fail_open_remembers_an_identity_but_not_for_a_key_spelling_it(tmp_path):
    async def script(access, store):
        await access.admit_identity(["uri:spiffe://corp/web"], MethodPolicy.PROJECT, "")
        store.down = True
        remembered = await access.admit_identity(["uri:spiffe://corp/web"], MethodPolicy.PROJECT,
                                                 "")
        # A bearer key whose text is the identity must not inherit its admission.
        with pytest.raises(StoreUnavailableError):
            await access.admit("uri:spiffe://corp/web", MethodPolicy.PROJECT, "")
        return remembered

    assert run_admissions(tmp_path, script, fail_open=True).project.project_id == "acme"


# -- the client's TLS configuration ---------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("ICEGATE_TARGET", "ICEGATE_API_KEY", "ICEGATE_TLS_CA", "ICEGATE_TLS_CERT",
                 "ICEGATE_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_no_tls_files_means_an_insecure_channel(clean_env):
    connection = Connection.resolve("icegate.test:50051", "key")
    assert connection.tls is None and connection.channel_credentials() is None


def test_tls_files_come_from_the_environment_unless_given(clean_env):
    clean_env.setenv("ICEGATE_TLS_CA", "/env/ca.pem")
    clean_env.setenv("ICEGATE_TLS_CERT", "/env/cert.pem")
    clean_env.setenv("ICEGATE_TLS_KEY", "/env/key.pem")
    assert TlsConfig.from_env() == TlsConfig("/env/ca.pem", "/env/cert.pem", "/env/key.pem")
    assert TlsConfig.from_env(ca_file="/flag/ca.pem").ca_file == "/flag/ca.pem"
    given = TlsConfig(ca_file="/given/ca.pem")
    assert Connection.resolve(None, "key", tls=given).tls == given


def test_a_client_certificate_needs_its_key(clean_env, tmp_path):
    tls = TlsConfig(cert_file=str(tmp_path / "cert.pem"))
    with pytest.raises(icegate.ConfigurationError, match="go together"):
        icegate.Client("127.0.0.1:1", "key", tls=tls)


def test_an_unreadable_tls_file_is_named(clean_env, tmp_path):
    with pytest.raises(icegate.ConfigurationError, match=r"missing-ca\.pem"):
        icegate.Client("127.0.0.1:1", "key", tls=TlsConfig(ca_file=str(tmp_path /
                                                                       "missing-ca.pem")))


def test_a_client_certificate_makes_the_key_optional(clean_env):
    with_cert = Connection.resolve(None, None, tls=TlsConfig(cert_file="c", key_file="k"))
    assert with_cert.call_metadata((("x-trace", "1"),)) == (("x-trace", "1"),)
    with_key = Connection.resolve(None, "the-key", tls=TlsConfig(cert_file="c", key_file="k"))
    assert ("authorization", "Bearer the-key") in with_key.call_metadata(())
    without = Connection.resolve(None, None, tls=TlsConfig(ca_file="ca"))
    with pytest.raises(icegate.ConfigurationError, match="no API key"):
        without.call_metadata(())


def test_a_client_certificate_is_not_overridden_by_the_dev_key(clean_env, tmp_path):
    (tmp_path / ".icegate").mkdir()
    (tmp_path / ".icegate" / "dev-secrets.json").write_text(json.dumps({"api_key": "dev-key"}))
    assert Connection.resolve(None, None).api_key == "dev-key"
    assert Connection.resolve(None, None, tls=TlsConfig(cert_file="c", key_file="k")
                              ).api_key is None


def test_wait_for_ready_is_passed_only_when_asked(clean_env):
    assert Connection.resolve(None, "k").call_options == {}
    assert Connection.resolve(None, "k", wait_for_ready=True).call_options == {
        "wait_for_ready": True}


def test_server_name_overrides_the_name_checked(clean_env):
    connection = Connection.resolve("10.0.0.5:50051", "k",
                                    tls=TlsConfig(server_name="icegate.internal"))
    assert ("grpc.ssl_target_name_override", "icegate.internal") in \
        connection.channel_options()
