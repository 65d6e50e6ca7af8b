"""Settings: flags, then `ICEGATE_*` environment variables, then an optional TOML file.

Every setting is declared once, as a field of `Settings`: its name (which gives its flag, its
variable and its TOML key), its type (which picks its parser), its default, and a `Setting`
record with its help, whether it is secret and its check. Loading validates everything before
anything starts; a bad value raises `ConfigError` with one line that names the setting and
never shows a secret's value.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import re
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

import httpx

from icegate_server.access.tls import ADMIN_IDENTITY, check_tls_files, parse_client_projects
from icegate_server.projects.records import MAX_URL, PROJECT_ID_PATTERN, URL_PATTERN
from icegate_server.store.sentinel_url import SENTINEL_SCHEMES, is_sentinel_url, parse_sentinel_url

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names it in one line."""


@dataclass(frozen=True)
class Setting:
    """What a setting is besides its name, type and default: the `Settings` field's metadata.

    Attributes:
        help: The `--help` line.
        check: Raises ValueError (the problem, never the value) for a value the setting
            refuses on its own; what depends on other settings is in `_check_together`.
        parse: Turns a flag, environment or TOML value into the field's type; None: the
            parser of the field's type.
        secret: Shown by size only wherever settings are shown or logged.
    """

    help: str
    check: Callable[[Any], object] | None = None
    parse: Callable[[Any], Any] | None = None
    secret: bool = False


_RECORD = "icegate_setting"
"""The key of a `Settings` field's metadata that holds its `Setting` record."""


def setting(default: T, help: str, *, check: Callable[[Any], object] | None = None,
            parse: Callable[[Any], Any] | None = None, secret: bool = False) -> T:
    """Declares a `Settings` field: its default and its `Setting` record."""
    declared: T = dataclasses.field(default=default,
                                    metadata={_RECORD: Setting(help, check, parse, secret)})
    return declared


DEFAULT_DATA_DIR = Path(".icegate")
STORE_SCHEMES = ("sqlite:///", "redis://", "rediss://", "unix://", *SENTINEL_SCHEMES)
MAX_WORKERS = 64
MAX_SETTING_TEXT = 4096
"""The longest text any setting (or any item of a list setting) may hold."""

# Settings with a shape are matched whole (`fullmatch`): a prefix check or `$` would let a
# trailing newline, a NUL or a space through into URIs handed to browsers or coturn's config.
_HOST = (r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?"
         r"|\[[0-9A-Fa-f:.]{2,45}(?:%[A-Za-z0-9_.-]{1,64})?\])")
LISTEN_PATTERN = re.compile(rf"(?P<host>{_HOST}):(?P<port>[0-9]{{1,5}})")
"""host:port to listen on; an IPv6 host in brackets (with a zone, as `[fe80::1%eth0]`)."""
TURN_URI_PATTERN = re.compile(rf"turns?:{_HOST}(?::[0-9]{{1,5}})?(?:\?transport=(?:udp|tcp))?")
"""A TURN URI as RFC 7065 spells it: `turn[s]:host[:port][?transport=udp|tcp]`."""
STUN_URI_PATTERN = re.compile(rf"stuns?:{_HOST}(?::[0-9]{{1,5}})?")
"""A STUN URI as RFC 7064 spells it: `stun[s]:host[:port]`."""
REALM_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
"""A coturn realm: a domain-like name, 1-255 characters."""
COTURN_REDIS_PATTERN = re.compile(r"(?:rediss?|unix)://[\x21-\x7e]+")
COTURN_PATH_PATTERN = re.compile(r"/[!$-&(-~]{1,4095}")
"""A file coturn reads, as an absolute path of printable ASCII: it goes into turnserver.conf
as it is, where a space, a quote, a # or a line break would end, comment or add a directive."""
COTURN_PATH_PROBLEM = "must be an absolute path of printable ASCII without spaces, quotes or #"


# -- Parsers, picked by a field's type -----------------------------------------------------
# TOML hands the parsers typed values (lists, tables, dates...): a wrong type must become
# a ValueError, which `load_settings` reports as one line, never a TypeError traceback.


def _parse_list(raw: str | Sequence[str]) -> tuple[str, ...]:
    if not isinstance(raw, (str, list, tuple)):
        raise ValueError("must be a comma-separated string or a list of strings")
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    return tuple(str(item).strip() for item in items if str(item).strip())


