"""`icegate-server coturn-config`: a turnserver.conf that matches icegate's own settings.

Rendered from `deploy/coturn/turnserver.conf.template` (shipped inside the wheel as package
data), so the realm, the secrets, the ports and the TLS coturn uses can never drift from the
URIs icegate hands out. A config that would contradict them is refused (`CoturnConfigError`):
`turns:` URIs without a certificate for coturn, turn: or turns: URIs on two ports, a CLI beyond
loopback, loopback peers on a coturn that answers beyond loopback. stun: URIs on another port
than coturn's only warn.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

from icegate_server.settings import Settings, parse_listen_address

_REPO_TEMPLATE = Path(__file__).resolve().parents[3] / "deploy/coturn/turnserver.conf.template"
DEFAULT_TURN_PORT = 3478
DEFAULT_TURNS_PORT = 5349
"""RFC 7065: a `turns:` URI without a port means 5349."""

TLS_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305"))
"""Forward-secret AEAD suites only (Mozilla's "intermediate" TLS 1.2 list). None of them exists
before TLS 1.2, so TLS 1.0 and 1.1 handshakes fail too (tests/integration/test_coturn_tls.py).
coturn 4.6.1's `no-tlsv1`/`no-tlsv1_1` are not used: with them its own test client,
turnutils_uclient, hangs after the handshake (seen here), and the cipher list already refuses
those versions."""

DENIED_PEER_NETWORKS: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space, carrier-grade NAT (RFC 6598)"),
    ("127.0.0.0/8", "loopback: this host's own services"),
    ("169.254.0.0/16", "link-local, cloud metadata services"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, and broadcast"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped: the IPv4 ranges above by another name"),
    ("64:ff9b::/96", "NAT64: IPv4 behind a translator"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo (RFC 6156: a relay must not accept it)"),
    ("2002::/16", "6to4 (RFC 6156: a relay must not accept it)"),
    ("fc00::/7", "unique local (IPv6 private)"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
)
"""Every range coturn refuses to relay to, with why: eturnal's recommended list (the defaults
of its `blacklist_peers`), IPv4-mapped IPv6, and RFC 6156's. Not `::` (unspecified): coturn
4.6.1 reads `denied-peer-ip=::-::` as "any address" and then refuses every IPv4 peer too (seen
here); it answers a peer `::` with 403 by itself (tests/integration/test_coturn_deny_list.py)."""

_LOOPBACK_NETWORKS = frozenset({"127.0.0.0/8", "::1/128"})
_CLI_PASSWORD_PATTERN = re.compile(r"[!$-&(-~]{1,256}")
"""coturn reads `cli-password=` to the end of the line: printable ASCII, no space or quote."""


class CoturnConfigError(ValueError):
    """The rendered config would contradict icegate's settings; the message says how, in one
    line, without a secret."""


@dataclass(frozen=True)
class CoturnRendering:
    """What `coturn-config` takes besides the settings: this host's side of coturn.

    Attributes:
        listening_ip: The address coturn answers STUN/TURN on.
        relay_ip: The address relayed traffic leaves from.
        min_port, max_port: The relay UDP port range.
        external_ip: `PUBLIC` or `PUBLIC/PRIVATE`, for a coturn behind a 1:1 NAT (empty:
            none): coturn then tells clients the public address of their relay.
        allow_loopback_peers: Let relayed traffic reach this host's loopback (for a coturn
            whose every address is loopback: `make coturn`, tests). Refused otherwise.
    """

    listening_ip: str = "127.0.0.1"
    relay_ip: str = "127.0.0.1"
    min_port: int = 49160
    max_port: int = 49200
    external_ip: str = ""
    allow_loopback_peers: bool = False


def _template_text() -> str:
    # A source checkout reads the template in deploy/; an installed wheel carries a copy.
    if _REPO_TEMPLATE.is_file():
        return _REPO_TEMPLATE.read_text(encoding="utf-8")
    return resources.files("icegate_server").joinpath("turnserver.conf.template").read_text(
        encoding="utf-8")


def _uri_port(uri: str, scheme: str, default: int) -> int:
    # turn:host:port?transport=udp -> parse as a URL with a fake authority. A URI without a
    # port means the scheme's standard port to browsers.
    return urlsplit(f"{scheme}://" + uri.removeprefix(f"{scheme}:")).port or default


def listening_port(settings: Settings) -> int:
    """The port coturn must listen on: the one in the first plain turn: URI, else 3478."""
    for uri in settings.turn_uris:
        if uri.startswith("turn:"):
            return _uri_port(uri, "turn", DEFAULT_TURN_PORT)
    return DEFAULT_TURN_PORT


def _check_plain_ports(settings: Settings) -> list[str]:
    """Refuses turn: URIs on several ports; warns of stun: URIs coturn would not answer.

    Raises:
        CoturnConfigError: The turn: URIs name different ports (coturn listens on one).
    """
    ports = {_uri_port(uri, "turn", DEFAULT_TURN_PORT) for uri in settings.turn_uris
             if uri.startswith("turn:")}
    if len(ports) > 1:
        raise CoturnConfigError(
            f"ICEGATE_TURN_URIS names turn: ports {sorted(ports)}; coturn listens on one "
            "port: give every turn: URI the same port")
    port = listening_port(settings)
    return [f"ICEGATE_STUN_URIS hands out {uri}, but coturn listens on port {port}"
            for uri in settings.stun_uris
            if uri.startswith("stun:") and _uri_port(uri, "stun", DEFAULT_TURN_PORT) != port]


def tls_listening_port(settings: Settings) -> int | None:
    """The port of the turns: URIs (they must agree), None when there is none.

    Raises:
        CoturnConfigError: The turns: URIs name different ports (coturn has one TLS port).
    """
    ports = {_uri_port(uri, "turns", DEFAULT_TURNS_PORT) for uri in settings.turn_uris
             if uri.startswith("turns:")}
    if len(ports) > 1:
        raise CoturnConfigError(
            f"ICEGATE_TURN_URIS names turns: ports {sorted(ports)}; coturn listens for TLS on "
            "one port: give every turns: URI the same port")
    return ports.pop() if ports else None


def redis_connection_line(url: str) -> str:
    """coturn's Redis connection string (`ip=... dbname=... port=...`) for a redis:// URL."""
    parts = urlsplit(url)
    fields = [f"ip={parts.hostname or '127.0.0.1'}", f"dbname={parts.path.strip('/') or 0}",
              f"port={parts.port or 6379}"]
    if parts.password:
        fields.append(f"password={parts.password}")
    return " ".join([*fields, "connect_timeout=30"])


