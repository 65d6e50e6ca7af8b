"""The store interface every backend implements and one contract test suite drives.

Times are integer Unix milliseconds passed in by the caller (the clock is injected, so tests
freeze it on every backend). Every counter update is atomic inside the backend (one SQLite
transaction, one Redis Lua script), never read-modify-write in Python. A backend that cannot
be reached raises `StoreUnavailableError`; every other failure is one of the outcomes below.
"""

from __future__ import annotations

import enum
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from icegate_server.projects.records import ApiKey, Project


class AdmitOutcome(enum.Enum):
    """What `Store.admit` decided."""

    ADMITTED = "admitted"
    UNKNOWN_KEY = "unknown_key"
    """No key with that digest, or it was revoked."""
    FORBIDDEN = "forbidden"
    """The key is bound to another project than the one named."""
    NO_PROJECT = "no_project"
    """The project named (or the key's project) does not exist."""
    RATE_LIMITED = "rate_limited"


class Admission(NamedTuple):
    """The answer of `Store.admit`: who called, for which project, and the rate position."""

    outcome: AdmitOutcome
    key: ApiKey | None = None
    """The key record for a stored key (None for static keys, and for UNKNOWN_KEY)."""
    project: Project | None = None
    """The project acted on (set for ADMITTED and RATE_LIMITED)."""
    tat_ms: int | None = None
    """The project's GCRA theoretical arrival time after this call (see `access.rate_limit`)."""


class SessionOutcome(enum.Enum):
    """What `Store.begin_session` decided."""

    STARTED = "started"
    NO_PROVIDER_KEY = "no_provider_key"
    CONCURRENT_LIMIT = "concurrent_limit"
    QUOTA_EXCEEDED = "quota_exceeded"


@dataclass(frozen=True)
class ProviderKeyRecord:
    """A provider API key as stored: sealed (see `sessions.vault`), never in clear."""

    project_id: str
    provider: str
    sealed: bytes
    last4: str
    update_time_ms: int


@dataclass(frozen=True)
class SessionAdmission:
    """The answer of `Store.begin_session`, with the counts as they stand after it."""

    outcome: SessionOutcome
    active_sessions: int
    sessions_this_month: int
    provider_key: ProviderKeyRecord | None = None
    """The sealed key the session will mint with (read in the same step; None when absent)."""


@dataclass(frozen=True)
class SessionPolicyRecord:
    """A project's session policy for a provider family, as JSON (see `sessions.policy`)."""

    project_id: str
    provider: str
    policy_json: str
    update_time_ms: int


@dataclass(frozen=True)
class SessionRecord:
    """What icegate remembers of a live session beyond its lease (see `sessions.realtime`).

    `ends_ms` is when the session must end whatever keep-alives say (its policy's maximum
    duration), 0 for never; `provider` the provider kind's name; `call_id` the provider's
    call (CreateCall), "" for none.
    """

    project_id: str
    session_id: str
    provider: str
    ends_ms: int = 0
    call_id: str = ""


@dataclass(frozen=True)
class TurnSecretRecord:
    """A TURN shared secret of the rotating ring, sealed (see `icegate_server.turn.rotation`).

    `retire_at_ms` is 0 for the signing secret; a rotation sets it on the previous ones to
    the moment the last credential they could have signed expires.
    """

    secret_id: str
    sealed: bytes
    created_ms: int
    retire_at_ms: int = 0


