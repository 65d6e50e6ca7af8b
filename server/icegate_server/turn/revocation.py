"""Ending what TURN credentials opened: revoking a user's or a session's credentials, and
ending a realtime session's allocations when the session ends.

TURN REST credentials are signed, not stored: one issued cannot be unsigned, and coturn
checks a credential's expiry only when an allocation starts. So revoking a subject (the user
id, or the session id, a credential was issued for) does two things:

- it refuses new credentials for the subject (`Store.revoke_turn_subject`, checked by every
  replica's admission in its one round trip, `turn.limits`) until every credential issued
  before can have expired: `ICEGATE_TURN_TTL_MAX` from now, the longest any project may ask
  for;
- it ends the subject's allocations live on coturn now, through coturn's admin CLI (`cs` on
  each session `psp` lists for it).

A credential issued before and not yet used can still open an allocation until it expires:
where coturn's stats stream is metered, such an allocation is ended as soon as coturn reports
it (`turn.coturn_stats` calls `end_username`), a second or so; without metering, until the
credential expires (keep TTLs short), and revoking again ends it.

A realtime session's credential carries its user id (or its own id when it has none), and
the store keeps that username with the session (`Store.begin_session`). When the session is
ended (EndSession) or its lease expires, `SessionTurnSweeper` takes it from the store and ends
the allocations of exactly that username.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from icegate_server.clock import Clock
from icegate_server.errors import (
    CoturnCliNotConfiguredError,
    CoturnCliUnavailableError,
    InvalidFieldError,
    NotFoundError,
    StoreUnavailableError,
)
from icegate_server.observability.logs import Safe
from icegate_server.projects.records import validate_project_id
from icegate_server.sessions.realtime import SESSION_ID_PATTERN
from icegate_server.store import Store
from icegate_server.turn.coturn_cli import CoturnCli, CoturnCliError
from icegate_server.turn.coturn_events import parse_turn_username
from icegate_server.turn.credentials import PROJECT_SEPARATOR, SEPARATOR, validate_user_id

log = logging.getLogger(__name__)

SWEEP_SECONDS = 1.0
"""How often ended sessions' allocations are looked for."""
SWEEP_BATCH = 100


@dataclass(frozen=True)
class Revocation:
    """What `TurnRevocation.revoke` did."""

    allocations_ended: int
    revoked_until_ms: int


