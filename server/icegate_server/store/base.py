"""The store interface every backend implements and one contract test suite drives.

Times are integer Unix milliseconds passed in by the caller (the clock is injected, so tests
freeze it on every backend). Every counter update is atomic inside the backend (one SQLite
transaction, one Redis Lua script), never read-modify-write in Python. A backend that cannot
be reached raises `StoreUnavailableError`; every other failure is one of the outcomes below.
"""

from __future__ import annotations

import enum
import functools
import math
import re
import struct
import time
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


class TurnAdmission(NamedTuple):
    """What an admission that issues TURN credentials read of the project's TURN state."""

    live_allocations: int
    """The project's live allocations (as metered from coturn)."""
    relayed_bytes: int
    """The bytes the project relayed in the month of the call."""
    revoked_until_ms: int
    """Until when the TURN subject named is revoked (0: it is not)."""


class Admission(NamedTuple):
    """The answer of `Store.admit`: who called, for which project, and the rate position."""

    outcome: AdmitOutcome
    key: ApiKey | None = None
    """The key record for a stored key (None for static keys, and for UNKNOWN_KEY)."""
    project: Project | None = None
    """The project acted on (set for ADMITTED and RATE_LIMITED)."""
    tat_ms: int | None = None
    """The project's GCRA theoretical arrival time after this call (see `access.rate_limit`)."""
    turn: TurnAdmission | None = None
    """The project's TURN state, for an ADMITTED call that named a `turn_subject`."""


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


class TurnEventKind(enum.Enum):
    """What an allocation event tells the store (see `Store.record_turn_events`)."""

    STARTED = "started"
    """A new allocation (coturn's `new`): live, nothing relayed yet."""
    ALIVE = "alive"
    """The allocation lives (refreshed, or found alive by a resynchronisation)."""
    RELAYED = "relayed"
    """`relayed_bytes` relayed since the previous report (coturn's relay-side `traffic`)."""
    ENDED = "ended"
    """The allocation is gone (coturn's `deleted`)."""
    RELAYED_TOTAL = "relayed_total"
    """`relayed_bytes` relayed over the allocation's whole life (coturn's relay-side
    `total_traffic`, sent once at deletion): what the reports did not bring is counted now."""


@dataclass(frozen=True)
class TurnAllocationEvent:
    """One allocation event attributed to a project and a user (or session) id."""

    kind: TurnEventKind
    allocation: str
    """The allocation's identity: coturn's id and the username (`coturn_events`)."""
    project_id: str
    user_id: str
    relayed_bytes: int = 0


@dataclass(frozen=True)
class TurnMeterState:
    """Who meters coturn's stats stream, and how the stream stands (see `turn.coturn_stats`).

    One replica at a time holds the meter lease (`owner`, until `lease_expires_ms`); it alone
    writes allocation events. `connected` says whether its subscription is up, since
    `changed_ms`; `last_event_ms` is when it last counted an event.
    """

    owner: str = ""
    lease_expires_ms: int = 0
    connected: bool = False
    changed_ms: int = 0
    last_event_ms: int = 0


class TurnProjectChange(NamedTuple):
    """What a batch of allocation events did to one project."""

    live_allocations: int
    """The project's live allocations after the batch."""
    relayed_bytes: int
    """The bytes the batch counted for the project."""


