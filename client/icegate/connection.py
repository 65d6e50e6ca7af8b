"""How a client reaches icegate: target, key, TLS, channel options and the retry policy.

Shared by the sync `Client` and the `AsyncClient`, so both behave the same, over gRPC (a
`host:port` target) and over Connect (an `http://` or `https://` URL, `connect_transport`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0
"""Seconds a call may take when the caller gives no timeout: every call carries a deadline."""

DEV_SECRETS_PATH = Path(".icegate") / "dev-secrets.json"

log = logging.getLogger("icegate")

Metadata = Sequence[tuple[str, str]]

HTTP_SCHEMES = ("http://", "https://")


def is_http_target(target: str) -> bool:
    """Whether `target` selects Connect (an http:// or https:// URL) rather than gRPC."""
    return target.lower().startswith(HTTP_SCHEMES)


def connect_transport() -> ModuleType:
    """`icegate.connect_transport`, imported when a client is first given an http(s) target.

    gRPC callers never import the Connect runtime (connectrpc, pyqwest), which needs Python
    3.11 or newer: on 3.10 the client works over gRPC and refuses a URL with this reason.

    Raises:
        ConfigurationError: The Connect runtime cannot be imported here.
    """
    try:
        from icegate import connect_transport as module
    except ImportError as error:
        if (error.name or "").partition(".")[0] not in ("connectrpc", "pyqwest"):
            raise
        raise ConfigurationError(
            "an http(s):// target calls icegate over Connect, which needs Python 3.11 or "
            "newer with the connectrpc package; give a host:port target to call over gRPC"
        ) from error
    return module


class Stubs(NamedTuple):
    """The stubs a client calls through, one per service (gRPC's, or Connect's)."""

    credentials: Any
    health: Any
    admin: Any
    usage: Any
    sessions: Any



@dataclass(frozen=True)
class RetryPolicy:
    """How UNAVAILABLE is retried: attempts in all, and the exponential backoff (seconds)."""

    max_attempts: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 1.0
    multiplier: float = 2.0


# Retries only where they are safe: UNAVAILABLE means the call did not run (or ran with no
# effect worth keeping), so it is retried with backoff; nothing else is. gRPC does it from
# its service config, the Connect transport from the same two constants.
RETRY_POLICY = RetryPolicy()
RETRYING_SERVICES = ("icegate.v1.CredentialService", "icegate.v1.UsageService",
                     "grpc.health.v1.Health")
SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": service} for service in RETRYING_SERVICES],
        "retryPolicy": {
            "maxAttempts": RETRY_POLICY.max_attempts,
            "initialBackoff": f"{RETRY_POLICY.initial_backoff}s",
            "maxBackoff": f"{RETRY_POLICY.max_backoff}s",
            "backoffMultiplier": RETRY_POLICY.multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
})

# Keepalive finds a connection that died silently (a load balancer or NAT dropping an idle
# flow; most do after 350 s or more) within about 70 s, idle channels included, instead of
# letting the next call hang until its deadline. icegate-server accepts pings this often
# (min_ping_interval 30 s); a server with gRPC's defaults would answer them with GOAWAY.
CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


class ConfigurationError(ValueError):
    """The client was given no usable target, API key or TLS files."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS towards icegate: the CA to trust, and the client certificate for mutual TLS.

    Args:
        ca_file: PEM bundle of the CAs that signed the server's certificate; the system's
            roots when None.
        cert_file: PEM client certificate chain (mutual TLS), with `key_file`. A server
            that maps it to a project needs no API key from this client.
        key_file: PEM private key of `cert_file` (unencrypted).
        server_name: The name to check the server's certificate against, when it differs
            from the target's host (e.g. dialing an IP address or a load balancer).
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    @classmethod
    def from_env(cls, ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None) -> TlsConfig | None:
        """The given files, else `ICEGATE_TLS_CA` / `ICEGATE_TLS_CERT` / `ICEGATE_TLS_KEY`.

        None (no TLS) when none of them is given or set.
        """
        ca_file = ca_file or os.environ.get("ICEGATE_TLS_CA") or None
        cert_file = cert_file or os.environ.get("ICEGATE_TLS_CERT") or None
        key_file = key_file or os.environ.get("ICEGATE_TLS_KEY") or None
        if not (ca_file or cert_file or key_file):
            return None
        return cls(ca_file=ca_file, cert_file=cert_file, key_file=key_file)

    @property
    def has_client_certificate(self) -> bool:
        return bool(self.cert_file)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Reads the files into gRPC channel credentials.

        Raises:
            ConfigurationError: A certificate without its key (or the reverse), or a file
                that cannot be read (named; its content is never shown).
        """
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigurationError("TLS: a client certificate and its key go together "
                                     "(cert_file and key_file, ICEGATE_TLS_CERT and "
                                     "ICEGATE_TLS_KEY)")
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem("CA", self.ca_file),
            private_key=read_pem("key", self.key_file),
            certificate_chain=read_pem("certificate", self.cert_file))

    def channel_options(self) -> tuple[tuple[str, object], ...]:
        if self.server_name:
            return (("grpc.ssl_target_name_override", self.server_name),)
        return ()


