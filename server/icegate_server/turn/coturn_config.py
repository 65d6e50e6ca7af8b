"""`icegate-server coturn-config`: a turnserver.conf that matches icegate's own settings.

Rendered from `deploy/coturn/turnserver.conf.template` (shipped inside the wheel as package
data), so the realm, the secrets and the ports coturn uses can never drift from icegate's.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import urlsplit

from icegate_server.settings import Settings

_REPO_TEMPLATE = Path(__file__).resolve().parents[3] / "deploy/coturn/turnserver.conf.template"
DEFAULT_TURN_PORT = 3478


def _template_text() -> str:
    # A source checkout reads the template in deploy/; an installed wheel carries a copy.
    if _REPO_TEMPLATE.is_file():
        return _REPO_TEMPLATE.read_text(encoding="utf-8")
    return resources.files("icegate_server").joinpath("turnserver.conf.template").read_text(
        encoding="utf-8")


def listening_port(settings: Settings) -> int:
    """The port coturn must listen on: the one in the first plain turn: URI, else 3478."""
    for uri in settings.turn_uris:
        if uri.startswith("turn:"):
            # turn:host:port?transport=udp -> parse as a URL with a fake authority. A URI
            # without a port means 3478 to browsers, so it does not defer to a later URI.
            parts = urlsplit("turn://" + uri.removeprefix("turn:"))
            return parts.port or DEFAULT_TURN_PORT
    return DEFAULT_TURN_PORT


def redis_userdb_line(url: str) -> str:
    """coturn's `redis-userdb` line for a redis:// URL."""
    parts = urlsplit(url)
    fields = [f"ip={parts.hostname or '127.0.0.1'}", f"dbname={parts.path.strip('/') or 0}",
              f"port={parts.port or 6379}"]
    if parts.password:
        fields.append(f"password={parts.password}")
    return f'redis-userdb="{" ".join([*fields, "connect_timeout=30"])}"'


def render_coturn_config(settings: Settings, *, listening_ip: str = "127.0.0.1",
                         relay_ip: str = "127.0.0.1", min_port: int = 49160,
                         max_port: int = 49200) -> str:
    """The turnserver.conf text for `settings`.

    Where icegate keeps coturn's database (ICEGATE_COTURN_REDIS, ICEGATE_COTURN_SQLITE),
    coturn reads the secrets from there and follows rotations without a restart; otherwise
    the settings' secrets are written as static-auth-secret lines.
    """
    state_dir = settings.data_dir.resolve() / "coturn"
    static_secrets = "\n".join(f"static-auth-secret={s}" for s in settings.turn_secrets)
    user_database = f"userdb={state_dir / 'turndb'}"
    if settings.coturn_redis:
        static_secrets, user_database = "", redis_userdb_line(settings.coturn_redis)
    elif settings.coturn_sqlite:
        static_secrets, user_database = "", f"userdb={Path(settings.coturn_sqlite).resolve()}"
    return Template(_template_text()).substitute(
        listening_ip=listening_ip,
        listening_port=listening_port(settings),
        relay_ip=relay_ip,
        min_port=min_port,
        max_port=max_port,
        realm=settings.turn_realm,
        static_auth_secrets=static_secrets,
        user_database=user_database,
        state_dir=state_dir,
    )


def write_coturn_config(settings: Settings, output: str | None, **rendering: Any) -> None:
    """Writes the config to `output` (mode 0600: it holds the secrets) or standard output.

    `rendering` takes `render_coturn_config`'s keyword options (addresses, relay ports).
    """
    text = render_coturn_config(settings, **rendering)
    (settings.data_dir / "coturn").mkdir(parents=True, exist_ok=True, mode=0o700)
    if output is None:
        sys.stdout.write(text)
        return
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, 0o600)