def redis_userdb_line(url: str) -> str:
    """coturn's `redis-userdb` line for a redis:// URL."""
    return f'redis-userdb="{redis_connection_line(url)}"'


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def peer_access_lines(*, allow_loopback_peers: bool) -> list[str]:
    """The denied-peer-ip lines (coturn takes address ranges, not prefixes), one per range."""
    lines = ["allow-loopback-peers"] if allow_loopback_peers else []
    for network, why in DENIED_PEER_NETWORKS:
        if allow_loopback_peers and network in _LOOPBACK_NETWORKS:
            continue
        block = ipaddress.ip_network(network)
        # coturn reads a value to the end of its line: the reason goes on a line of its own.
        lines += [f"# {network}: {why}", f"denied-peer-ip={block[0]}-{block[-1]}"]
    return lines


def _tls_lines(settings: Settings) -> tuple[str, list[str]]:
    """(tls placeholder, warnings) for `settings`."""
    port = tls_listening_port(settings)
    if port is not None and not settings.coturn_tls_cert:
        raise CoturnConfigError(
            "ICEGATE_TURN_URIS hands out turns: URIs, but coturn would have no TLS: set "
            "ICEGATE_COTURN_TLS_CERT and ICEGATE_COTURN_TLS_KEY (coturn's certificate for "
            "the turns: host), or drop the turns: URIs")
    if not settings.coturn_tls_cert:
        return "no-tls", []
    warnings = []
    if port is None:
        port = DEFAULT_TURNS_PORT
        warnings.append(f"coturn will listen for TLS on {port}, but ICEGATE_TURN_URIS hands out "
                        "no turns: URI, so no browser will use it")
    if port == listening_port(settings):
        raise CoturnConfigError(
            f"ICEGATE_TURN_URIS puts turn: and turns: on the same port {port}; coturn needs "
            "one port for each")
    return "\n".join([f"tls-listening-port={port}", f"cert={settings.coturn_tls_cert}",
                      f"pkey={settings.coturn_tls_key}", f'cipher-list="{TLS_CIPHERS}"']), warnings


def _admin_cli_lines(settings: Settings) -> str:
    address, password = settings.coturn_cli, settings.coturn_cli_password
    if not address:
        return "no-cli"
    try:
        host, port = parse_listen_address(address)
    except ValueError:
        raise CoturnConfigError("ICEGATE_COTURN_CLI must be host:port, e.g. 127.0.0.1:5766"
                                ) from None
    if not _is_loopback(host):
        raise CoturnConfigError(
            "ICEGATE_COTURN_CLI must be a loopback address (127.0.0.1 or [::1]): coturn's CLI "
            "ends sessions and shows every user, and must never answer beyond this host")
    if not _CLI_PASSWORD_PATTERN.fullmatch(password):
        raise CoturnConfigError(
            "ICEGATE_COTURN_CLI_PASSWORD is required with ICEGATE_COTURN_CLI: 1-256 printable "
            "ASCII characters without spaces, quotes or #")
    return "\n".join([f"cli-ip={host.strip('[]')}", f"cli-port={port}",
                      f"cli-password={password}"])