class Store(Protocol):
    """Durable state shared by every icegate process using the same store URL."""

    async def ping(self) -> None:
        """Checks the backend answers; raises `StoreUnavailableError` when it does not."""
        ...

    async def close(self) -> None:
        """Releases connections and threads; the store is unusable afterwards."""
        ...

    # -- projects (admin) -----------------------------------------------------------------

    async def create_project(self, project: Project) -> bool:
        """Stores a new project; False (and nothing written) if the id exists already."""
        ...

    async def get_project(self, project_id: str) -> Project | None:
        ...

    async def list_projects(self, *, after: str, limit: int) -> list[Project]:
        """Projects ordered by id, starting after `after` ("" for the first page)."""
        ...

    async def update_project(self, project: Project) -> bool:
        """Replaces a project's record; False if it does not exist."""
        ...

    async def delete_project(self, project_id: str, now_ms: int) -> bool:
        """Deletes a project and everything it owns; False if it did not exist.

        Its record, rate position, session counters and leases, provider keys, and its caller
        keys with every record of them (a key's secret never authenticates again, and a
        project made later with the same id lists none of them). The record goes first, in
        one step, so the keys stop working at once; the keys then go in steps of at most
        `PURGE_BATCH`, so no single statement or script works in proportion to the project's
        key count. A deletion cut short (a crash) leaves keys whose project is gone (refused
        as such); `create_project` with that id removes them before it creates, and may
        take several steps to do so.
        """
        ...

    # -- caller keys (admin) ----------------------------------------------------------------

    async def create_api_key(self, key: ApiKey, digest: bytes) -> bool:
        """Stores a key record under the SHA-256 digest of its secret.

        Returns False (nothing written) for a project key whose project does not exist: a
        key created while its project is being deleted must not outlive it.
        """
        ...

    async def list_api_keys(self, project_id: str | None, *, after: str,
                            limit: int) -> list[ApiKey]:
        """At most `limit` keys of one project, or admin keys when `project_id` is None,
        revoked ones too, oldest first (by creation time, then key id).

        `after` is the `api_key_cursor` of the last key of the previous page ("" for the
        first page): a strict lower bound, which need not be a stored key. Each call works in
        proportion to `limit`, not to the number of keys.
        """
        ...

    async def revoke_api_key(self, key_id: str, now_ms: int) -> ApiKey | None:
        """Marks a key revoked (refused from the next call on, on every replica)."""
        ...

    # -- the hot path: one round trip per call -----------------------------------------------

    async def admit(self, *, digest: bytes | None, project_id: str, now_ms: int,
                    count: bool) -> Admission:
        """Authenticates, authorises and rate-limits one call, atomically.

        Args:
            digest: The SHA-256 digest of a stored caller key, or None for a caller already
                authenticated as admin (a static key).
            project_id: The project the call names; "" means the key's own project, and
                for admin callers (admin keys, and a None digest) `DEFAULT_PROJECT_ID`.
            now_ms: The current time.
            count: Whether the call counts against the project's rate limit (the project's
                own `rate_limit_requests` per `rate_limit_window_seconds`, GCRA as in
                `icegate_server.access.rate_limit`).

        A key bound to project A naming project B gets FORBIDDEN and counts nothing. An admin
        key may name any project. RATE_LIMITED leaves the TAT unchanged.
        """
        ...

    async def rate_position(self, project_id: str) -> int | None:
        """The project's current GCRA TAT (None when it never called), for usage reports."""
        ...

    # -- sessions: monthly quota and concurrency leases (see `sessions.realtime`) -----------------

    async def begin_session(self, *, project_id: str, session_id: str, month: str,
                            now_ms: int, pending_ms: int, quota: int, max_concurrent: int,
                            provider: str) -> SessionAdmission:
        """Atomically: read the project's sealed `provider` key, expire stale leases, check
        concurrency then quota, and take a *pending* lease: all a CreateSession needs before
        it calls the provider, in one round trip.

        Concurrency counts every live lease, pending ones included; the quota counts the
        month's confirmed sessions plus the live pending leases (each may still become one).
        On STARTED a pending lease for `session_id` expiring at `now_ms + pending_ms` is held
        and `provider_key` is the sealed key; the month's count is not touched (see
        `confirm_session`), so a start that never completes frees its slot by itself within
        `pending_ms` and leaves no unit behind. Without a key the outcome is
        NO_PROVIDER_KEY, checked first. Otherwise nothing changes.
        """
        ...

    async def confirm_session(self, *, project_id: str, session_id: str, month: str,
                              now_ms: int, lease_ms: int) -> bool:
        """Turns a live pending lease into a session: a lease expiring at `now_ms + lease_ms`,
        and one more session counted in `month`, atomically.

        True when the session is confirmed (now, or already before: confirming twice counts
        once); False when no live pending lease is held (it expired, or was cancelled), and
        then nothing is counted and an expired pending lease is dropped.
        """
        ...

    async def renew_session(self, *, project_id: str, session_id: str, now_ms: int,
                            lease_ms: int) -> bool:
        """Extends a live lease to `now_ms + lease_ms`; False if it is not held (or expired)."""
        ...

    async def end_session(self, *, project_id: str, session_id: str, now_ms: int) -> bool:
        """Releases a lease; False if it was not held. The month's count is kept."""
        ...

    async def cancel_session(self, *, project_id: str, session_id: str, month: str) -> None:
        """Gives back what `begin_session` and `confirm_session` took for a session whose
        caller did not get it, whatever state it is in: a pending lease is dropped (nothing was
        counted); a confirmed lease, live or expired, is dropped and uncounted from `month`.
        Idempotent: a second call, or one for a session never begun, changes nothing."""
        ...

    async def session_counts(self, *, project_id: str, month: str,
                             now_ms: int) -> tuple[int, int]:
        """(sessions created in `month`, leases live at `now_ms`)."""
        ...

    # -- the vault's storage -----------------------------------------------------------------

    async def put_provider_key(self, record: ProviderKeyRecord) -> None:
        """Creates or replaces the sealed key of (project, provider)."""
        ...

    async def get_provider_key(self, project_id: str, provider: str) -> ProviderKeyRecord | None:
        ...

    async def list_provider_keys(self, project_id: str | None) -> list[ProviderKeyRecord]:
        """One project's keys, or every project's when None (for master-key rotation)."""
        ...

    async def delete_provider_key(self, project_id: str, provider: str) -> bool:
        ...

    # -- session policies and session records -------------------------------------------------

    async def put_session_policy(self, record: SessionPolicyRecord) -> bool:
        """Creates or replaces the policy of (project, provider); False (nothing written) when
        the project does not exist."""
        ...

    async def get_session_policy(self, project_id: str,
                                 provider: str) -> SessionPolicyRecord | None:
        ...

    async def delete_session_policy(self, project_id: str, provider: str) -> bool:
        """False when there was none."""
        ...

    async def put_session_record(self, record: SessionRecord, now_ms: int) -> None:
        """Keeps `record` until `delete_session_record`, or until its `ends_ms` has passed
        (each call drops the project's records that ended before `now_ms`)."""
        ...

    async def get_session_record(self, project_id: str, session_id: str) -> SessionRecord | None:
        ...

    async def take_session_record(self, project_id: str,
                                  session_id: str) -> SessionRecord | None:
        """Removes a session's record and returns it (None when there was none): of the
        callers taking the same record, exactly one gets it."""
        ...

    async def take_ended_calls(self, now_ms: int, limit: int) -> list[SessionRecord]:
        """Removes and returns up to `limit` records of calls (a `call_id`) whose lease is not
        live at `now_ms` (expired, ended, cancelled, or reached its end): the calls to hang
        up. Each record is returned once, to one caller."""
        ...

    # -- webhook deliveries -------------------------------------------------------------------

    async def claim_webhook_delivery(self, project_id: str, delivery_id: str, *, now_ms: int,
                                     until_ms: int) -> bool:
        """Remembers the delivery `delivery_id` of the project until `until_ms`; True when it
        was not remembered already (its first arrival), False for a replay. Of the callers
        claiming the same delivery at once, exactly one gets True."""
        ...

    # -- the TURN secret ring ------------------------------------------------------------------

    async def list_turn_secrets(self) -> list[TurnSecretRecord]:
        """Every secret of the ring, newest first."""
        ...

    async def rotate_turn_secret(self, record: TurnSecretRecord, *, now_ms: int,
                                 retire_at_ms: int, min_age_ms: int) -> bool:
        """Atomically makes `record` the signer, unless the signer is younger than `min_age_ms`.

        On success every secret not yet retiring gets `retire_at_ms`. Returns False (nothing
        written) when the current signer was created after `now_ms - min_age_ms`: that is how
        replicas rotating on the same schedule rotate once, not once each.
        """
        ...

    async def purge_turn_secrets(self, now_ms: int) -> int:
        """Deletes the secrets whose retirement time has come; returns how many."""
        ...


