"""Transport security: the server's TLS credentials, and callers known by their certificate.

With `ICEGATE_TLS_CERT` and `ICEGATE_TLS_KEY` the server speaks TLS only. With
`ICEGATE_TLS_CLIENT_CA` as well, every client must present a certificate that CA signed
(mutual TLS; the handshake fails otherwise), and `ICEGATE_TLS_CLIENT_PROJECTS` can then let
a certificate stand for a caller key: it maps a typed name of the certificate to the project
the caller acts on, or to `*` for an admin. A call that carries a bearer key is judged by its
key alone; a call without one is judged by its certificate.

Names are typed, `<type>:<value>`, and a name matches only a name of its own type:
`uri:` a URI SAN (a SPIFFE id), `dns:` a DNS SAN (ASCII case-insensitive, no wildcard
expansion), `email:` an rfc822Name SAN, `ip:` an IP address SAN (compared as addresses), and
`cn:` the subject's common name, which counts only when the certificate has no subject
alternative name at all (RFC 6125 6.4.4: a CA that constrains SANs often leaves CNs and
emails to the requester, so an untyped match let a certificate pick its identity).
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

ADMIN_IDENTITY = "*"
"""The `ICEGATE_TLS_CLIENT_PROJECTS` value that makes a certificate an admin caller."""

_PEER_CERT_KEY = "x509_pem_cert"
"""The auth_context property holding the verified client certificate, PEM-encoded."""

NAME_TYPES = ("uri", "dns", "email", "ip", "cn")
"""The certificate name types `ICEGATE_TLS_CLIENT_PROJECTS` maps, as spelled before the `:`."""

# Each type's value, matched whole (fullmatch); printable ASCII only, so that no look-alike
# (a trailing newline, a NUL, a Cyrillic letter) can equal a configured name.
_DNS_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_NAME_PATTERNS = {
    "uri": re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}:[\x21-\x7e]{1,2048}"),
    "dns": re.compile(rf"(?=.{{1,253}}\Z){_DNS_LABEL}(?:\.{_DNS_LABEL})*", re.DOTALL),
    "email": re.compile(rf"[\x21-\x3f\x41-\x7e]{{1,64}}@{_DNS_LABEL}(?:\.{_DNS_LABEL})*"),
    "cn": re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,62}[\x21-\x7e])?"),
}


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


def certificate_expiry(cert: str) -> float:
    """When the first certificate of the PEM chain at `cert` expires, in Unix seconds (its
    notAfter); the file was checked by `check_tls_files` at start."""
    certificate = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    return certificate.not_valid_after_utc.timestamp()


def peer_identities(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The verified client certificate's typed names, from `auth_context()`.

    Read from the certificate itself (grpc's flat `x509_subject_alternative_name` list drops
    each name's type). No certificate (plain TLS) gives no names.
    """
    pems = list(auth_context.get(_PEER_CERT_KEY, ()))
    return certificate_names(pems[0]) if pems else []


def certificate_names(pem: bytes) -> list[str]:
    """A PEM certificate's names, each `<type>:<canonical value>` as mapping keys are spelled.

    SANs of the types in `NAME_TYPES`; the subject CN only when there is no SAN extension.
    A name that is not printable ASCII, or not of its type's shape, is left out: it could
    only ever be a look-alike of a configured name.
    """
    try:
        certificate = x509.load_pem_x509_certificate(pem)
        sans = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except ValueError:
        return []  # unparsable (or a malformed SAN extension): no name to trust
    except x509.ExtensionNotFound:
        common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        # Several CNs are as ambiguous as none: no CN name at all.
        if len(common_names) != 1 or not isinstance(common_names[0].value, str):
            return []
        return _typed("cn", common_names[0].value)
    names: list[str] = []
    for general_name in sans:
        if isinstance(general_name, x509.UniformResourceIdentifier):
            names += _typed("uri", general_name.value)
        elif isinstance(general_name, x509.DNSName):
            names += _typed("dns", general_name.value)
        elif isinstance(general_name, x509.RFC822Name):
            names += _typed("email", general_name.value)
        elif isinstance(general_name, x509.IPAddress):
            names.append(f"ip:{general_name.value}")
    return names


def _typed(kind: str, value: str) -> list[str]:
    try:
        return [canonical_name(kind, value)]
    except ValueError:
        return []


def canonical_name(kind: str, value: str) -> str:
    """`<kind>:<value>` in the one spelling certificates and the mapping are compared in.

    DNS names and email domains are lower-cased (ASCII only, so that no non-ASCII letter can
    fold onto an ASCII one); IP addresses are written as `ipaddress` writes them.

    Raises:
        ValueError: An unknown type, or a value not of its type's shape.
    """
    if kind == "ip":
        try:
            return f"ip:{ipaddress.ip_address(value)}"
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None
    pattern = _NAME_PATTERNS.get(kind)
    if pattern is None:
        raise ValueError(f"unknown name type {kind!r}")
    if not value.isascii() or not pattern.fullmatch(value):
        raise ValueError(f"{value!r} is not a {kind} name")
    if kind == "dns":
        value = value.lower()
    elif kind == "email":
        local, _, domain = value.rpartition("@")
        value = f"{local}@{domain.lower()}"
    return f"{kind}:{value}"


def _typed_spelling(identity: str) -> str:
    # The typed key an old, untyped key most likely meant, for the error message.
    try:
        ipaddress.ip_address(identity)
        return f"ip:{identity}"
    except ValueError:
        pass
    if "://" in identity:
        return f"uri:{identity}"
    if "@" in identity:
        return f"email:{identity}"
    return f"dns:{identity}"


def parse_client_projects(raw: object) -> tuple[tuple[str, str], ...]:
    """`type:name=project,...` (environment, flag) or a TOML table -> (name, project) pairs.

    The project is what follows the last `=`, so names (URIs) may contain `=`. Names come
    back in their canonical spelling (`canonical_name`), so that one name written two ways
    is caught as a duplicate.

    Raises:
        ValueError: An entry without a type (the old, untyped spelling), of an unknown type or
            a malformed value, or the same name twice.
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
            raise ValueError("every entry must be type:name=project, e.g. "
                             "uri:spiffe://corp/web=acme")
        kind, colon, value = identity.partition(":")
        if not colon or kind not in NAME_TYPES:
            raise ValueError(f"{identity!r} has no name type: write {_typed_spelling(identity)}"
                             f"={project} (types: {', '.join(NAME_TYPES)})")
        try:
            parsed.append((canonical_name(kind, value), project))
        except ValueError as error:
            raise ValueError(str(error)) from None
    seen: set[str] = set()
    for identity, _ in parsed:
        if identity in seen:
            raise ValueError(f"maps the same name twice ({identity!r}): a certificate must "
                             "stand for one caller")
        seen.add(identity)
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
