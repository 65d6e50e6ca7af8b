"""Settings: flags, then `ICEGATE_*` environment variables, then an optional TOML file.

Every setting is declared once in `SETTINGS`, which gives its flag, its variable, its TOML key,
its parser and its default. Loading validates everything before anything starts; a bad value
raises `ConfigError` with one line that names the setting and never shows a secret's value.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from icegate_server.access.tls import ADMIN_IDENTITY, check_tls_files, parse_client_projects
from icegate_server.projects.records import PROJECT_ID_PATTERN, URL_PATTERN

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names it in one line."""


@dataclass(frozen=True)
class Settings:
    """Everything the server reads at start. Field names are the TOML keys."""

    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path(".icegate")
    store: str = ""
    turn_secrets: tuple[str, ...] = ()
    # Defaults match `make coturn`: a coturn on this machine's port 3478.
    turn_uris: tuple[str, ...] = ("turn:127.0.0.1:3478?transport=udp",
                                  "turn:127.0.0.1:3478?transport=tcp")
    stun_uris: tuple[str, ...] = ("stun:127.0.0.1:3478",)
    turn_realm: str = "icegate.local"
    turn_ttl_default: int = 3600
    turn_ttl_min: int = 60
    turn_ttl_max: int = 86400
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    dev_secrets: bool = True
    store_timeout: float = 0.1
    rate_limit_fail_open: bool = False
    master_key: str = field(default="", repr=False)
    master_key_file: str = ""
    session_lease_seconds: int = 3600
    upstream_connect_timeout: float = 5.0
    upstream_read_timeout: float = 30.0
    coturn_redis: str = field(default="", repr=False)
    coturn_sqlite: str = ""
    turn_rotate_interval: int = 0
    openai_base_url: str = ""
    azure_base_url: str = ""
    orga_base_url: str = ""
    gemini_base_url: str = ""
    shutdown_grace: float = 10.0
    log_level: str = "INFO"
    log_format: str = "json"
    metrics_listen: str = ""
    workers: int = 1
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tls_client_projects: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:
        # Settings are printed in logs and tracebacks: secrets show as counts only.
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_SETTINGS:
                value = f"<{len(value)} hidden>"
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @property
    def store_url(self) -> str:
        """The store URL in force: the setting, or a SQLite file under the data directory."""
        return self.store or f"sqlite:///{self.data_dir / 'icegate.sqlite3'}"


SECRET_SETTINGS = frozenset({"turn_secrets", "api_keys", "master_key", "store", "coturn_redis"})
"""Settings shown by size only: secrets, and URLs that may carry a password."""
STORE_SCHEMES = ("sqlite:///", "redis://", "rediss://", "unix://")
MAX_WORKERS = 64

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
MAX_URL = 2048
COTURN_REDIS_PATTERN = re.compile(r"(?:rediss?|unix)://[\x21-\x7e]+")


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


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "listen": _parse_str,
    "data_dir": lambda raw: Path(_parse_str(raw)),
    "store": _parse_str,
    "turn_secrets": _parse_list,
    "turn_uris": _parse_list,
    "stun_uris": _parse_list,
    "turn_realm": _parse_str,
    "turn_ttl_default": _parse_int,
    "turn_ttl_min": _parse_int,
    "turn_ttl_max": _parse_int,
    "api_keys": _parse_list,
    "dev_secrets": _parse_bool,
    "store_timeout": _parse_float,
    "rate_limit_fail_open": _parse_bool,
    "master_key": _parse_str,
    "master_key_file": _parse_str,
    "session_lease_seconds": _parse_int,
    "upstream_connect_timeout": _parse_float,
    "upstream_read_timeout": _parse_float,
    "coturn_redis": _parse_str,
    "coturn_sqlite": _parse_str,
    "turn_rotate_interval": _parse_int,
    "openai_base_url": _parse_str,
    "azure_base_url": _parse_str,
    "orga_base_url": _parse_str,
    "gemini_base_url": _parse_str,
    "shutdown_grace": _parse_float,
    "log_level": lambda raw: _parse_str(raw).upper(),
    "log_format": lambda raw: _parse_str(raw).lower(),
    "metrics_listen": _parse_str,
    "workers": _parse_int,
    "tls_cert": _parse_str,
    "tls_key": _parse_str,
    "tls_client_ca": _parse_str,
    "tls_client_projects": parse_client_projects,
}