def read_pem(what: str, path: str | None) -> bytes | None:
    """A PEM file's bytes (None for no file), or a ConfigurationError naming it."""
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigurationError(f"TLS: cannot read the {what} file {path}: "
                                 f"{error.strerror}") from None


_DEV_TARGET = re.compile(r"[A-Za-z0-9.\-]{1,253}:[0-9]{1,5}|\[[0-9A-Fa-f:.]{2,45}\]:[0-9]{1,5}")
"""A `grpc_target` the dev server recorded: host:port, or [IPv6]:port."""


def _dev_setting(name: str) -> str | None:
    # `make run` keeps a dev key in .icegate/, and the address it listens on: callers in
    # that directory need no set-up, whatever port the dev server took.
    try:
        with DEV_SECRETS_PATH.open(encoding="utf-8") as handle:
            value = json.load(handle).get(name)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _dev_target() -> str | None:
    value = _dev_setting("grpc_target")
    return value if value is not None and _DEV_TARGET.fullmatch(value) else None


@dataclass(frozen=True)
class Connection:
    """Where and as whom a client calls."""

    target: str
    api_key: str | None = field(repr=False)
    default_timeout: float = DEFAULT_TIMEOUT
    debug: bool = False
    tls: TlsConfig | None = None
    wait_for_ready: bool = False

    @classmethod
    def resolve(cls, target: str | None, api_key: str | None, *,
                default_timeout: float = DEFAULT_TIMEOUT, debug: bool = False,
                tls: TlsConfig | None = None, wait_for_ready: bool = False) -> Connection:
        """Fills what the caller left out from `ICEGATE_TARGET`, `ICEGATE_API_KEY` and
        `ICEGATE_TLS_*`, else from the `make run` dev server's `.icegate/dev-secrets.json`
        in the working directory (its key, and where it listens), else 127.0.0.1:50051.

        A missing key is reported at the first call that needs one (health checks do not);
        with a client certificate, calls carry no key unless one is given or set.
        """
        target = target or os.environ.get("ICEGATE_TARGET") or _dev_target() or DEFAULT_TARGET
        tls = tls if tls is not None else TlsConfig.from_env()
        api_key = api_key or os.environ.get("ICEGATE_API_KEY") or None
        if api_key is None and not (tls and tls.has_client_certificate):
            # The `make run` dev key, for callers in its directory; a client certificate is
            # a deliberate identity, so it is not overridden by a key found lying around.
            api_key = _dev_setting("api_key")
        return cls(target=target, api_key=api_key, default_timeout=default_timeout,
                   debug=debug, tls=tls, wait_for_ready=wait_for_ready)

    @property
    def call_options(self) -> dict[str, bool]:
        """Keyword options every call passes to gRPC besides its deadline and metadata."""
        # Only when set: fail-fast is gRPC's default, and test channels (grpc_testing)
        # take no wait_for_ready argument.
        return {"wait_for_ready": True} if self.wait_for_ready else {}

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials for the channel, or None for an insecure channel."""
        return self.tls.channel_credentials() if self.tls is not None else None

    def channel_options(self) -> tuple[tuple[str, object], ...]:
        return CHANNEL_OPTIONS + (self.tls.channel_options() if self.tls is not None else ())

    def call_metadata(self, extra: Metadata) -> tuple[tuple[str, str], ...]:
        """The metadata of one call: the caller's, plus the bearer key if there is one.

        Raises:
            ConfigurationError: No API key was given, set or found in `.icegate/`, and no
                client certificate stands in for one.
        """
        if not self.api_key:
            if self.tls is not None and self.tls.has_client_certificate:
                return tuple(extra)
            raise ConfigurationError("no API key: pass api_key= or set ICEGATE_API_KEY "
                                     "(or present a client certificate the server maps)")
        return (*extra, ("authorization", f"Bearer {self.api_key}"))

    def timeout(self, timeout: float | None) -> float:
        return self.default_timeout if timeout is None else timeout
