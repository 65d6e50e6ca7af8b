"""TURN REST credentials (draft-uberti-behave-turn-rest-00), as coturn's use-auth-secret checks.

username = `<unix expiry seconds>:<user id>`; password = base64(HMAC-SHA1(secret, username)).
coturn reads the expiry before the first separator and tries every configured secret in turn,
so rotation is: sign with the newest secret, keep the older ones configured on both sides until
the credentials they signed have expired.

icegate's usernames bind the project in: `<expiry>:<project id>/<user id>`, e.g.
`1767225600:acme/alice@example.com`. coturn only reads the digits before the first `:`; the
rest is opaque to it, so two projects' users named alike get different usernames (and show
apart in coturn's logs). Project ids cannot hold `/` or `:`, and user ids cannot hold `:`, so
the layout parses back unambiguously: split at the first `:`, then at the first `/`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

from icegate_server.clock import Clock
from icegate_server.errors import InvalidFieldError
from icegate_server.projects.records import Project

SEPARATOR = ":"
"""coturn's default `--rest-api-separator`; a user id must never contain it."""

PROJECT_SEPARATOR = "/"
"""Between the project id and the user id in icegate's usernames."""

MAX_USER_ID_BYTES = 256


class TurnSecretKeyring:
    """The TURN shared secrets in force: the first signs, all are listed for coturn.

    The HMAC key schedule is computed once here; signing copies the prepared state, so the
    hot path does no per-call key set-up.
    """

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("a TURN keyring needs at least one secret")
        self._secrets = tuple(secrets)
        self._signer = hmac.new(self._secrets[0].encode(), digestmod=hashlib.sha1)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret, the signing one first (what coturn must be configured with)."""
        return self._secrets

    def __repr__(self) -> str:
        return f"TurnSecretKeyring(<{len(self._secrets)} secrets>)"

    def sign(self, username: str) -> str:
        """The TURN password for `username` under the signing secret."""
        mac = self._signer.copy()
        mac.update(username.encode())
        return base64.b64encode(mac.digest()).decode("ascii")


def turn_password(secret: str, username: str) -> str:
    """The TURN password for `username` under `secret` (the draft's formula, stated once)."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


class TtlPolicy(NamedTuple):
    """How long credentials may live, in whole seconds: requests outside the bounds are refused."""

    default: int = 3600
    minimum: int = 60
    maximum: int = 86400

    def resolve(self, requested_seconds: float | None, *, field: str = "ttl") -> int:
        """The TTL to issue: the default when none was asked for, else the request if allowed.

        Raises:
            InvalidFieldError: The request is not a whole number of seconds within the bounds.
        """
        if requested_seconds is None:
            return self.default
        if not math.isfinite(requested_seconds) or requested_seconds != int(requested_seconds):
            raise InvalidFieldError(field, "must be a whole number of seconds")
        if not self.minimum <= requested_seconds <= self.maximum:
            raise InvalidFieldError(
                field, f"must be between {self.minimum} and {self.maximum} seconds"
            )
        return int(requested_seconds)


def validate_user_id(user_id: str, *, field: str = "user_id") -> None:
    """Checks a user id can be bound into a TURN username unambiguously.

    Raises:
        InvalidFieldError: Empty, longer than 256 bytes of UTF-8, holding the separator or
            a control character, or starting or ending with a space (a look-alike of the
            trimmed id in every log and TURN username).
    """
    if not user_id:
        raise InvalidFieldError(field, "is required")
    if len(user_id.encode("utf-8", "surrogatepass")) > MAX_USER_ID_BYTES:
        raise InvalidFieldError(field, f"must be at most {MAX_USER_ID_BYTES} bytes of UTF-8")
    if SEPARATOR in user_id:
        raise InvalidFieldError(field, f"must not contain {SEPARATOR!r} (the TURN separator)")
    # Lone surrogates are category Cs, which isprintable() already refuses.
    if not user_id.isprintable():
        raise InvalidFieldError(field, "must not contain control or unprintable characters")
    if user_id != user_id.strip():
        raise InvalidFieldError(field, "must not start or end with a space")


class TurnCredential(NamedTuple):
    """One issued TURN credential."""

    username: str
    password: str = ""
    ttl_seconds: int = 0
    expires_at: int = 0
    uris: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (f"TurnCredential(username={self.username!r}, password=<hidden>, "
                f"ttl_seconds={self.ttl_seconds}, expires_at={self.expires_at})")


class TurnCredentialIssuer:
    """Issues TURN REST credentials for the configured URIs, signed by the keyring."""

    def __init__(self, keyring: TurnSecretKeyring, clock: Clock, uris: Sequence[str], *,
                 min_ttl_seconds: int = 60,
                 on_issue: Callable[[], None] | None = None) -> None:
        """`on_issue` is called once per credential signed (the server counts them)."""
        self._keyring = keyring
        self._on_issue = on_issue
        self._clock = clock
        self._uris = tuple(uris)
        self._min_ttl = min_ttl_seconds

    @property
    def uris(self) -> tuple[str, ...]:
        return self._uris

    @property
    def keyring(self) -> TurnSecretKeyring:
        return self._keyring

    def use_keyring(self, keyring: TurnSecretKeyring) -> None:
        """Signs with `keyring` from now on (after a rotation; see `turn_secrets`)."""
        self._keyring = keyring

    def issue_for(self, project: Project, user_id: str, requested_ttl: float | None, *,
                  ttl_field: str = "ttl") -> TurnCredential:
        """Validates the request against the project's policy and issues its credential.

        Raises:
            InvalidFieldError: A bad `user_id`, or a `ttl` outside the project's bounds.
        """
        validate_user_id(user_id)
        policy = TtlPolicy(default=project.turn_ttl_default_seconds, minimum=self._min_ttl,
                           maximum=project.turn_ttl_max_seconds)
        ttl = policy.resolve(requested_ttl, field=ttl_field)
        return self.issue(f"{project.project_id}{PROJECT_SEPARATOR}{user_id}", ttl)

    def issue(self, user: str, ttl_seconds: int) -> TurnCredential:
        """Signs a credential for `user` (already validated) valid for `ttl_seconds` from now."""
        expires_at = int(self._clock.now()) + ttl_seconds
        username = f"{expires_at}{SEPARATOR}{user}"
        if self._on_issue is not None:
            self._on_issue()
        return TurnCredential(
            username=username,
            password=self._keyring.sign(username),
            ttl_seconds=ttl_seconds,
            expires_at=expires_at,
            uris=self._uris,
        )
