"""Development secrets: generated on first start, kept in the data directory (mode 0600).

They let `make run` work on a fresh clone with nothing configured. They are used only for
settings left empty, and the server says so at start; production sets every secret itself.
The file also records where the dev server last listened (`grpc_target`, `http_url`), so
the `icegate` command and clients started in the same directory find it on any port.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from pathlib import Path
from typing import Any

from icegate_server.sessions.vault import generate_master_key
from icegate_server.settings import Settings

DEV_SECRETS_FILE = "dev-secrets.json"


def _generate() -> dict[str, str]:
    return {
        "turn_secret": secrets.token_urlsafe(32),
        "api_key": "igk_dev_" + secrets.token_urlsafe(32),
        "master_key": generate_master_key(),
    }


def load_or_create(data_dir: Path) -> tuple[dict[str, str], Path, bool]:
    """The dev secrets kept in `data_dir`, generated and written (0600) if absent.

    Returns:
        The secrets, the file they live in, and whether they were created just now.
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / DEV_SECRETS_FILE
    try:
        with path.open(encoding="utf-8") as handle:
            stored: dict[str, str] = json.load(handle)
    except FileNotFoundError:
        stored = {}
    missing = {name: value for name, value in _generate().items() if name not in stored}
    if missing:
        stored.update(missing)
        _write(path, stored)
    return stored, path, bool(missing)


def _write(path: Path, stored: dict[str, str]) -> None:
    # O_EXCL on a temporary name, then rename: the file is never readable by others, not
    # even for an instant, and a crash never leaves half a file.
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(stored, handle, indent=2)
    tmp.replace(path)


def dialable(listen_host: str) -> str:
    """The host a local client dials for a listen host: loopback for a wildcard address."""
    if listen_host in ("", "0.0.0.0"):  # noqa: S104 - recognising the wildcard, not binding
        return "127.0.0.1"
    if listen_host in ("[::]", "::"):
        return "[::1]"
    return listen_host


def record_listening(path: Path, grpc_target: str, http_url: str | None) -> None:
    """Writes where the dev server listens into its dev secrets file (`grpc_target`, and
    `http_url` when the HTTP listener is on; a stale `http_url` is removed)."""
    with path.open(encoding="utf-8") as handle:
        stored: dict[str, str] = json.load(handle)
    stored["grpc_target"] = grpc_target
    stored.pop("http_url", None)
    if http_url is not None:
        stored["http_url"] = http_url
    _write(path, stored)


def apply_dev_secrets(settings: Settings) -> tuple[Settings, Path | None, bool]:
    """Fills the secrets left empty in `settings` with kept dev secrets, when allowed.

    Returns:
        The settings to run with, the dev secrets file (None when none was needed) and
        whether it was created just now.
    """
    has_master_key = bool(settings.master_key or settings.master_key_file)
    if not settings.dev_secrets or (settings.turn_secrets and settings.api_keys
                                    and has_master_key):
        return settings, None, False
    stored, path, created = load_or_create(settings.data_dir)
    changes: dict[str, Any] = {}
    if not settings.turn_secrets:
        changes["turn_secrets"] = (stored["turn_secret"],)
    if not settings.api_keys:
        changes["api_keys"] = (stored["api_key"],)
    if not has_master_key:
        changes["master_key"] = stored["master_key"]
    return dataclasses.replace(settings, **changes), path, created
