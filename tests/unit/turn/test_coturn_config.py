"""`icegate-server coturn-config`: coturn's settings follow icegate's, never drift, and a config
that would contradict the URIs icegate hands out is refused."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from typing import Any

import pytest

from icegate_server.cli import main
from icegate_server.settings import ConfigError, Settings, load_settings
from icegate_server.turn.coturn_config import (
    TLS_CIPHERS,
    CoturnConfigError,
    CoturnRendering,
    render_coturn_config,
)

SIGNING = "signing-secret-0123456789"
PREVIOUS = "previous-secret-0123456789"
OLDEST = "oldest-secret-0123456789"

# What the issue and CVE-2020-26262 ask for, spelled here independently of coturn_config's
# own table: each must be refused whole by the rendered config.
REQUIRED_DENIED = (
    "0.0.0.0/8", "10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "224.0.0.0/4", "100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15",
    "240.0.0.0/4", "::1/128", "fc00::/7", "fe80::/10", "::ffff:0:0/96", "64:ff9b::/96",
    # eturnal's recommended blacklist_peers, besides the above.
    "192.0.2.0/24", "192.88.99.0/24", "198.51.100.0/24", "203.0.113.0/24", "100::/64",
    "ff00::/8",
)


def conf_lines(text: str) -> list[str]:
    """The directives of a turnserver.conf, without comments and blank lines."""
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def directive_values(text: str, name: str) -> list[str]:
    return [line.partition("=")[2] for line in conf_lines(text) if line.partition("=")[0] == name]


def denied_ranges(text: str) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address,
                                           ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    ranges = []
    for value in directive_values(text, "denied-peer-ip"):
        first, _, last = value.partition("-")
        ranges.append((ipaddress.ip_address(first), ipaddress.ip_address(last or first)))
    return ranges


def is_denied(text: str, network: str) -> bool:
    block = ipaddress.ip_network(network)
    return any(first.version == block.version and first <= block[0] and block[-1] <= last
               for first, last in denied_ranges(text))


def render(settings: Settings, **rendering: Any) -> str:
    text, _ = render_coturn_config(settings, CoturnRendering(**rendering))
    return text


def with_coturn_side(settings: Settings, **values: str) -> Settings:
    """`settings` with ICEGATE_COTURN_CLI/_PASSWORD/_STATSDB, which TURN usage and revocation
    declare: replaced when declared here, set on the instance otherwise."""
    declared = {f.name for f in dataclasses.fields(Settings)}
    result = dataclasses.replace(settings, **{k: v for k, v in values.items() if k in declared})
    for name, value in values.items():
        if name not in declared:
            object.__setattr__(result, name, value)
    return result


@pytest.fixture
def settings(tmp_path):
    return Settings(
        data_dir=tmp_path / ".icegate",
        turn_secrets=(SIGNING, PREVIOUS, OLDEST),
        turn_uris=("turn:turn.example.test:3479?transport=udp",
                   "turn:turn.example.test:3479?transport=tcp"),
        turn_realm="realm.example.test",
    )


@pytest.fixture
def tls_settings(settings):
    return dataclasses.replace(
        settings, turn_uris=(*settings.turn_uris, "turns:turn.example.test:443?transport=tcp"),
        coturn_tls_cert="/etc/icegate-coturn/tls/fullchain.pem",
        coturn_tls_key="/etc/icegate-coturn/tls/privkey.pem")


def test_secrets_realm_and_rest_mode(settings):
    text = render(settings)
    assert directive_values(text, "static-auth-secret") == [SIGNING, PREVIOUS, OLDEST]
    assert directive_values(text, "realm") == ["realm.example.test"]
    assert "use-auth-secret" in conf_lines(text)
    assert "${" not in text
    # coturn leaks memory with per-username labels, and every REST username is new.
    assert not any(line.startswith("prometheus-username-labels") for line in conf_lines(text))


def test_listening_port_comes_from_the_first_turn_uri(settings):
    assert directive_values(render(settings), "listening-port") == ["3479"]


def test_turns_uris_do_not_choose_the_plain_port(tls_settings):
    settings = dataclasses.replace(tls_settings, turn_uris=("turns:turn.example.test:5349",
                                                            "turn:turn.example.test:3480"))
    assert directive_values(render(settings), "listening-port") == ["3480"]


@pytest.mark.parametrize(
    "turn_uris",
    [
        ("turn:turn.example.test?transport=udp", "turn:turn.example.test:3478?transport=tcp"),
        ("turns:turn.example.test:5349",),
    ],
)
def test_no_port_on_the_first_turn_uri_means_the_standard_port(tls_settings, turn_uris):
    # Browsers reach a port-less turn: URI on 3478, so coturn must listen there.
    settings = dataclasses.replace(tls_settings, turn_uris=turn_uris)
    assert directive_values(render(settings), "listening-port") == ["3478"]


def test_ipv6_turn_uri_port(settings):
    settings = dataclasses.replace(settings, turn_uris=("turn:[2001:db8::1]:3482",))
    assert directive_values(render(settings), "listening-port") == ["3482"]


def test_rendering_options_reach_the_file(settings):
    text = render(settings, listening_ip="10.0.0.5", relay_ip="10.0.0.6",
                  min_port=50000, max_port=50100, external_ip="203.0.113.7/10.0.0.6")
    assert directive_values(text, "listening-ip") == ["10.0.0.5"]
    assert directive_values(text, "relay-ip") == ["10.0.0.6"]
    assert directive_values(text, "min-port") == ["50000"]
    assert directive_values(text, "max-port") == ["50100"]
    assert directive_values(text, "external-ip") == ["203.0.113.7/10.0.0.6"]
    assert directive_values(render(settings), "external-ip") == []


@pytest.mark.parametrize("rendering", [
    {"listening_ip": "turn.example.test"},
    {"relay_ip": "10.0.0.6\nallow-loopback-peers"},
    {"external_ip": "203.0.113.7/not-an-ip"},
    {"external_ip": "203.0.113.7\nno-auth"},
    {"min_port": 50000, "max_port": 49999},
    {"min_port": 0},
    {"max_port": 70000},
])
def test_bad_rendering_options_are_refused(settings, rendering):
    with pytest.raises(CoturnConfigError):
        render(settings, **rendering)


def test_state_lives_under_the_data_dir(settings):
    text = render(settings)
    state_dir = str(settings.data_dir.resolve() / "coturn")
    assert directive_values(text, "userdb") == [f"{state_dir}/turndb"]
    assert directive_values(text, "pidfile") == [f"{state_dir}/turnserver.pid"]


def test_no_secrets_gives_no_secret_lines(settings):
    text = render(dataclasses.replace(settings, turn_secrets=()))
    assert directive_values(text, "static-auth-secret") == []
    assert "${" not in text


# -- the peer deny-list and the hardening lines --------------------------------------------


@pytest.mark.parametrize("network", REQUIRED_DENIED)
def test_production_config_denies_every_required_range(settings, network):
    assert is_denied(render(settings), network), network


def test_production_config_never_allows_loopback_peers_and_asks_no_more(settings):
    text = render(settings)
    lines = conf_lines(text)
    assert "allow-loopback-peers" not in lines
    for directive in ("no-multicast-peers", "no-software-attribute", "no-rfc5780",
                      "no-stun-backward-compatibility", "no-tcp-relay", "no-cli", "no-dtls",
                      "fingerprint", "use-auth-secret"):
        assert directive in lines, directive
    assert directive_values(text, "stale-nonce") == ["600"]
    # A public relay must still reach public peers.
    for public in ("8.8.8.0/24", "2001:4860::/32", "1.1.1.1/32"):
        assert not is_denied(text, public), public


def test_loopback_peers_only_for_a_coturn_on_loopback(settings):
    text = render(settings, allow_loopback_peers=True)
    assert "allow-loopback-peers" in conf_lines(text)
    assert not is_denied(text, "127.0.0.1/32") and not is_denied(text, "::1/128")
    assert is_denied(text, "10.0.0.0/8") and is_denied(text, "fc00::/7")
    for rendering in ({"listening_ip": "0.0.0.0"}, {"relay_ip": "203.0.113.5"},  # noqa: S104
                      {"listening_ip": "192.0.2.1", "relay_ip": "127.0.0.1"}):
        with pytest.raises(CoturnConfigError, match="loopback"):
            render(settings, allow_loopback_peers=True, **rendering)


# -- TLS: the config matches the turns: URIs -------------------------------------------------


def test_turns_uris_get_tls_on_their_port_with_the_operators_certificate(tls_settings):
    text = render(tls_settings)
    lines = conf_lines(text)
    assert "no-tls" not in lines
    assert directive_values(text, "tls-listening-port") == ["443"]
    assert directive_values(text, "cert") == ["/etc/icegate-coturn/tls/fullchain.pem"]
    assert directive_values(text, "pkey") == ["/etc/icegate-coturn/tls/privkey.pem"]
    assert directive_values(text, "cipher-list") == [f'"{TLS_CIPHERS}"']
    assert all(suite.startswith("ECDHE-") and ("GCM" in suite or "CHACHA20" in suite)
               for suite in TLS_CIPHERS.split(":"))


def test_turns_uri_without_a_port_means_5349(tls_settings):
    settings = dataclasses.replace(tls_settings, turn_uris=("turn:t.example.test:3478",
                                                            "turns:t.example.test"))
    assert directive_values(render(settings), "tls-listening-port") == ["5349"]


def test_turns_uris_without_a_certificate_are_refused(settings):
    settings = dataclasses.replace(
        settings, turn_uris=(*settings.turn_uris, "turns:turn.example.test:5349?transport=tcp"))
    with pytest.raises(CoturnConfigError, match="ICEGATE_COTURN_TLS_CERT"):
        render(settings)


def test_no_turns_uri_means_no_tls(settings):
    assert "no-tls" in conf_lines(render(settings))


def test_turns_uris_on_two_ports_or_on_the_plain_port_are_refused(tls_settings):
    two = dataclasses.replace(tls_settings, turn_uris=("turns:a.example.test:443",
                                                       "turns:a.example.test:5349"))
    with pytest.raises(CoturnConfigError, match="one port"):
        render(two)
    same = dataclasses.replace(tls_settings, turn_uris=("turn:a.example.test:443",
                                                        "turns:a.example.test:443"))
    with pytest.raises(CoturnConfigError, match="same port"):
        render(same)


def test_turn_uris_on_two_plain_ports_are_refused(settings):
    settings = dataclasses.replace(settings, turn_uris=("turn:a.example.test:3478",
                                                        "turn:a.example.test:3480"))
    with pytest.raises(CoturnConfigError, match="same port"):
        render(settings)


def test_stun_uris_on_another_port_than_coturns_warn(settings):
    _, warnings = render_coturn_config(settings)
    assert any("stun:127.0.0.1:3478" in warning and "3479" in warning for warning in warnings)
    matching = dataclasses.replace(settings, stun_uris=("stun:turn.example.test:3479",))
    assert render_coturn_config(matching)[1] == []


def test_a_certificate_without_turns_uris_warns(settings):
    settings = dataclasses.replace(settings, coturn_tls_cert="/etc/c/cert.pem",
                                   coturn_tls_key="/etc/c/key.pem")
    text, warnings = render_coturn_config(settings)
    assert directive_values(text, "tls-listening-port") == ["5349"]
    assert any("no turns: URI" in warning for warning in warnings)


@pytest.mark.parametrize("path", ["relative/cert.pem", "/etc/c/cert pem", '/etc/c/"cert"',
                                  "/etc/c/cert.pem\nno-auth", "/etc/c/#cert", "/etc/c/ć.pem"])
def test_coturn_certificate_paths_that_would_break_the_config_are_refused(path):
    environ = {"ICEGATE_COTURN_TLS_CERT": path, "ICEGATE_COTURN_TLS_KEY": "/etc/c/key.pem"}
    with pytest.raises(ConfigError, match="ICEGATE_COTURN_TLS_CERT"):
        load_settings({}, environ)


def test_coturn_certificate_and_key_go_together():
    with pytest.raises(ConfigError, match="ICEGATE_COTURN_TLS_KEY"):
        load_settings({}, {"ICEGATE_COTURN_TLS_CERT": "/etc/c/cert.pem"})
    with pytest.raises(ConfigError, match="ICEGATE_COTURN_TLS_CERT"):
        load_settings({}, {"ICEGATE_COTURN_TLS_KEY": "/etc/c/key.pem"})


# -- coturn's own limits -----------------------------------------------------------------------


def test_backstop_limits_only_where_the_operator_asks(settings):
    assert not any(directive_values(render(settings), name)
                   for name in ("user-quota", "total-quota", "max-bps"))
    limited = dataclasses.replace(settings, coturn_user_quota=4, coturn_total_quota=2000,
                                  coturn_max_bps=250000)
    text = render(limited)
    assert directive_values(text, "user-quota") == ["4"]
    assert directive_values(text, "total-quota") == ["2000"]
    assert directive_values(text, "max-bps") == ["250000"]


@pytest.mark.parametrize(("name", "value"), [("ICEGATE_COTURN_USER_QUOTA", "-1"),
                                             ("ICEGATE_COTURN_TOTAL_QUOTA", "lots"),
                                             ("ICEGATE_COTURN_MAX_BPS", "10000000000000")])
def test_bad_backstop_limits_are_refused(name, value):
    with pytest.raises(ConfigError, match=name):
        load_settings({}, {name: value})


# -- the stats Redis and the admin CLI (their settings come with usage and revocation) ------


def test_no_cli_and_no_statsdb_unless_configured(settings):
    text = render(settings)
    assert "no-cli" in conf_lines(text)
    assert directive_values(text, "redis-statsdb") == []


def test_cli_on_loopback_with_its_password_and_the_stats_redis(settings):
    settings = with_coturn_side(settings, coturn_cli="127.0.0.1:5766",
                                coturn_cli_password="cli-password-0123456789",
                                coturn_statsdb="redis://:pw@127.0.0.1:6380/2")
    text = render(settings)
    assert "no-cli" not in conf_lines(text)
    assert directive_values(text, "cli-ip") == ["127.0.0.1"]
    assert directive_values(text, "cli-port") == ["5766"]
    assert directive_values(text, "cli-password") == ["cli-password-0123456789"]
    assert directive_values(text, "redis-statsdb") == [
        '"ip=127.0.0.1 dbname=2 port=6380 password=pw connect_timeout=30"']


@pytest.mark.parametrize(("cli", "password", "problem"), [
    ("0.0.0.0:5766", "cli-password-0123456789", "loopback"),
    ("192.0.2.10:5766", "cli-password-0123456789", "loopback"),
    ("turn.example.test:5766", "cli-password-0123456789", "loopback"),
    ("127.0.0.1:5766", "", "ICEGATE_COTURN_CLI_PASSWORD"),
    ("127.0.0.1:5766", "two words", "ICEGATE_COTURN_CLI_PASSWORD"),
    ("127.0.0.1", "cli-password-0123456789", "host:port"),
])
def test_cli_beyond_loopback_or_without_a_password_is_refused(settings, cli, password,
                                                              problem):
    settings = with_coturn_side(settings, coturn_cli=cli, coturn_cli_password=password)
    with pytest.raises(CoturnConfigError, match=problem):
        render(settings)


# -- the command ------------------------------------------------------------------------------


def test_command_refuses_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    for name in [n for n in os.environ if n.startswith("ICEGATE_")]:
        monkeypatch.delenv(name)
    output = tmp_path / "turnserver.conf"
    monkeypatch.setenv("ICEGATE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ICEGATE_TURN_URIS", "turn:t.example.test:3478,turns:t.example.test:443")
    assert main(["coturn-config", "--output", str(output)]) == 2
    # (the other stderr lines are the dev-secret notices, JSON log lines)
    (error,) = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("icegate-server coturn-config:")]
    assert "ICEGATE_COTURN_TLS_CERT" in error
    assert not output.exists()
    assert main(["coturn-config", "--output", str(output), "--coturn-listening-ip",
                 "0.0.0.0", "--coturn-allow-loopback-peers"]) == 2  # noqa: S104
    assert not output.exists()


def test_command_warns_and_writes(tmp_path, monkeypatch, capsys):
    for name in [n for n in os.environ if n.startswith("ICEGATE_")]:
        monkeypatch.delenv(name)
    output = tmp_path / "turnserver.conf"
    monkeypatch.setenv("ICEGATE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ICEGATE_COTURN_TLS_CERT", "/etc/c/cert.pem")
    monkeypatch.setenv("ICEGATE_COTURN_TLS_KEY", "/etc/c/key.pem")
    assert main(["coturn-config", "--output", str(output)]) == 0
    assert "warning: coturn will listen for TLS" in capsys.readouterr().err
    assert "tls-listening-port=5349" in output.read_text().splitlines()