_HELP: dict[str, str] = {
    "listen": "host:port to listen on (default 127.0.0.1:50051)",
    "data_dir": "directory for the SQLite store and generated dev secrets (default .icegate)",
    "store": "sqlite:///path (default under --data-dir) or redis://host:port/db",
    "turn_secrets": "comma-separated TURN shared secrets; the first signs, all stay valid",
    "turn_uris": "comma-separated turn:/turns: URIs handed to browsers",
    "stun_uris": "comma-separated stun: URIs handed to browsers",
    "turn_realm": "the coturn realm (default icegate.local)",
    "turn_ttl_default": "TURN credential lifetime when a caller names none, seconds (3600)",
    "turn_ttl_min": "shortest TURN credential lifetime a caller may ask for, seconds (60)",
    "turn_ttl_max": "longest TURN credential lifetime a caller may ask for, seconds (86400)",
    "api_keys": "comma-separated static caller keys with full (admin) access",
    "dev_secrets": "generate and keep dev secrets when none are configured (default true)",
    "store_timeout": "seconds a Redis store call may take before the call fails UNAVAILABLE (0.1)",
    "rate_limit_fail_open": "admit known callers uncounted while the store is unreachable (false)",
    "master_key": "base64 of 32 bytes sealing provider keys; comma-separated, first seals",
    "master_key_file": "a file holding the master key(s), instead of ICEGATE_MASTER_KEY",
    "session_lease_seconds": "a session not kept alive this long frees its slot (3600)",
    "upstream_connect_timeout": "seconds to connect to a provider (5)",
    "upstream_read_timeout": "seconds to wait for a provider's answer (30)",
    "coturn_redis": "redis:// URL of coturn's redis-userdb; icegate keeps the realm's secrets",
    "coturn_sqlite": "path of coturn's SQLite userdb: icegate keeps the realm's secrets there",
    "turn_rotate_interval": "rotate the TURN secret automatically every this many seconds (0: off)",
    "openai_base_url": "OpenAI API base URL (https://api.openai.com)",
    "azure_base_url": "Azure OpenAI resource URL, https://<resource>.openai.azure.com",
    "orga_base_url": "Orga AI API base URL (https://api.orga-ai.com)",
    "gemini_base_url": "Gemini API base URL (https://generativelanguage.googleapis.com)",
    "shutdown_grace": "seconds in-flight calls get to finish on SIGTERM (default 10)",
    "log_level": "DEBUG, INFO, WARNING or ERROR (default INFO)",
    "log_format": "json (one sanitised JSON object per line, the default) or text",
    "metrics_listen": "host:port serving Prometheus metrics at /metrics (default empty: off)",
    "workers": "server processes sharing the port with SO_REUSEPORT (default 1)",
    "tls_cert": "PEM certificate chain to serve TLS with (with --tls-key); no TLS when unset",
    "tls_key": "PEM private key of --tls-cert (unencrypted; keep it mode 0600)",
    "tls_client_ca": "PEM CA bundle: require client certificates it signed (mutual TLS)",
    "tls_client_projects": "typed certificate name = project id, comma-separated, e.g. "
                           "uri:spiffe://corp/web=acme,dns:ops.internal=*; types uri, dns, "
                           "email, ip, cn (cn only for a certificate without SAN); * makes "
                           "an admin",
}


def env_name(setting: str) -> str:
    """The environment variable of a setting, e.g. `turn_secrets` -> `ICEGATE_TURN_SECRETS`."""
    return "ICEGATE_" + setting.upper()