class TurnRevocation:
    """Revokes TURN subjects and ends allocations through coturn's CLI.

    Args:
        cli: coturn's admin CLI, None when `ICEGATE_COTURN_CLI` is unset (ending allocations
            then fails with `CoturnCliNotConfiguredError`).
        max_ttl_seconds: The longest TURN credential any project may be issued
            (`ICEGATE_TURN_TTL_MAX`): how long a revocation refuses new credentials.
    """

    def __init__(self, store: Store, clock: Clock, cli: CoturnCli | None, *,
                 max_ttl_seconds: int) -> None:
        self._store = store
        self._clock = clock
        self._cli = cli
        self._max_ttl_ms = max_ttl_seconds * 1000

    @property
    def can_end(self) -> bool:
        """Whether allocations can be ended (coturn's CLI is configured)."""
        return self._cli is not None

    async def revoke(self, project_id: str, *, user_id: str = "",
                     session_id: str = "") -> Revocation:
        """Revokes one user's (or one session's) TURN credentials in a project.

        Raises:
            InvalidFieldError: Not exactly one of `user_id` and `session_id`, or a malformed
                one.
            NotFoundError: No such project.
            CoturnCliNotConfiguredError, CoturnCliUnavailableError: Allocations could not be
                ended (the revocation is stored all the same).
            StoreUnavailableError: The store cannot be reached (nothing was revoked).
        """
        subject = await self._subject(project_id, user_id, session_id)
        now_ms = int(self._clock.now() * 1000)
        revoked_until = await self._store.revoke_turn_subject(
            project_id=project_id, subject=subject, until_ms=now_ms + self._max_ttl_ms,
            now_ms=now_ms)
        # A session's own credential may carry its user id instead: end that username too.
        exact = None
        if session_id:
            exact = await self._store.session_turn_username(project_id=project_id,
                                                            session_id=session_id)

        def matches(username: str) -> bool:
            parsed = parse_turn_username(username)
            return username == exact or (parsed is not None and parsed.project_id == project_id
                                         and parsed.user_id == subject)

        ended = await self.end_allocations(project_id, matches)
        log.info("TURN credentials of a %s of project %s revoked: %d allocation(s) ended",
                 Safe("user" if user_id else "session"), Safe(project_id), ended)
        return Revocation(ended, revoked_until)

    async def restore(self, project_id: str, *, user_id: str = "",
                      session_id: str = "") -> bool:
        """Lifts a user's (or session's) revocation; whether one was in force.

        Raises:
            InvalidFieldError, NotFoundError, StoreUnavailableError: As `revoke`.
        """
        subject = await self._subject(project_id, user_id, session_id)
        return await self._store.lift_turn_subject(
            project_id=project_id, subject=subject, now_ms=int(self._clock.now() * 1000))

    async def _subject(self, project_id: str, user_id: str, session_id: str) -> str:
        """The subject a request names, checked, in a project that exists."""
        validate_project_id(project_id)
        if bool(user_id) == bool(session_id):
            raise InvalidFieldError("user_id", "name exactly one of user_id and session_id")
        if user_id:
            validate_user_id(user_id)
        elif not SESSION_ID_PATTERN.fullmatch(session_id):
            raise InvalidFieldError("session_id", "must be a session id from CreateSession")
        if await self._store.get_project(project_id) is None:
            raise NotFoundError(f"project {project_id!r} does not exist")
        return user_id or session_id

    async def end_username(self, project_id: str, username: str) -> int:
        """Ends the allocations of exactly `username` (a credential of a revoked subject that
        was used after the revocation)."""
        ended = await self.end_allocations(project_id, username.__eq__)
        if ended:
            log.info("%d allocation(s) of a revoked TURN credential of project %s ended",
                     ended, Safe(project_id))
        return ended

    async def end_allocations(self, project_id: str, matches: Callable[[str], bool]) -> int:
        """Ends the project's allocations whose username `matches`; how many coturn ended.

        Raises:
            CoturnCliNotConfiguredError, CoturnCliUnavailableError: As `revoke`.
        """
        if self._cli is None:
            raise CoturnCliNotConfiguredError(
                "coturn's admin CLI is not configured (ICEGATE_COTURN_CLI): allocations "
                "cannot be ended; new credentials are refused all the same")
        try:
            return await self._cli.end_sessions(
                matches, contains=f"{SEPARATOR}{project_id}{PROJECT_SEPARATOR}")
        except CoturnCliError as error:
            raise CoturnCliUnavailableError(f"{error}; new credentials are refused all the "
                                            "same") from None


class SessionTurnSweeper:
    """Ends the TURN allocations of realtime sessions that ended or whose lease expired.

    Every replica runs one; each session is taken from the store by one of them
    (`Store.take_ended_session_turn`), so the store keeps no ended session. Without coturn's
    CLI nothing can be ended and sessions are only taken. A session whose allocations could
    not be ended (coturn's CLI down) is logged, not retried: its credential expires by itself.
    """

    def __init__(self, store: Store, clock: Clock, revocation: TurnRevocation, *,
                 interval: float = SWEEP_SECONDS) -> None:
        self._store = store
        self._clock = clock
        self._revocation = revocation
        self.interval = interval

    async def sweep(self) -> int:
        """Ends the allocations of the sessions due now; returns how many ended."""
        taken = await self._store.take_ended_session_turn(
            now_ms=int(self._clock.now() * 1000), limit=SWEEP_BATCH)
        ended = 0
        if not self._revocation.can_end:
            return 0
        for project_id, session_id, username in taken:
            try:
                ended += await self._revocation.end_allocations(project_id,
                                                                username.__eq__)
            except (CoturnCliUnavailableError, CoturnCliNotConfiguredError) as error:
                log.warning("allocations of session %s of project %s not ended: %s",
                            Safe(session_id), Safe(project_id), Safe(error.message))
        return ended

    async def run(self) -> None:
        """Sweeps until cancelled."""
        while True:
            try:
                await self.sweep()
            except StoreUnavailableError:
                log.warning("ended sessions' TURN allocations: store unavailable; retrying")
            await asyncio.sleep(self.interval)
