"""Access control: a presented key and a method's policy -> the caller and project of a call.

Each call costs one store round trip (`Store.admit`), which authenticates the key (stored
keys by digest; static keys are recognised in memory first), authorises the project, and
applies the project's rate limit, atomically. Revocation is therefore seen by every replica
on the very next call.

Fail open: with `fail_open_rate_limit`, a call whose store is unreachable is let through,
uncounted, when the same key was admitted for the same project within the last
`FAIL_OPEN_MEMORY_SECONDS`. Only the rate limit opens: an unknown key is never let in, and
admin calls and session quotas still fail closed. The price is that a key revoked in the last
minute before the store went away keeps working until the store is back.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from icegate_server.access.keys import Caller, key_digest
from icegate_server.access.rate_limit import RateLimitPolicy, usage_at
from icegate_server.access.tls import ADMIN_IDENTITY
from icegate_server.clock import Clock, utc_datetime
from icegate_server.errors import (
    InvalidApiKeyError,
    NotFoundError,
    ProjectForbiddenError,
    RateLimitedError,
    StoreUnavailableError,
)
from icegate_server.projects.records import PROJECT_ID_PATTERN, Project, validate_project_id
from icegate_server.store import Store
from icegate_server.store.base import Admission, AdmitOutcome
from icegate_server.turn.limits import check_turn_limits

log = logging.getLogger(__name__)

FAIL_OPEN_MEMORY_SECONDS = 60.0
_FAIL_OPEN_MEMORY_SIZE = 10_000


class MethodPolicy(enum.Enum):
    """What a method requires of its caller."""

    ADMIN = "admin"
    """Admin keys only; no project, no rate limit."""
    PROJECT = "project"
    """A key for the named project; counts against its rate limit."""
    PROJECT_UNCOUNTED = "project_uncounted"
    """A key for the named project; does not count (usage reports)."""


class CallContext(NamedTuple):
    """Who is calling, and the project the call acts on (None for admin calls)."""

    caller: Caller
    project: Project | None


class AccessControl:
    """Admits calls: authentication, project authorisation and the rate limit."""

    def __init__(self, store: Store, clock: Clock, static_keys: Sequence[str], *,
                 fail_open_rate_limit: bool = False,
                 identity_projects: Mapping[str, str] | None = None) -> None:
        self._store = store
        self._clock = clock
        self._static: dict[bytes, Caller] = {
            key_digest(key): Caller(key_id=f"static-{index}", is_admin=True)
            for index, key in enumerate(static_keys)
        }
        self._fail_open = fail_open_rate_limit
        # Remembered admissions for fail-open, by (key digest, project). Certificate callers
        # are remembered under their identity, a str, which never equals a digest.
        self._last_admitted: OrderedDict[tuple[bytes | str, str], tuple[CallContext, float]] = \
            OrderedDict()
        self._identity_projects = dict(identity_projects or {})
        # Like static keys ("static-<n>"), a certificate caller's key id is its entry's
        # position in ICEGATE_TLS_CLIENT_PROJECTS: a plain id that logs may show.
        self._identity_key_ids = {identity: f"tls-{index}"
                                  for index, identity in enumerate(self._identity_projects)}

    @property
    def admits_identities(self) -> bool:
        """Whether any certificate identity may stand for a caller key."""
        return bool(self._identity_projects)

    async def admit(self, key: str, policy: MethodPolicy, project_id: str, *,
                    turn_subject: str | None = None, may_linger: bool = False) -> CallContext:
        """Admits one call, or raises the domain error that says why not.

        `turn_subject` is given for a call that issues TURN credentials: the user (or
        session) id they are for; the project's TURN limits and the subject's revocation
        are then checked in the same store round trip (`turn.limits`). `may_linger`: see
        `Store.admit`.

        Raises:
            InvalidApiKeyError: Unknown or revoked key.
            ProjectForbiddenError: The key may not act on the project, or is not an admin key
                for an admin method.
            NotFoundError: The project does not exist.
            RateLimitedError: The project used its requests for now.
            TurnCredentialsRevokedError, TurnAllocationLimitError,
                TurnByteQuotaExceededError: A TURN call over the project's TURN limits.
            StoreUnavailableError: The store cannot be reached (and fail-open did not apply).
            InvalidFieldError: `project_id` cannot be a project id (checked first: it is
                never looked up, nor echoed back in full).
        """
        if project_id and not PROJECT_ID_PATTERN.fullmatch(project_id):
            validate_project_id(project_id)
        digest = key_digest(key)
        static_caller = self._static.get(digest)
        if policy is MethodPolicy.ADMIN:
            if static_caller is not None:
                return CallContext(static_caller, None)
            found = await self._store.admit(digest=digest, project_id="",
                                            now_ms=self._now_ms(), count=False)
            caller = self._caller_of(found)
            if not caller.is_admin:
                raise ProjectForbiddenError("this call needs an admin key")
            return CallContext(caller, None)

        admission = await self._admit_in_store(
            None if static_caller is not None else digest, project_id, policy,
            remembered_as=digest, turn_subject=turn_subject, may_linger=may_linger)
        if isinstance(admission, CallContext):
            return admission
        caller = static_caller or self._caller_of(admission)
        context = self._decide(admission, caller, project_id, turn_subject)
        if self._fail_open:
            self._remember(digest, project_id, context)
        return context

    async def admit_identity(self, identities: Sequence[str], policy: MethodPolicy,
                             project_id: str, *, turn_subject: str | None = None,
                             may_linger: bool = False) -> CallContext:
        """Admits a call that has no key by its verified client certificate's typed names.

        `identities` are `<type>:<name>` as `tls.peer_identities` gives them. The names found
        in `identity_projects` bind the caller to their project (or make it an admin, for
        `*`); the call is then admitted as a key for that project would be, in the same
        single store round trip. Names that map to different projects (say `uri:` to one
        and `dns:` to another, or to a project and `*`) are refused rather than resolved by
        order: the operator must say which one the certificate is.

        Raises:
            InvalidApiKeyError: No name is mapped, or they map to different projects.
            ProjectForbiddenError: The call names another project than the bound one, or
                needs an admin.
            NotFoundError, RateLimitedError, StoreUnavailableError, InvalidFieldError: As
                `admit`.
        """
        if project_id and not PROJECT_ID_PATTERN.fullmatch(project_id):
            validate_project_id(project_id)
        mapped = {identity: self._identity_projects[identity] for identity in identities
                  if identity in self._identity_projects}
        if not mapped:
            shown = ", ".join(repr(identity)[:200] for identity in identities[:8])
            raise InvalidApiKeyError("no API key, and the client certificate "
                                     f"({shown or 'no name a mapping could use'}) is not "
                                     "mapped to a project")
        if len(set(mapped.values())) > 1:
            raise InvalidApiKeyError(
                "the client certificate's names map to different projects in "
                f"ICEGATE_TLS_CLIENT_PROJECTS ({', '.join(sorted(mapped))}); present a key")
        # The same caller (key id) whichever of its names the certificate lists first.
        identity = min(mapped, key=list(self._identity_projects).index)
        bound = mapped[identity]
        caller = Caller(key_id=self._identity_key_ids[identity], is_admin=bound == ADMIN_IDENTITY,
                        project_id="" if bound == ADMIN_IDENTITY else bound)
        if policy is MethodPolicy.ADMIN:
            if not caller.is_admin:
                raise ProjectForbiddenError("this call needs an admin key or certificate")
            return CallContext(caller, None)
        if not caller.is_admin and project_id not in ("", bound):
            raise ProjectForbiddenError(f"the client certificate {identity!r} may not act "
                                        f"on project {project_id!r}")
        # digest=None admits as an authenticated admin would: the project check is above.
        admission = await self._admit_in_store(None, project_id or caller.project_id, policy,
                                               remembered_as=identity, asked_for=project_id,
                                               turn_subject=turn_subject,
                                               may_linger=may_linger)
        if isinstance(admission, CallContext):
            return admission
        context = self._decide(admission, caller, project_id or caller.project_id,
                               turn_subject)
        if self._fail_open:
            self._remember(identity, project_id, context)
        return context

    async def _admit_in_store(self, digest: bytes | None, project_id: str,
                              policy: MethodPolicy, *, remembered_as: bytes | str,
                              asked_for: str | None = None, turn_subject: str | None = None,
                              may_linger: bool = False) -> Admission | CallContext:
        """`Store.admit`, or, when the store is unavailable and fail-open allows it, the call
        context remembered for `remembered_as` (a key digest or a certificate name)."""
        try:
            return await self._store.admit(digest=digest, project_id=project_id,
                                           now_ms=self._now_ms(),
                                           count=policy is MethodPolicy.PROJECT,
                                           turn_subject=turn_subject, may_linger=may_linger)
        except StoreUnavailableError:
            remembered = self._remembered(
                remembered_as, project_id if asked_for is None else asked_for)
            if remembered is None:
                raise
            log.warning("store unavailable: admitting a known caller uncounted (fail open)")
            return remembered

    def _now_ms(self) -> int:
        return int(self._clock.now() * 1000)

    @staticmethod
    def _caller_of(admission: Admission) -> Caller:
        key = admission.key
        if admission.outcome is AdmitOutcome.UNKNOWN_KEY or key is None:
            raise InvalidApiKeyError("unknown or revoked API key")
        return Caller(key_id=key.key_id, is_admin=key.admin, project_id=key.project_id)

    def _decide(self, admission: Admission, caller: Caller, project_id: str,
                turn_subject: str | None = None) -> CallContext:
        outcome = admission.outcome
        if outcome is AdmitOutcome.FORBIDDEN:
            raise ProjectForbiddenError("this key may not act on the named project")
        if outcome is AdmitOutcome.NO_PROJECT:
            raise NotFoundError(f"project {project_id or caller.project_id or 'default'!r} "
                                "does not exist")
        project = admission.project
        assert project is not None
        if outcome is AdmitOutcome.RATE_LIMITED:
            now_ms = self._now_ms()
            policy = RateLimitPolicy.of(project.rate_limit_requests,
                                        project.rate_limit_window_seconds)
            usage = usage_at(admission.tat_ms, now_ms, policy)
            raise RateLimitedError(
                limit=policy.limit, window_seconds=project.rate_limit_window_seconds,
                reset_at=utc_datetime((now_ms + usage.retry_after_ms) / 1000),
                retry_after_seconds=usage.retry_after_ms / 1000)
        if turn_subject is not None and admission.turn is not None:
            check_turn_limits(project, admission.turn, subject=turn_subject,
                              now_ms=self._now_ms())
        return CallContext(caller, project)

    def _remember(self, digest: bytes | str, project_id: str, context: CallContext) -> None:
        memory = self._last_admitted
        memory[(digest, project_id)] = (context, self._clock.monotonic())
        memory.move_to_end((digest, project_id))
        if len(memory) > _FAIL_OPEN_MEMORY_SIZE:
            memory.popitem(last=False)

    def _remembered(self, digest: bytes | str, project_id: str) -> CallContext | None:
        if not self._fail_open:
            return None
        entry = self._last_admitted.get((digest, project_id))
        if entry is None or self._clock.monotonic() - entry[1] > FAIL_OPEN_MEMORY_SECONDS:
            return None
        return entry[0]