def flag_name(setting: str) -> str:
    """The command-line flag of a setting, e.g. `turn_secrets` -> `--turn-secrets`."""
    return "--" + setting.replace("_", "-")


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per setting (all default to None: unset falls through to env and TOML)."""
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (ICEGATE_CONFIG)")
    for name in _PARSERS:
        parser.add_argument(flag_name(name), dest=name, default=None, help=_HELP[name])


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
    unknown = sorted(set(from_file) - set(_PARSERS))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r} in {config_path}")

    values: dict[str, Any] = {}
    for name, parse in _PARSERS.items():
        if name in flags:
            source, raw = flag_name(name), flags[name]
        elif env_name(name) in environ:
            source, raw = env_name(name), environ[env_name(name)]
        elif name in from_file:
            source, raw = f"{name} in {config_path}", from_file[name]
        else:
            continue
        try:
            values[name] = parse(raw)
        except ValueError as error:
            raise ConfigError(f"invalid setting {source}: {error}") from None

    settings = Settings(**values)
    _validate(settings)
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


def parse_listen_address(listen: str) -> tuple[str, int]:
    """Splits `host:port` (IPv6 hosts in brackets) and checks the port."""
    # An unbracketed IPv6 host ("::1") does not match: its last group would read as the port.
    # The port is ASCII digits only: str.isdigit also takes look-alikes (fullwidth U+FF15).
    matched = LISTEN_PATTERN.fullmatch(listen)
    if matched is None or not 0 <= int(matched["port"]) <= 65535:
        raise ValueError("must be host:port, e.g. 127.0.0.1:50051 or [::1]:50051")
    return matched["host"], int(matched["port"])


def _validate(settings: Settings) -> None:
    def fail(name: str, problem: str) -> None:
        raise ConfigError(f"invalid setting {env_name(name)}: {problem}")

    try:
        _, listen_port = parse_listen_address(settings.listen)
    except ValueError as error:
        fail("listen", str(error))
    if not 1 <= settings.workers <= MAX_WORKERS:
        fail("workers", f"must be between 1 and {MAX_WORKERS}")
    if settings.workers > 1 and listen_port == 0:
        fail("workers", "more than one worker needs a fixed port in ICEGATE_LISTEN, not 0")
    if settings.store and (not settings.store.startswith(STORE_SCHEMES)
                           or not settings.store.isprintable()):
        fail("store", "must start with sqlite:/// or redis:// and hold no control character")
    for secret in settings.turn_secrets:
        if len(secret) < 16:
            fail("turn_secrets", "every secret must be at least 16 characters long")
    if len(set(settings.turn_secrets)) != len(settings.turn_secrets):
        fail("turn_secrets", "lists the same secret twice")
    for uri in settings.turn_uris:
        if not TURN_URI_PATTERN.fullmatch(uri):
            fail("turn_uris", f"{uri!r} is not turn[s]:host[:port][?transport=udp|tcp]")
    for uri in settings.stun_uris:
        if not STUN_URI_PATTERN.fullmatch(uri):
            fail("stun_uris", f"{uri!r} is not stun[s]:host[:port]")
    if not REALM_PATTERN.fullmatch(settings.turn_realm):
        fail("turn_realm", "must be 1-255 characters: letters, digits, . _ -, starting with a "
             "letter or digit")
    for key in settings.api_keys:
        if len(key) < 16:
            fail("api_keys", "every key must be at least 16 characters long")
    if settings.turn_ttl_min < 1:
        fail("turn_ttl_min", "must be at least 1 second")
    if settings.turn_ttl_max < settings.turn_ttl_min:
        fail("turn_ttl_max", f"must be at least ICEGATE_TURN_TTL_MIN ({settings.turn_ttl_min})")
    if not settings.turn_ttl_min <= settings.turn_ttl_default <= settings.turn_ttl_max:
        fail("turn_ttl_default",
             f"must lie between {settings.turn_ttl_min} and {settings.turn_ttl_max}")
    if not math.isfinite(settings.shutdown_grace) or settings.shutdown_grace < 0:
        fail("shutdown_grace", "must be a finite number of seconds, not negative")
    if not 1 <= settings.session_lease_seconds <= 7 * 86400:
        fail("session_lease_seconds", "must be between 1 second and 7 days")
    for name in ("upstream_connect_timeout", "upstream_read_timeout"):
        if not 0 < getattr(settings, name) <= 600:
            fail(name, "must be more than 0 and at most 600 seconds")
    if settings.master_key and settings.master_key_file:
        fail("master_key", "set ICEGATE_MASTER_KEY or ICEGATE_MASTER_KEY_FILE, not both")
    if settings.master_key or settings.master_key_file:
        from icegate_server.sessions.vault import load_master_keys

        try:
            load_master_keys(settings.master_key or None, settings.master_key_file or None)
        except ValueError as error:
            raise ConfigError(f"invalid setting {error}") from None
    for name in ("openai_base_url", "azure_base_url", "orga_base_url", "gemini_base_url"):
        url = getattr(settings, name)
        if url and (len(url) > MAX_URL or not URL_PATTERN.fullmatch(url)):
            fail(name, "must be an http(s) URL of printable ASCII without spaces")
    if settings.coturn_redis and not COTURN_REDIS_PATTERN.fullmatch(settings.coturn_redis):
        fail("coturn_redis", "must be a redis:// URL of printable ASCII without spaces")
    if settings.coturn_sqlite and not Path(settings.coturn_sqlite).parent.is_dir():
        fail("coturn_sqlite", "must be a file in an existing directory")
    if settings.turn_rotate_interval and not 60 <= settings.turn_rotate_interval <= 365 * 86400:
        fail("turn_rotate_interval", "must be 0 (off) or between 60 seconds and a year")
    if settings.turn_rotate_interval and not (settings.coturn_redis or settings.coturn_sqlite):
        # Without a userdb icegate keeps, coturn never learns a rotated secret and refuses
        # every credential signed after the first rotation.
        fail("turn_rotate_interval", "needs ICEGATE_COTURN_REDIS or ICEGATE_COTURN_SQLITE, "
             "so that coturn follows the rotations")
    if not 0 < settings.store_timeout <= 60:
        fail("store_timeout", "must be more than 0 and at most 60 seconds")
    if settings.log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        fail("log_level", "must be DEBUG, INFO, WARNING or ERROR")
    if settings.log_format not in {"json", "text"}:
        fail("log_format", "must be json or text")
    if settings.metrics_listen:
        try:
            parse_listen_address(settings.metrics_listen)
        except ValueError as error:
            fail("metrics_listen", str(error))
        if settings.metrics_listen == settings.listen and not settings.listen.endswith(":0"):
            fail("metrics_listen", "must differ from ICEGATE_LISTEN")
    _validate_tls(settings, fail)
    if not settings.dev_secrets and not settings.turn_secrets:
        fail("turn_secrets", "is required when ICEGATE_DEV_SECRETS is false")
    if not settings.dev_secrets and not settings.api_keys:
        fail("api_keys", "is required when ICEGATE_DEV_SECRETS is false")
    if not settings.dev_secrets and not (settings.master_key or settings.master_key_file):
        fail("master_key", "is required when ICEGATE_DEV_SECRETS is false")


def _validate_tls(settings: Settings, fail: Callable[[str, str], None]) -> None:
    if bool(settings.tls_cert) != bool(settings.tls_key):
        fail("tls_key" if settings.tls_cert else "tls_cert",
             "ICEGATE_TLS_CERT and ICEGATE_TLS_KEY must be set together")
    if settings.tls_client_ca and not settings.tls_cert:
        fail("tls_client_ca", "needs ICEGATE_TLS_CERT and ICEGATE_TLS_KEY (mutual TLS is TLS)")
    if settings.tls_client_projects and not settings.tls_client_ca:
        fail("tls_client_projects", "needs ICEGATE_TLS_CLIENT_CA: only verified client "
             "certificates can stand for a caller")
    for identity, project in settings.tls_client_projects:
        if project != ADMIN_IDENTITY and not PROJECT_ID_PATTERN.fullmatch(project):
            fail("tls_client_projects", f"{identity!r} maps to {project!r}, which is neither "
                 "a project id nor *")
    try:
        check_tls_files(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except ValueError as error:
        raise ConfigError(f"invalid setting {error}") from None