PURGE_BATCH = 500
"""Caller keys a deletion removes per step (one SQLite transaction, one Redis script): a
few milliseconds of work, far below the store timeout, whatever the project's size."""

_CURSOR = re.compile(r"([0-9a-f]{16}):([A-Za-z0-9_-]{1,64})")


def api_key_cursor(key: ApiKey) -> str:
    """The position of a key in the listing order (creation time, then key id), as a string
    that sorts byte by byte in that same order: the creation time as the 16 hex digits of its
    big-endian IEEE 754 double (order-preserving for times >= 0), then `:` and the key id.

    The Redis store keeps exactly these strings in a sorted set (ZRANGEBYLEX pages it).
    """
    return f"{struct.pack('>d', max(float(key.create_time), 0.0)).hex()}:{key.key_id}"


def parse_api_key_cursor(cursor: str) -> tuple[float, str] | None:
    """(creation time, key id) of an `api_key_cursor`, or None if it is not one."""
    match = _CURSOR.fullmatch(cursor)
    if match is None:
        return None
    (create_time,) = struct.unpack(">d", bytes.fromhex(match[1]))
    if not math.isfinite(create_time) or create_time < 0 or math.copysign(1, create_time) < 0:
        return None
    return create_time, match[2]


def month_of(now_ms: int) -> str:
    """The UTC calendar month of a time, `YYYY-MM`: the unit of the monthly session quota."""
    import time

    return time.strftime("%Y-%m", time.gmtime(now_ms // 1000))


__all__: Sequence[str] = (
    "PURGE_BATCH", "Admission", "AdmitOutcome", "ProviderKeyRecord", "SessionAdmission",
    "SessionOutcome", "SessionPolicyRecord", "SessionRecord", "Store", "TurnSecretRecord",
    "api_key_cursor", "month_of", "parse_api_key_cursor",
)
