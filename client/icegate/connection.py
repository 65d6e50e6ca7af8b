"""How a client reaches icegate: target, key, channel options and the retry policy.

Shared by the sync `Client` and the `AsyncClient`, so both behave the same.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0
"""Seconds a call may take when the caller gives no timeout: every call carries a deadline."""

DEV_SECRETS_PATH = Path(".icegate") / "dev-secrets.json"

log = logging.getLogger("icegate")

Metadata = Sequence[tuple[str, str]]

# Retries only where they are safe: UNAVAILABLE means the call did not run (or ran with no
# effect worth keeping), so gRPC itself retries it with backoff. Nothing else is retried.
SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "icegate.v1.CredentialService"},
                 {"service": "icegate.v1.UsageService"},
                 {"service": "grpc.health.v1.Health"}],
        "retryPolicy": {
            "maxAttempts": 3,
            "initialBackoff": "0.1s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
})

CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)


class ConfigurationError(ValueError):
    """The client was given no usable target or API key."""


def _dev_api_key() -> str | None:
    # `make run` keeps a dev key in .icegate/: callers in that directory need no set-up.
    try:
        with DEV_SECRETS_PATH.open(encoding="utf-8") as handle:
            value = json.load(handle).get("api_key")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Connection:
    """Where and as whom a client calls."""

    target: str
    api_key: str | None = field(repr=False)
    default_timeout: float = DEFAULT_TIMEOUT
    debug: bool = False

    @classmethod
    def resolve(cls, target: str | None, api_key: str | None, *,
                default_timeout: float = DEFAULT_TIMEOUT, debug: bool = False) -> Connection:
        """Fills what the caller left out from `ICEGATE_TARGET` / `ICEGATE_API_KEY`.

        A missing key is reported at the first call that needs one (health checks do not).
        """
        target = target or os.environ.get("ICEGATE_TARGET") or DEFAULT_TARGET
        api_key = api_key or os.environ.get("ICEGATE_API_KEY") or _dev_api_key()
        return cls(target=target, api_key=api_key, default_timeout=default_timeout,
                   debug=debug)

    def call_metadata(self, extra: Metadata) -> tuple[tuple[str, str], ...]:
        """The metadata of one call: the caller's, plus the bearer key.

        Raises:
            ConfigurationError: No API key was given, set or found in `.icegate/`.
        """
        if not self.api_key:
            raise ConfigurationError("no API key: pass api_key= or set ICEGATE_API_KEY")
        return (*extra, ("authorization", f"Bearer {self.api_key}"))

    def timeout(self, timeout: float | None) -> float:
        return self.default_timeout if timeout is None else timeout