def _statistics_line(settings: Settings) -> str:
    url = settings.coturn_statsdb
    if not url:
        return "# redis-statsdb: off (ICEGATE_COTURN_STATSDB is not set)"
    return f'redis-statsdb="{redis_connection_line(url)}"'


def _limit_lines(settings: Settings) -> str:
    lines = [f"{name}={value}" for name, value in (
        ("user-quota", settings.coturn_user_quota), ("total-quota", settings.coturn_total_quota),
        ("max-bps", settings.coturn_max_bps)) if value]
    return "\n".join(lines) or "# no user-quota, total-quota or max-bps (ICEGATE_COTURN_*)"


def _check_rendering(rendering: CoturnRendering) -> None:
    if not 1 <= rendering.min_port <= rendering.max_port <= 65535:
        raise CoturnConfigError("the relay ports must satisfy 1 <= min-port <= max-port <= "
                                "65535")
    for name, address in (("listening", rendering.listening_ip),
                          ("relay", rendering.relay_ip)):
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise CoturnConfigError(f"the {name} address must be an IP address") from None
    if rendering.external_ip:
        try:
            for part in rendering.external_ip.split("/", 1):
                ipaddress.ip_address(part)
        except ValueError:
            raise CoturnConfigError("the external address must be PUBLIC or PUBLIC/PRIVATE "
                                    "(IP addresses)") from None
    if rendering.allow_loopback_peers and not (
            _is_loopback(rendering.listening_ip) and _is_loopback(rendering.relay_ip)):
        raise CoturnConfigError(
            "loopback peers are only for a coturn whose listening and relay addresses are "
            "loopback (make coturn, tests): on any other coturn they would let clients relay "
            "into this host's own services")


def render_coturn_config(settings: Settings,
                         rendering: CoturnRendering | None = None) -> tuple[str, list[str]]:
    """The turnserver.conf text for `settings`, and warnings for the operator.

    Where icegate keeps coturn's database (ICEGATE_COTURN_REDIS, ICEGATE_COTURN_SQLITE),
    coturn reads the secrets from there and follows rotations without a restart; otherwise
    the settings' secrets are written as static-auth-secret lines.

    Raises:
        CoturnConfigError: The config would contradict the settings (see the module).
    """
    rendering = rendering or CoturnRendering()
    _check_rendering(rendering)
    warnings = _check_plain_ports(settings)
    tls, tls_warnings = _tls_lines(settings)
    warnings += tls_warnings
    state_dir = settings.data_dir.resolve() / "coturn"
    static_secrets = "\n".join(f"static-auth-secret={s}" for s in settings.turn_secrets)
    user_database = f"userdb={state_dir / 'turndb'}"
    if settings.coturn_redis:
        static_secrets, user_database = "", redis_userdb_line(settings.coturn_redis)
    elif settings.coturn_sqlite:
        static_secrets, user_database = "", f"userdb={Path(settings.coturn_sqlite).resolve()}"
    text = Template(_template_text()).substitute(
        listening_ip=rendering.listening_ip,
        listening_port=listening_port(settings),
        tls=tls,
        relay_ip=rendering.relay_ip,
        external_ip=f"external-ip={rendering.external_ip}" if rendering.external_ip else "",
        min_port=rendering.min_port,
        max_port=rendering.max_port,
        realm=settings.turn_realm,
        static_auth_secrets=static_secrets,
        user_database=user_database,
        statistics=_statistics_line(settings),
        admin_cli=_admin_cli_lines(settings),
        peer_access="\n".join(peer_access_lines(
            allow_loopback_peers=rendering.allow_loopback_peers)),
        limits=_limit_lines(settings),
        state_dir=state_dir,
    )
    return text, warnings


def write_coturn_config(settings: Settings, output: str | None,
                        rendering: CoturnRendering | None = None) -> Sequence[str]:
    """Writes the config to `output` (mode 0600: it holds the secrets) or standard output.

    Returns:
        The warnings for the operator (the config is written all the same).

    Raises:
        CoturnConfigError: Nothing is written; the message says why.
    """
    text, warnings = render_coturn_config(settings, rendering)
    (settings.data_dir / "coturn").mkdir(parents=True, exist_ok=True, mode=0o700)
    if output is None:
        sys.stdout.write(text)
        return warnings
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, 0o600)
    return warnings
