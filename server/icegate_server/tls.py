"""Transport security: the server's TLS credentials, and callers known by their certificate.

With `ICEGATE_TLS_CERT` and `ICEGATE_TLS_KEY` the server speaks TLS only. With
`ICEGATE_TLS_CLIENT_CA` as well, every client must present a certificate that CA signed
(mutual TLS; the handshake fails otherwise), and `ICEGATE_TLS_CLIENT_PROJECTS` can then let
a certificate stand for a caller key: it maps an identity of the certificate (its subject
CN, or any subject alternative name: DNS name, URI such as a SPIFFE id) to the project the
caller acts on, or to `*` for an admin. A call that carries a bearer key is judged by its key
alone; a call without one is judged by its certificate.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import grpc

ADMIN_IDENTITY = "*"
"""The `ICEGATE_TLS_CLIENT_PROJECTS` value that makes a certificate an admin caller."""

_PEER_IDENTITY_KEYS = ("x509_common_name", "x509_subject_alternative_name")


def check_tls_files(cert: str, key: str, client_ca: str) -> None:
    """Checks the PEM files load (and that the key matches the certificate) as TLS will.

    Raises:
        ValueError: "<SETTING>: <problem>", never showing a file's content.
    """
    for setting, path in (("ICEGATE_TLS_CERT", cert), ("ICEGATE_TLS_KEY", key),
                          ("ICEGATE_TLS_CLIENT_CA", client_ca)):
        if not path:
            continue
        try:
            Path(path).read_bytes()
        except OSError as error:
            raise ValueError(f"{setting}: cannot read {path}: {error.strerror}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if cert:
        try:
            context.load_cert_chain(cert, key, password=_no_passphrase)
        except (ssl.SSLError, ValueError):
            # The ssl error text says nothing about which of the two is wrong, and must not
            # be echoed in case it ever carried key material: try the certificate alone.
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
            except ssl.SSLError:
                raise ValueError(f"ICEGATE_TLS_CERT: {cert} is not a PEM certificate") \
                    from None
            raise ValueError(f"ICEGATE_TLS_KEY: {key} is not an unencrypted PEM private key "
                             "matching ICEGATE_TLS_CERT") from None
    if client_ca:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=client_ca)
        except ssl.SSLError:
            raise ValueError(f"ICEGATE_TLS_CLIENT_CA: {client_ca} holds no PEM certificate") \
                from None


def _no_passphrase() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    return ""


def server_credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials | None:
    """The credentials to bind with, or None to listen without TLS (no certificate set)."""
    if not cert:
        return None
    root = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=root, require_client_auth=root is not None)


def peer_identities(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The verified certificate's CN and subject alternative names, from `auth_context()`."""
    return [value.decode("utf-8", "replace")
            for name in _PEER_IDENTITY_KEYS for value in auth_context.get(name, ())]


def parse_client_projects(raw: object) -> tuple[tuple[str, str], ...]:
    """`identity=project,...` (environment, flag) or a TOML table -> (identity, project) pairs.

    The project is what follows the last `=`, so identities (URIs) may contain `=`.
    """
    if isinstance(raw, Mapping):
        pairs: Sequence[tuple[object, object]] = list(raw.items())
    elif isinstance(raw, str):
        pairs = [entry.strip().rpartition("=")[::2] for entry in raw.split(",")
                 if entry.strip()]
    else:
        raise ValueError("must be identity=project pairs, comma-separated, or a TOML table")
    parsed: list[tuple[str, str]] = []
    for identity, project in pairs:
        if not isinstance(identity, str) or not isinstance(project, str):
            raise ValueError("identities and projects must be strings")
        identity, project = identity.strip(), project.strip()
        if not identity or not project:
            raise ValueError("every entry must be identity=project, e.g. "
                             "spiffe://corp/web=acme")
        parsed.append((identity, project))
    identities = [identity for identity, _ in parsed]
    if len(set(identities)) != len(identities):
        raise ValueError("maps the same identity twice")
    return tuple(parsed)


def is_loopback_host(host: str) -> bool:
    """Whether a listen host is reachable from this machine only."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
