"""What a Sentinel store URL names: the sentinels, the master's name, its database and auth.

    redis+sentinel://[[username]:password@]host:port[,host:port...]/master-name[/db][?options]
    rediss+sentinel://...     the same over TLS, to the master and to the sentinels

The username and password (percent-encoded) are the master's, as in a `redis://` URL. The
options, all optional: `sentinel_username` and `sentinel_password`, the sentinels' own AUTH
when they require one (`requirepass` in sentinel.conf); for `rediss+sentinel` the TLS files
`ssl_ca_certs`, `ssl_certfile` and `ssl_keyfile`.

Parsing checks every part whole (`fullmatch`) and says which part is wrong without repeating
the URL: it may hold passwords, and a malformed one may put a password where a host belongs.
This module imports nothing of redis-py, so the settings can check a URL before anything
starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote

SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
MAX_SENTINELS = 16

_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?"
                   r"|\[[0-9A-Fa-f:.]{2,45}\]")
_PORT = re.compile(r"[0-9]{1,5}")
_MASTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A master's name as sentinel.conf's `sentinel monitor` gives it."""
_DB = re.compile(r"[0-9]{1,5}")
_FILE = re.compile(r"/[\x21-\x7e]{1,4095}")
_OPTIONS = ("sentinel_username", "sentinel_password")
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed `redis+sentinel://` URL.

    Attributes:
        sentinels: (host, port) of each sentinel, in the URL's order; an IPv6 host without
            its brackets.
        master_name: The name the sentinels monitor the master under.
        db: The master's database number.
        tls: TLS to the master and the sentinels (`rediss+sentinel://`).
        username, password: The master's AUTH, or None.
        sentinel_username, sentinel_password: The sentinels' AUTH, or None.
        tls_files: `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile` as given.
    """

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls_files: tuple[tuple[str, str], ...] = ()

    @property
    def secrets(self) -> tuple[str, ...]:
        """The passwords it holds, never to be repeated in a message."""
        return tuple(p for p in (self.password, self.sentinel_password) if p)


def is_sentinel_url(url: str) -> bool:
    """Whether `url` names a Sentinel-managed store (by its scheme)."""
    return url.startswith(SENTINEL_SCHEMES)


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parses a Sentinel store URL.

    Raises:
        ValueError: The URL is malformed; the message names the part, never its value.
    """
    tls = url.startswith("rediss+sentinel://")
    if not url.startswith(SENTINEL_SCHEMES):
        raise ValueError("must start with redis+sentinel:// or rediss+sentinel://")
    if not (url.isascii() and url.isprintable()) or " " in url or "#" in url:
        raise ValueError("must be printable ASCII without spaces or #")
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    username = password = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon and password_text else None
    sentinels = tuple(_sentinel(item, index)
                      for index, item in enumerate(hosts.split(","), start=1))
    if len(sentinels) > MAX_SENTINELS:
        raise ValueError(f"names more than {MAX_SENTINELS} sentinels")
    if not slash or not path:
        raise ValueError("needs the master's name after the sentinels "
                         "(redis+sentinel://host:port,.../master-name)")
    master_name, _, db_text = path.partition("/")
    if not _MASTER_NAME.fullmatch(master_name):
        raise ValueError("the master's name must be 1-64 letters, digits, . _ -, "
                         "starting with a letter or digit")
    if db_text and not _DB.fullmatch(db_text):
        raise ValueError("the database after the master's name must be a number")
    options = _options(query, tls)
    return SentinelUrl(
        sentinels=sentinels, master_name=master_name, db=int(db_text or 0), tls=tls,
        username=username, password=password,
        sentinel_username=options.pop("sentinel_username", None),
        sentinel_password=options.pop("sentinel_password", None),
        tls_files=tuple(sorted(options.items())))


def _sentinel(item: str, index: int) -> tuple[str, int]:
    if not item:
        raise ValueError(f"sentinel {index}: needs host:port (none given)"
                         if index == 1 else f"sentinel {index}: empty (two commas in a row?)")
    host, colon, port = item.rpartition(":")
    if not colon:
        raise ValueError(f"sentinel {index}: needs host:port (no port given)")
    if not _HOST.fullmatch(host):
        raise ValueError(f"sentinel {index}: the host must be a name, an IPv4 address or "
                         "an [IPv6] address")
    if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"sentinel {index}: the port must be a number from 1 to 65535")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _options(query: str, tls: bool) -> dict[str, str]:
    if not query:
        return {}
    known = _OPTIONS + _TLS_OPTIONS if tls else _OPTIONS
    try:
        pairs = parse_qs(query, keep_blank_values=True, strict_parsing=True,
                         max_num_fields=len(known))
    except ValueError:
        raise ValueError("the options after ? must be name=value pairs, "
                         f"at most {len(known)}") from None
    options: dict[str, str] = {}
    for name, values in pairs.items():
        if name not in known:
            raise ValueError(f"unknown option after ?; known: {', '.join(known)}")
        if len(values) != 1 or not values[0]:
            raise ValueError(f"option {name}: give it once, with a value")
        if name in _TLS_OPTIONS and not _FILE.fullmatch(values[0]):
            raise ValueError(f"option {name}: must be an absolute path of printable ASCII")
        options[name] = values[0]
    return options


__all__ = ["MAX_SENTINELS", "SENTINEL_SCHEMES", "SentinelUrl", "is_sentinel_url",
           "parse_sentinel_url"]
