"""The production coturn config, rendered by `icegate-server coturn-config` and run for real,
refuses to relay into any denied range (CVE-2020-26262): 403 Forbidden IP to a
CreatePermission for a peer there, over IPv4 and IPv6, while public peers stay reachable.

A CreatePermission only asks coturn to record a permission: nothing is ever sent to the peer,
so asking about any address is safe (the test never relays data).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.coturn import rest_credential
from harness.icegate_server import TEST_TURN_SECRET
from harness.ports import free_tcp_udp_port, reserve_relay_range
from harness.pytest_plugin import require_binaries
from harness.rendered_coturn import RenderedCoturn, run_coturn_config_command
from harness.turn_client import TurnClient

pytestmark = pytest.mark.coturn

REALM = "deny.icegate.test"
# Spelled here, not taken from coturn_config: the ranges the issue and CVE-2020-26262 name,
# with eturnal's recommended list.
DENIED = {
    4: ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
        "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4"),
    6: ("::1/128", "::ffff:0:0/96", "64:ff9b::/96", "100::/64", "2001::/32", "2002::/16",
        "fc00::/7", "fe80::/10", "ff00::/8"),
}
PUBLIC = {4: ("8.8.8.8", "1.1.1.1", "81.2.69.160"),
          6: ("2001:4860:4860::8888", "2a00:1450:4001::1")}


def sample_addresses(network: str) -> list[str]:
    """The first, a middle and the last address of `network`."""
    block = ipaddress.ip_network(network)
    return sorted({str(block[0]), str(block[block.num_addresses // 2]), str(block[-1])})


@pytest.fixture(scope="module", params=[4, 6], ids=["ipv4", "ipv6"])
def production_coturn(request: pytest.FixtureRequest,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str,
                                                                                  int]]:
    """coturn on the production rendering: (family, host, port)."""
    require_binaries("turnserver")
    family: int = request.param
    host = "127.0.0.1" if family == 4 else "::1"
    directory = tmp_path_factory.mktemp(f"deny-ipv{family}")
    port = free_tcp_udp_port()
    relay = reserve_relay_range()
    config = directory / "turnserver.conf"
    rendered = run_coturn_config_command(
        {"ICEGATE_TURN_SECRETS": TEST_TURN_SECRET, "ICEGATE_TURN_REALM": REALM,
         "ICEGATE_TURN_URIS": f"turn:127.0.0.1:{port}?transport=udp",
         "ICEGATE_DATA_DIR": str(directory / "data")},
        config, "--coturn-listening-ip", host, "--coturn-relay-ip", host,
        "--coturn-min-port", str(relay.min_port), "--coturn-max-port", str(relay.max_port))
    assert rendered.returncode == 0, rendered.stderr
    try:
        with RenderedCoturn(config, host, port):
            yield family, host, port
    finally:
        relay.release()


def allocated_client(host: str, port: int, family: int) -> TurnClient:
    username, password = rest_credential(TEST_TURN_SECRET, "alice", 2**31 - 1)
    client = TurnClient(host, port)
    answer = client.allocate(username, password, family=family)
    assert answer.code == 0, (answer.code, answer.reason)
    return client


def test_the_rendered_config_has_no_loopback_exception():
    text = Path(__file__).resolve().parents[2].joinpath(
        "deploy/coturn/turnserver.conf.template").read_text()
    # The template carries no peer policy of its own: all of it is rendered, so the
    # production rendering is the only source of allow-loopback-peers (never, there).
    assert "allow-loopback-peers\n" not in [line + "\n" for line in text.splitlines()
                                            if not line.startswith("#")]


def test_every_denied_range_is_refused_with_403(production_coturn):
    family, host, port = production_coturn
    with allocated_client(host, port, family) as client:
        refused = {address: client.create_permission(address)
                   for network in DENIED[family] for address in sample_addresses(network)}
    assert {address: code for address, code in refused.items() if code != 403} == {}


def test_public_peers_are_still_reachable(production_coturn):
    family, host, port = production_coturn
    with allocated_client(host, port, family) as client:
        assert {address: client.create_permission(address) for address in PUBLIC[family]} == \
            dict.fromkeys(PUBLIC[family], 0)


def test_this_hosts_own_services_cannot_be_reached_through_the_relay(production_coturn):
    """The attack of CVE-2020-26262: relay to icegate, Redis or the CLI on loopback."""
    family, host, port = production_coturn
    with allocated_client(host, port, family) as client:
        assert client.create_permission(host) == 403
        # The unspecified address reaches this host on Linux.
        assert client.create_permission("0.0.0.0" if family == 4 else "::") == 403  # noqa: S104
        if family == 4:
            assert client.create_permission("127.0.0.2") == 403
        else:
            # The same loopback, spelled as IPv4-mapped IPv6.
            assert client.create_permission("::ffff:127.0.0.1") == 403


def test_credentials_are_still_required(production_coturn):
    family, host, port = production_coturn
    username, password = rest_credential(TEST_TURN_SECRET, "alice", 2**31 - 1)
    with TurnClient(host, port) as client:
        assert client.allocate(username, "A" + password[1:], family=family).code == 401
    expired, expired_password = rest_credential(TEST_TURN_SECRET, "alice", 1_000_000)
    with TurnClient(host, port) as client:
        assert client.allocate(expired, expired_password, family=family).code == 401