@dataclass(frozen=True)
class TurnUsageFigures:
    """A project's (or one of its users') TURN usage in one month, as metered from coturn."""

    live_allocations: int = 0
    relayed_bytes: int = 0
    last_activity_ms: int = 0


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
                    count: bool, turn_subject: str | None = None,
                    may_linger: bool = False) -> Admission:
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
            turn_subject: For a call that issues TURN credentials, the user (or session) id
                they are for ("" when not known yet): an ADMITTED answer then carries the
                project's TURN state (`TurnAdmission`: live allocations, the month's relayed
                bytes, and until when the subject is revoked), read in the same step. The
                caller decides what it allows; None reads nothing of it.
            may_linger: Whether the call may wait, while the server is busy, for others to
                go to the store with it (Redis: `ICEGATE_STORE_LINGER`, store/redis_admission.py).
                The gRPC transport's calls may: its stack answers calls that finish together
                for less. Connect's may not: a held call holds its connection's next request
                back, and the loop idles.

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
                            provider: str, turn_username: str = "") -> SessionAdmission:
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

        A session started with a `turn_username` (the TURN credential its ICE servers carry)
        keeps it until its allocations are due to end: when its lease expires or it is ended
        (`take_ended_session_turn`); `confirm_session` and `renew_session` move that time with
        the lease, `end_session` makes it now, `cancel_session` forgets it (the caller never
        got the credential). `session_turn_username` reads it meanwhile.
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

    # -- TURN usage, metered from coturn's stats stream (see `turn.coturn_stats`) ---------------

    async def claim_turn_meter(self, state: TurnMeterState, *, now_ms: int) -> TurnMeterState:
        """Takes or renews the meter lease for `state.owner` and records its stream state,
        unless another owner holds a lease still running at `now_ms`.

        Returns the state in force afterwards: `state` itself when the lease is ours, else
        the holder's (so every replica can tell how metering stands). An owner whose
        `lease_expires_ms` is 0 gives the lease up (if it holds it).
        """
        ...

    async def turn_meter_state(self) -> TurnMeterState:
        """The meter state last recorded (a lease past its expiry included)."""
        ...

    async def record_turn_events(self, events: Sequence[TurnAllocationEvent], *, owner: str,
                                 batch: int, now_ms: int, month: str
                                 ) -> dict[str, TurnProjectChange] | None:
        """Applies allocation events in order, atomically, if `owner` holds the meter lease at
        `now_ms`; None (nothing written) otherwise.

        `batch` numbers the owner's batches, increasing: a batch whose number is not above the
        last one applied for this lease holder changes nothing (and answers no change), so a
        batch retried after an unknown outcome (a store timeout) counts once.

        Per allocation it keeps whether it lives and the bytes counted for it; per project and
        per user id, the live allocations, and the bytes relayed and the last activity
        (`now_ms`) in `month`. Idempotent where coturn's text allows: STARTED, ALIVE and ENDED
        change nothing the second time, and RELAYED_TOTAL counts only what the allocation's RELAYED
        events did not (so a total seen twice, or after every report, adds nothing). RELAYED is
        a delta: the lease and the batch number are what make it count once. Events of a
        project that does not exist are dropped. Returns what the batch did to each project
        it touched.
        """
        ...

    async def sweep_turn_allocations(self, *, owner: str, seen_before_ms: int, now_ms: int,
                                     limit: int
                                     ) -> tuple[int, dict[str, TurnProjectChange]] | None:
        """Ends up to `limit` live allocations last seen (STARTED, ALIVE, RELAYED) before
        `seen_before_ms`, as ENDED would, if `owner` holds the meter lease; None otherwise.

        After a resynchronisation has marked every allocation coturn still lists as ALIVE,
        this ends the ones whose end the meter missed (coturn restarted, or the stream was
        down when they ended). An allocation ended by a sweep lives again if an ALIVE or
        RELAYED event of it comes later (its status key had been lost with a stats Redis that
        restarted empty), unlike one whose ENDED was recorded. Returns how many it ended
        (fewer than `limit`: none is left) and what it did to each project it touched.
        """
        ...

    async def revoke_turn_subject(self, *, project_id: str, subject: str, until_ms: int,
                                  now_ms: int) -> int:
        """Revokes a project's TURN subject (a user or session id) until `until_ms` (a later
        revocation in force is kept); returns the time it is revoked until. Admissions
        naming it carry that time (`TurnAdmission.revoked_until_ms`) on every replica."""
        ...

    async def revoked_turn_subjects(self, *, project_id: str, subjects: Sequence[str],
                                    now_ms: int) -> set[str]:
        """Which of a project's `subjects` are revoked at `now_ms`."""
        ...

    async def lift_turn_subject(self, *, project_id: str, subject: str, now_ms: int) -> bool:
        """Lifts a subject's revocation; whether one was in force at `now_ms`."""
        ...

    async def session_turn_username(self, *, project_id: str, session_id: str) -> str | None:
        """The TURN username a session's credential was issued for, while it is kept."""
        ...

    async def take_ended_session_turn(self, *, now_ms: int,
                                      limit: int) -> list[tuple[str, str, str]]:
        """Takes (removes, so one replica gets each) up to `limit` sessions whose TURN
        allocations are due to end at `now_ms`: (project id, session id, TURN username)."""
        ...

    async def turn_usage(self, *, project_id: str, month: str,
                         user_id: str | None = None) -> TurnUsageFigures:
        """A project's TURN figures for `month` (its live allocations are those of now), or
        one of its user ids' when `user_id` is given."""
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
    return _month_of_hour(now_ms // 3_600_000)


@functools.lru_cache(maxsize=64)
def _month_of_hour(hour: int) -> str:
    # Months begin on a UTC hour: the admission of every TURN call needs its month.
    return time.strftime("%Y-%m", time.gmtime(hour * 3600))


__all__: Sequence[str] = (
    "PURGE_BATCH", "Admission", "AdmitOutcome", "ProviderKeyRecord", "SessionAdmission",
    "SessionOutcome", "SessionPolicyRecord", "SessionRecord", "Store", "TurnAdmission",
    "TurnAllocationEvent", "TurnEventKind", "TurnMeterState", "TurnProjectChange",
    "TurnSecretRecord", "TurnUsageFigures",
    "api_key_cursor", "month_of", "parse_api_key_cursor",
)