def _parse_int(raw: str | int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise ValueError("must be a whole number")
    try:
        return int(raw)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _parse_float(raw: str | float) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ValueError("must be a number")
    try:
        return float(raw)
    except ValueError:
        raise ValueError("must be a number") from None


def _parse_bool(raw: str | bool) -> bool:
    if isinstance(raw, bool):
        return raw
    if not isinstance(raw, str):
        raise ValueError("must be true or false")
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def _parse_str(raw: str) -> str:
    if not isinstance(raw, str):
        raise ValueError("must be a string")
    return raw.strip()


def _parse_path(raw: str) -> Path:
    return Path(_parse_str(raw))


def _parse_upper(raw: str) -> str:
    return _parse_str(raw).upper()


def _parse_lower(raw: str) -> str:
    return _parse_str(raw).lower()


_PARSE_BY_TYPE: dict[object, Callable[[Any], Any]] = {
    str: _parse_str, int: _parse_int, float: _parse_float, bool: _parse_bool, Path: _parse_path,
    tuple[str, ...]: _parse_list,
}


# -- Checks of one setting alone ------------------------------------------------------------


def parse_listen_address(listen: str) -> tuple[str, int]:
    """Splits `host:port` (IPv6 hosts in brackets) and checks the port."""
    # An unbracketed IPv6 host ("::1") does not match: its last group would read as the port.
    # The port is ASCII digits only: str.isdigit also takes look-alikes (fullwidth U+FF15).
    matched = LISTEN_PATTERN.fullmatch(listen)
    if matched is None or not 0 <= int(matched["port"]) <= 65535:
        raise ValueError("must be host:port, e.g. 127.0.0.1:50051 or [::1]:50051")
    return matched["host"], int(matched["port"])


def _require(test: Callable[[Any], object], problem: str) -> Callable[[Any], None]:
    """A check that refuses, saying `problem`, every value `test` finds false."""
    def check(value: Any) -> None:
        if not test(value):
            raise ValueError(problem)

    return check


def _unless_empty(check: Callable[[Any], object]) -> Callable[[Any], None]:
    """`check`, for a setting whose empty value means off (or the default)."""
    def optional(value: Any) -> None:
        if value:
            check(value)

    return optional


def _check_store_url(url: str) -> None:
    if not (url.startswith(STORE_SCHEMES) and url.isprintable()):
        raise ValueError("must start with sqlite:///, redis:// or redis+sentinel:// and hold "
                         "no control character")
    if is_sentinel_url(url):
        parse_sentinel_url(url)  # its ValueError names the part that is wrong


def _each_matching(pattern: re.Pattern[str], shape: str) -> Callable[[tuple[str, ...]], None]:
    def check(values: tuple[str, ...]) -> None:
        for value in values:
            if not pattern.fullmatch(value):
                raise ValueError(f"{value!r} is not {shape}")

    return check


def _check_turn_secrets(secrets: tuple[str, ...]) -> None:
    if any(len(secret) < 16 for secret in secrets):
        raise ValueError("every secret must be at least 16 characters long")
    if len(set(secrets)) != len(secrets):
        raise ValueError("lists the same secret twice")


def _check_client_projects(pairs: tuple[tuple[str, str], ...]) -> None:
    for identity, project in pairs:
        if project != ADMIN_IDENTITY and not PROJECT_ID_PATTERN.fullmatch(project):
            raise ValueError(f"{identity!r} maps to {project!r}, which is neither a project "
                             "id nor *")


def _check_text(value: object) -> None:
    """Every setting's last check: no control character (a NUL, a line break...) and no
    oversized text, in the value or in any item of a list."""
    if isinstance(value, tuple):
        for item in value:
            _check_text(item)
    elif isinstance(value, (str, Path)):
        text = str(value)
        if len(text) > MAX_SETTING_TEXT:
            raise ValueError(f"must be at most {MAX_SETTING_TEXT} characters")
        if not text.isprintable():
            raise ValueError("must hold no control character (a NUL, a line break...)")


def _is_http_url(url: str) -> bool:
    if len(url) > MAX_URL or not URL_PATTERN.fullmatch(url):
        return False
    try:
        return bool(httpx.URL(url).host)  # e.g. http://:80 names no host
    except httpx.InvalidURL:
        return False


_HTTP_URL = _unless_empty(_require(
    _is_http_url, "must be an http(s) URL of printable ASCII without spaces"))
_UPSTREAM_TIMEOUT = _require(lambda seconds: 0 < seconds <= 600,
                             "must be more than 0 and at most 600 seconds")


# -- The settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything the server reads at start, each setting declared once.

    Field names are the TOML keys; `env_name` and `flag_name` spell the others.
    """

    listen: str = setting(
        "127.0.0.1:50051", "host:port to listen on (default 127.0.0.1:50051)",
        check=parse_listen_address)
    # `setting` returns a dataclasses.field (ruff knows str, int and tuple defaults are safe).
    data_dir: Path = setting(  # noqa: RUF009
        DEFAULT_DATA_DIR,
        "directory for the SQLite store and generated dev secrets (default .icegate)")
    store: str = setting(
        "", "sqlite:///path (default under --data-dir), redis://host:port/db or "
        "redis+sentinel://host:port[,host:port...]/master-name[/db]",
        # A redis:// URL may carry a password.
        secret=True, check=_unless_empty(_check_store_url))
    turn_secrets: tuple[str, ...] = setting(
        (), "comma-separated TURN shared secrets; the first signs, all stay valid",
        secret=True, check=_check_turn_secrets)
    # Defaults match `make coturn`: a coturn on this machine's port 3478.
    turn_uris: tuple[str, ...] = setting(
        ("turn:127.0.0.1:3478?transport=udp", "turn:127.0.0.1:3478?transport=tcp"),
        "comma-separated turn:/turns: URIs handed to browsers",
        check=_each_matching(TURN_URI_PATTERN, "turn[s]:host[:port][?transport=udp|tcp]"))
    stun_uris: tuple[str, ...] = setting(
        ("stun:127.0.0.1:3478",), "comma-separated stun: URIs handed to browsers",
        check=_each_matching(STUN_URI_PATTERN, "stun[s]:host[:port]"))
    turn_realm: str = setting(
        "icegate.local", "the coturn realm (default icegate.local)",
        check=_require(REALM_PATTERN.fullmatch, "must be 1-255 characters: letters, digits, "
                       ". _ -, starting with a letter or digit"))
    turn_ttl_default: int = setting(
        3600, "TURN credential lifetime when a caller names none, seconds (3600)")
    turn_ttl_min: int = setting(
        60, "shortest TURN credential lifetime a caller may ask for, seconds (60)",
        check=_require(lambda seconds: seconds >= 1, "must be at least 1 second"))
    turn_ttl_max: int = setting(
        86400, "longest TURN credential lifetime a caller may ask for, seconds (86400)")
    api_keys: tuple[str, ...] = setting(
        (), "comma-separated static caller keys with full (admin) access",
        secret=True, check=_require(lambda keys: all(len(key) >= 16 for key in keys),
                                    "every key must be at least 16 characters long"))
    dev_secrets: bool = setting(
        True, "generate and keep dev secrets when none are configured (default true)")
    store_timeout: float = setting(
        0.1, "seconds a Redis store call may take before the call fails UNAVAILABLE (0.1)",
        check=_require(lambda seconds: 0 < seconds <= 60,
                       "must be more than 0 and at most 60 seconds"))
    store_linger: float = setting(
        0.002, "seconds a busy server's Redis admissions may wait to go out together "
        "(0.002; 0: never)",
        check=_require(lambda seconds: 0 <= seconds <= 0.1,
                       "must be at least 0 and at most 0.1 seconds"))
    rate_limit_fail_open: bool = setting(
        False, "admit known callers uncounted while the store is unreachable (false)")
    master_key: str = setting(
        "", "base64 of 32 bytes sealing provider keys; comma-separated, first seals",
        secret=True)
    master_key_file: str = setting(
        "", "a file holding the master key(s), instead of ICEGATE_MASTER_KEY")
    session_lease_seconds: int = setting(
        3600, "a session not kept alive this long frees its slot (3600)",
        check=_require(lambda seconds: 1 <= seconds <= 7 * 86400,
                       "must be between 1 second and 7 days"))
    upstream_connect_timeout: float = setting(
        5.0, "seconds to connect to a provider (5)", check=_UPSTREAM_TIMEOUT)
    upstream_read_timeout: float = setting(
        30.0, "seconds to wait for a provider's answer (30)", check=_UPSTREAM_TIMEOUT)
    coturn_redis: str = setting(
        "", "redis:// URL of coturn's redis-userdb; icegate keeps the realm's secrets",
        secret=True, check=_unless_empty(_require(
            COTURN_REDIS_PATTERN.fullmatch,
            "must be a redis:// URL of printable ASCII without spaces")))
    coturn_sqlite: str = setting(
        "", "path of coturn's SQLite userdb: icegate keeps the realm's secrets there",
        check=_unless_empty(_require(lambda path: Path(path).parent.is_dir(),
                                     "must be a file in an existing directory")))
    coturn_statsdb: str = setting(
        "", "redis:// URL of the Redis coturn's redis-statsdb publishes to: icegate meters "
        "TURN usage from it (default empty: off)",
        secret=True, check=_unless_empty(_require(
            COTURN_REDIS_PATTERN.fullmatch,
            "must be a redis:// URL of printable ASCII without spaces")))
    coturn_stats_resync: float = setting(
        30.0, "seconds between checks of which allocations coturn still lists (30): ends "
        "missed while the stats stream was down, or by a coturn restart, are caught up then",
        check=_require(lambda seconds: math.isfinite(seconds) and 0.1 <= seconds <= 3600,
                       "must be between 0.1 and 3600 seconds"))
    coturn_cli: str = setting(
        "", "host:port of coturn's admin CLI (cli-ip, cli-port): icegate ends allocations "
        "through it (default empty: off)", check=_unless_empty(parse_listen_address))
    coturn_cli_password: str = setting(
        "", "coturn's cli-password (at least 8 characters, no spaces)", secret=True,
        check=_unless_empty(_require(lambda password: len(password) >= 8 and " " not in password,
                                     "must be at least 8 characters, without spaces")))
    turn_rotate_interval: int = setting(
        0, "rotate the TURN secret automatically every this many seconds (0: off)",
        check=_unless_empty(_require(lambda seconds: 60 <= seconds <= 365 * 86400,
                                     "must be 0 (off) or between 60 seconds and a year")))
    # coturn's side of the deployment: read by `icegate-server coturn-config` only (the
    # service itself never opens these files; coturn's own user does).
    coturn_tls_cert: str = setting(
        "", "PEM certificate chain coturn serves turns: URIs with, as coturn's host sees the "
        "path; needed whenever ICEGATE_TURN_URIS has a turns: URI",
        check=_unless_empty(_require(COTURN_PATH_PATTERN.fullmatch, COTURN_PATH_PROBLEM)))
    coturn_tls_key: str = setting(
        "", "PEM private key of ICEGATE_COTURN_TLS_CERT, readable by coturn's user only",
        check=_unless_empty(_require(COTURN_PATH_PATTERN.fullmatch, COTURN_PATH_PROBLEM)))
    coturn_user_quota: int = setting(
        0, "coturn's backstop: allocations one TURN username may hold at once (0: no limit)",
        check=_require(lambda count: 0 <= count <= 1_000_000, "must be between 0 and 1000000"))
    coturn_total_quota: int = setting(
        0, "coturn's backstop: allocations the whole coturn may hold at once (0: no limit)",
        check=_require(lambda count: 0 <= count <= 10_000_000,
                       "must be between 0 and 10000000"))
    coturn_max_bps: int = setting(
        0, "coturn's backstop: bytes per second one TURN session may relay (0: no limit)",
        check=_require(lambda rate: 0 <= rate <= 10**12, "must be between 0 and 10^12"))
    # Empty: the provider's own URL (sessions/providers); Azure has none, the URL names the
    # customer's resource.
    openai_base_url: str = setting(
        "", "OpenAI API base URL (https://api.openai.com)", check=_HTTP_URL)
    azure_base_url: str = setting(
        "", "Azure OpenAI resource URL, https://<resource>.openai.azure.com", check=_HTTP_URL)
    orga_base_url: str = setting(
        "", "Orga AI API base URL (https://api.orga-ai.com)", check=_HTTP_URL)
    gemini_base_url: str = setting(
        "", "Gemini API base URL (https://generativelanguage.googleapis.com)",
        check=_HTTP_URL)
    shutdown_grace: float = setting(
        10.0, "seconds in-flight calls get to finish on SIGTERM (default 10)",
        check=_require(lambda seconds: math.isfinite(seconds) and seconds >= 0,
                       "must be a finite number of seconds, not negative"))
    log_level: str = setting(
        "INFO", "DEBUG, INFO, WARNING or ERROR (default INFO)", parse=_parse_upper,
        check=_require(lambda level: level in {"DEBUG", "INFO", "WARNING", "ERROR"},
                       "must be DEBUG, INFO, WARNING or ERROR"))
    log_format: str = setting(
        "json", "json (one sanitised JSON object per line, the default) or text",
        parse=_parse_lower,
        check=_require(lambda format: format in {"json", "text"}, "must be json or text"))
    metrics_listen: str = setting(
        "", "host:port serving Prometheus metrics at /metrics (default empty: off)",
        check=_unless_empty(parse_listen_address))
    http_listen: str = setting(
        "", "host:port serving the same services over Connect and gRPC-Web (HTTP/1.1), e.g. "
        "127.0.0.1:8080 (default empty: off)", check=_unless_empty(parse_listen_address))
    http_read_timeout: float = setting(
        10.0, "seconds an HTTP request (headers and body) may take to arrive, counted from "
        "the connection or the previous answer (10)",
        check=_require(lambda seconds: 0 < seconds <= 300,
                       "must be more than 0 and at most 300 seconds"))
    webhook_listen: str = setting(
        "", "host:port taking OpenAI's realtime.call.incoming webhook (POST /webhooks/openai, "
        "Standard Webhooks signatures, one secret per project: provider openai_webhook), "
        "e.g. 0.0.0.0:8443 (default empty: off)", check=_unless_empty(parse_listen_address))
    workers: int = setting(
        1, "server processes sharing the ports with SO_REUSEPORT (default 1)",
        check=_require(lambda count: 1 <= count <= MAX_WORKERS,
                       f"must be between 1 and {MAX_WORKERS}"))
    tls_cert: str = setting(
        "", "PEM certificate chain to serve TLS with (with --tls-key); no TLS when unset")
    tls_key: str = setting(
        "", "PEM private key of --tls-cert (unencrypted; keep it mode 0600)")
    tls_client_ca: str = setting(
        "", "PEM CA bundle: require client certificates it signed (mutual TLS)")
    tls_client_projects: tuple[tuple[str, str], ...] = setting(
        (), "typed certificate name = project id, comma-separated, e.g. "
        "uri:spiffe://corp/web=acme,dns:ops.internal=*; types uri, dns, email, ip, cn (cn "
        "only for a certificate without SAN); * makes an admin",
        parse=parse_client_projects, check=_check_client_projects)

    def __repr__(self) -> str:
        # Settings are printed in logs and tracebacks: secrets show as counts only.
        shown = ", ".join(f"{name}={value!r}" for name, value in self.redacted().items())
        return f"Settings({shown})"

    def redacted(self) -> dict[str, object]:
        """Every setting as it may be shown or logged: a secret by its size only."""
        return {name: f"<{len(getattr(self, name))} hidden>" if name in SECRET_SETTINGS
                else getattr(self, name) for name in SETTINGS}

    @property
    def store_url(self) -> str:
        """The store URL in force: the setting, or a SQLite file under the data directory."""
        return self.store or f"sqlite:///{self.data_dir / 'icegate.sqlite3'}"


def _table() -> dict[str, Setting]:
    types = typing.get_type_hints(Settings)
    table = {}
    for declared in fields(Settings):
        record = declared.metadata.get(_RECORD)
        if not isinstance(record, Setting):
            raise TypeError(f"Settings.{declared.name} is not declared with setting(...)")
        parse = record.parse or _PARSE_BY_TYPE.get(types[declared.name])
        if parse is None:
            raise TypeError(f"Settings.{declared.name}: no parser for its type; give parse=")
        table[declared.name] = dataclasses.replace(record, parse=parse)
    return table


SETTINGS: Mapping[str, Setting] = _table()
"""Every setting by name, in declaration order, each with its parser resolved."""
SECRET_SETTINGS = frozenset(name for name, spec in SETTINGS.items() if spec.secret)
"""Settings shown by size only: secrets, and URLs that may carry a password."""


def env_name(setting: str) -> str:
    """The environment variable of a setting, e.g. `turn_secrets` -> `ICEGATE_TURN_SECRETS`."""
    return "ICEGATE_" + setting.upper()


def flag_name(setting: str) -> str:
    """The command-line flag of a setting, e.g. `turn_secrets` -> `--turn-secrets`."""
    return "--" + setting.replace("_", "-")


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per setting (all default to None: unset falls through to env and TOML)."""
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (ICEGATE_CONFIG)")
    for name, spec in SETTINGS.items():
        parser.add_argument(flag_name(name), dest=name, default=None, help=spec.help)


def read_setting(name: str, raw: Any, source: str | None = None) -> Any:
    """The value one spelling of a setting stands for, parsed and checked on its own.

    Args:
        name: The setting.
        raw: Its value as a flag, the environment or the TOML file gives it.
        source: Where `raw` came from, named in a parse error; its variable when omitted.

    Raises:
        ConfigError: `raw` does not parse (naming `source`) or the setting refuses it (naming
            its variable); never showing the value.
    """
    spec = SETTINGS[name]
    assert spec.parse is not None  # `_table` resolved every parser
    try:
        value = spec.parse(raw)
    except ValueError as error:
        raise ConfigError(f"invalid setting {source or env_name(name)}: {_one_line(error)}"
                          ) from None
    try:
        if spec.check is not None:
            spec.check(value)
        _check_text(value)
    except ValueError as error:
        raise ConfigError(f"invalid setting {env_name(name)}: {_one_line(error)}") from None
    return value


def _one_line(error: ValueError) -> str:
    # A problem may quote the value: its line breaks and NULs are shown escaped.
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode()
                   for char in str(error))


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merges flags over environment over TOML file over defaults, then validates.

    Args:
        flags: Values from the command line (None values count as unset); may hold `config`.
        environ: The environment to read; `os.environ` when omitted.

    Raises:
        ConfigError: A setting is malformed or the settings contradict each other.
    """
    flags = {key: value for key, value in (flags or {}).items() if value is not None}
    environ = os.environ if environ is None else environ

    config_path = flags.pop("config", None) or environ.get("ICEGATE_CONFIG")
    from_file = _read_toml(Path(config_path)) if config_path else {}
    # Checked before merging: a key the file sets and a flag overrides is still a known key.
    unknown = sorted(set(from_file) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r} in {config_path}")

    values: dict[str, Any] = {}
    for name in SETTINGS:
        if name in flags:
            values[name] = read_setting(name, flags[name], flag_name(name))
        elif env_name(name) in environ:
            values[name] = read_setting(name, environ[env_name(name)], env_name(name))
        elif name in from_file:
            values[name] = read_setting(name, from_file[name], f"{name} in {config_path}")

    settings = Settings(**values)
    _check_together(settings)
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return dict(tomllib.load(handle))
    except OSError as error:
        raise ConfigError(f"invalid setting ICEGATE_CONFIG: cannot read {path}: "
                          f"{error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"invalid setting ICEGATE_CONFIG: {path} is not TOML: {error}") from None


def _check_together(settings: Settings) -> None:
    """The checks that involve more than one setting; each setting alone passed its own."""
    def fail(name: str, problem: str) -> None:
        raise ConfigError(f"invalid setting {env_name(name)}: {problem}")

    if settings.workers > 1 and parse_listen_address(settings.listen)[1] == 0:
        fail("workers", "more than one worker needs a fixed port in ICEGATE_LISTEN, not 0")
    if settings.workers > 1 and settings.http_listen \
            and parse_listen_address(settings.http_listen)[1] == 0:
        fail("workers", "more than one worker needs a fixed port in ICEGATE_HTTP_LISTEN, not 0")
    if settings.http_listen and importlib.util.find_spec("connectrpc") is None:
        fail("http_listen", "Connect needs Python 3.11 or newer with the connectrpc package "
             "(pip install 'icegate[server]' there); leave it empty to serve gRPC only")
    if settings.http_listen and not settings.http_listen.endswith(":0") \
            and settings.http_listen in (settings.listen, settings.metrics_listen):
        fail("http_listen", "must differ from ICEGATE_LISTEN and ICEGATE_METRICS_LISTEN")
    if settings.webhook_listen:
        port = parse_listen_address(settings.webhook_listen)[1]
        if settings.workers > 1 and port == 0:
            fail("workers", "more than one worker needs a fixed port in ICEGATE_WEBHOOK_LISTEN, "
                 "not 0")
        if importlib.util.find_spec("connectrpc") is None:
            fail("webhook_listen", "the webhook listener needs Python 3.11 or newer with the "
                 "connectrpc package (pip install 'icegate[server]' there)")
        if port != 0 and settings.webhook_listen in (settings.listen, settings.metrics_listen,
                                                     settings.http_listen):
            fail("webhook_listen", "must differ from ICEGATE_LISTEN, ICEGATE_METRICS_LISTEN "
                 "and ICEGATE_HTTP_LISTEN")
    if settings.turn_ttl_max < settings.turn_ttl_min:
        fail("turn_ttl_max", f"must be at least ICEGATE_TURN_TTL_MIN ({settings.turn_ttl_min})")
    if not settings.turn_ttl_min <= settings.turn_ttl_default <= settings.turn_ttl_max:
        fail("turn_ttl_default",
             f"must lie between {settings.turn_ttl_min} and {settings.turn_ttl_max}")
    if settings.master_key and settings.master_key_file:
        fail("master_key", "set ICEGATE_MASTER_KEY or ICEGATE_MASTER_KEY_FILE, not both")
    if settings.master_key or settings.master_key_file:
        from icegate_server.sessions.vault import load_master_keys

        try:
            load_master_keys(settings.master_key or None, settings.master_key_file or None)
        except ValueError as error:
            raise ConfigError(f"invalid setting {error}") from None
    if settings.turn_rotate_interval and not (settings.coturn_redis or settings.coturn_sqlite):
        # Without a userdb icegate keeps, coturn never learns a rotated secret and refuses
        # every credential signed after the first rotation.
        fail("turn_rotate_interval", "needs ICEGATE_COTURN_REDIS or ICEGATE_COTURN_SQLITE, "
             "so that coturn follows the rotations")
    if bool(settings.coturn_tls_cert) != bool(settings.coturn_tls_key):
        fail("coturn_tls_key" if settings.coturn_tls_cert else "coturn_tls_cert",
             "ICEGATE_COTURN_TLS_CERT and ICEGATE_COTURN_TLS_KEY must be set together")
    if settings.coturn_cli and not settings.coturn_cli_password:
        fail("coturn_cli_password", "is required with ICEGATE_COTURN_CLI (coturn refuses a "
             "CLI without a password on any address but loopback, and so does icegate)")
    if settings.coturn_cli_password and not settings.coturn_cli:
        fail("coturn_cli", "is required with ICEGATE_COTURN_CLI_PASSWORD")
    if settings.metrics_listen == settings.listen and not settings.listen.endswith(":0"):
        fail("metrics_listen", "must differ from ICEGATE_LISTEN")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        fail("tls_key" if settings.tls_cert else "tls_cert",
             "ICEGATE_TLS_CERT and ICEGATE_TLS_KEY must be set together")
    if settings.tls_client_ca and not settings.tls_cert:
        fail("tls_client_ca", "needs ICEGATE_TLS_CERT and ICEGATE_TLS_KEY (mutual TLS is TLS)")
    if settings.tls_client_projects and not settings.tls_client_ca:
        fail("tls_client_projects", "needs ICEGATE_TLS_CLIENT_CA: only verified client "
             "certificates can stand for a caller")
    try:
        check_tls_files(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except ValueError as error:
        raise ConfigError(f"invalid setting {error}") from None
    if not settings.dev_secrets and not settings.turn_secrets:
        fail("turn_secrets", "is required when ICEGATE_DEV_SECRETS is false")
    if not settings.dev_secrets and not settings.api_keys:
        fail("api_keys", "is required when ICEGATE_DEV_SECRETS is false")
    if not settings.dev_secrets and not (settings.master_key or settings.master_key_file):
        fail("master_key", "is required when ICEGATE_DEV_SECRETS is false")
