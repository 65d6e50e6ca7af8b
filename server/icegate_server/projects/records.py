"""Projects and caller keys: the records the store keeps, and the rules for their fields.

A project is the unit every limit applies to. Caller keys are bound to one project, or are
admin keys that may act on any project and call the admin service. A key's secret is shown
once at creation and stored only as its SHA-256 digest (see `icegate_server.access.keys`).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

from icegate_server.errors import InvalidFieldError

DEFAULT_PROJECT_ID = "default"
"""The project admin keys act on when a call names none; created at first start."""

# Identifier patterns are matched whole, with `fullmatch`, never `re.match`: `$` also matches
# before a trailing newline, which let `acme\n` in as a second, look-alike project.
PROJECT_ID_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,62}")
"""A project id, to `fullmatch`: a lower-case letter, then lower-case letters, digits, `-`."""
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""A caller key's public id, to `fullmatch` (issued ids are 12 hex digits)."""
URL_PATTERN = re.compile(r"https?://[\x21-\x7e]+")
"""An http(s) URL, to `fullmatch`: printable ASCII without spaces (IDN hosts in punycode)."""
MAX_DISPLAY_NAME = 200
MAX_URL = 2048
KEY_PREFIX = "igk_"
MAX_ALLOCATIONS = 100_000_000
MAX_BYTE_QUOTA = 2**62


@dataclass(frozen=True)
class Project:
    """A project and the limits in force for it. Times are Unix seconds."""

    project_id: str
    display_name: str = ""
    rate_limit_requests: int = 100
    rate_limit_window_seconds: int = 900
    turn_ttl_default_seconds: int = 3600
    turn_ttl_max_seconds: int = 86400
    plan: str = "free"
    upgrade_url: str = ""
    monthly_session_quota: int = 1000
    max_concurrent_sessions: int = 5
    create_time: float = 0.0
    update_time: float = 0.0
    max_allocations: int = 0
    """Live TURN allocations at which new TURN credentials are refused; 0: no limit."""
    byte_quota: int = 0
    """TURN bytes relayed per month at which new TURN credentials are refused; 0: none."""


UPDATABLE_PROJECT_FIELDS = frozenset({
    "display_name", "rate_limit_requests", "rate_limit_window_seconds",
    "turn_ttl_default_seconds", "turn_ttl_max_seconds", "plan", "upgrade_url",
    "monthly_session_quota", "max_concurrent_sessions", "max_allocations", "byte_quota",
})


def validate_project_id(project_id: str, *, field_name: str = "project_id") -> None:
    """Project ids are lower-case DNS-label-like names: `[a-z][a-z0-9-]{0,62}`.

    The charset keeps ids safe inside TURN usernames, Redis keys and log lines.
    """
    if not PROJECT_ID_PATTERN.fullmatch(project_id):
        raise InvalidFieldError(
            field_name, "must be 1-63 characters: a lower-case letter, then letters, digits, -")


def validate_key_id(key_id: str) -> None:
    """Checks a caller key's public id before it is looked up.

    Raises:
        InvalidFieldError: Empty, or not 1-64 of `A-Z a-z 0-9 _ -`.
    """
    if not key_id:
        raise InvalidFieldError("key_id", "is required")
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise InvalidFieldError("key_id", "must be 1-64 characters: letters, digits, _ or -")


def validate_project(project: Project, *, turn_ttl_min: int, turn_ttl_max: int) -> None:
    """Checks every field of a project about to be stored.

    Raises:
        InvalidFieldError: The first field that breaks its rule.
    """
    validate_project_id(project.project_id)
    if len(project.display_name) > MAX_DISPLAY_NAME or not project.display_name.isprintable():
        raise InvalidFieldError("display_name",
                                f"must be printable, at most {MAX_DISPLAY_NAME} characters")
    if not 1 <= project.rate_limit_requests <= 1_000_000_000:
        raise InvalidFieldError("rate_limit_requests", "must be between 1 and 1000000000")
    if not 1 <= project.rate_limit_window_seconds <= 31 * 86400:
        raise InvalidFieldError("rate_limit_window", "must be between 1 second and 31 days")
    # The server-wide maximum bounds every project's: TURN secret rotation retires an old
    # secret once the longest credential it could have signed has expired.
    if not turn_ttl_min <= project.turn_ttl_max_seconds <= turn_ttl_max:
        raise InvalidFieldError("turn_ttl_max",
                                f"must be between {turn_ttl_min} and {turn_ttl_max} seconds")
    if not turn_ttl_min <= project.turn_ttl_default_seconds <= project.turn_ttl_max_seconds:
        raise InvalidFieldError("turn_ttl_default",
                                f"must be between {turn_ttl_min} seconds and turn_ttl_max")
    if len(project.plan) > 64 or not project.plan.isprintable():
        raise InvalidFieldError("plan", "must be printable, at most 64 characters")
    if project.upgrade_url and (len(project.upgrade_url) > MAX_URL
                                or not URL_PATTERN.fullmatch(project.upgrade_url)):
        raise InvalidFieldError("upgrade_url", f"must be an http(s) URL of at most {MAX_URL} "
                                "printable ASCII characters")
    if not 0 <= project.monthly_session_quota <= 1_000_000_000:
        raise InvalidFieldError("monthly_session_quota", "must be between 0 and 1000000000")
    if not 0 <= project.max_concurrent_sessions <= 1_000_000:
        raise InvalidFieldError("max_concurrent_sessions", "must be between 0 and 1000000")
    if not 0 <= project.max_allocations <= MAX_ALLOCATIONS:
        raise InvalidFieldError("max_allocations",
                                f"must be between 0 (no limit) and {MAX_ALLOCATIONS}")
    if not 0 <= project.byte_quota <= MAX_BYTE_QUOTA:
        raise InvalidFieldError("byte_quota", f"must be between 0 (none) and {MAX_BYTE_QUOTA}")


@dataclass(frozen=True)
class ApiKey:
    """A caller key's record (never its secret). Times are Unix seconds; 0 means never."""

    key_id: str
    project_id: str = ""
    admin: bool = False
    display_name: str = ""
    create_time: float = 0.0
    revoke_time: float = 0.0
    key_prefix: str = field(default="")

    @property
    def revoked(self) -> bool:
        return self.revoke_time > 0


def new_key_secret() -> tuple[str, str]:
    """A fresh caller key and its public id: `igk_<id>_<secret>`, 256 bits of randomness.

    The id (shown in listings and logs) is part of the key only to help people recognise it;
    lookup goes by the digest of the whole key.
    """
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
