"""Realtime sessions: a provider token plus ICE servers, under quota and concurrency leases.

Order of work in `create`, chosen so that nothing is consumed by a request that was bound to
fail: validate the options (no network), issue the TURN credential (validates user and TTL),
then, in one atomic store call, read the sealed provider key and take a *pending* lease (none
taken without a key), then open the key and call the provider, and only when it answered
confirm the session: the lease becomes a full one and the month's count goes up by one.

Nothing is kept by a call that fails (docs/RELIABILITY.md, "Sessions: nothing kept by a call
that fails"). A pending lease lives as long as the provider call may take plus
`PENDING_MARGIN_SECONDS`, so whatever a crash or a lost store reply leaves behind frees its
slot by itself within that time, and it was never counted. Each store step that takes
something runs as a task the caller's cancellation does not reach: when the caller leaves
(its deadline, a cancellation) or the step's outcome is unknown (a store timeout), the
session is cancelled once the step has settled (`Store.cancel_session`, idempotent, gives
back exactly what is held), retried briefly in the background if the store does not answer.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from icegate_server.clock import Clock, utc_datetime
from icegate_server.errors import (
    ConcurrentLimitError,
    InvalidFieldError,
    NotFoundError,
    QuotaExceededError,
    StoreUnavailableError,
    UpstreamNotConfiguredError,
    UpstreamTimeoutError,
)
from icegate_server.observability.logs import Safe
from icegate_server.projects.records import Project
from icegate_server.projects.usage import next_month_start_ms
from icegate_server.sessions.provider_keys import ProviderKeys, key_family, missing_key_error
from icegate_server.sessions.providers import MintedToken, Provider, ProviderKind, SessionOptions
from icegate_server.store import Store
from icegate_server.store.base import SessionAdmission, SessionOutcome, month_of
from icegate_server.turn.credentials import TurnCredentialIssuer
from icegate_server.turn.ice_servers import IceServer, build_ice_servers

logger = logging.getLogger(__name__)

PENDING_MARGIN_SECONDS = 2.0
"""How much longer than the provider call a pending lease lives: room for the confirmation's
own store call (SQLite waits up to 1 s for a lock) and for a busy event loop."""
ANSWER_MARGIN_SECONDS = 0.02
"""A session confirmed with less than this left before the caller's deadline is given back:
its answer would reach the caller after the caller stopped waiting (a round trip at most)."""
GIVE_BACK_FIRST_RETRY_SECONDS = 0.5
GIVE_BACK_MAX_RETRY_SECONDS = 5.0
"""A give-back the store did not answer is tried again after 0.5 s, doubling up to 5 s, for as
long as what it gives back can still be held: a confirmed session (its reply lost) keeps its
unit and slot until a cancel reaches the store, however long the store is down."""
GIVE_BACK_WAIT_SECONDS = 1.0
"""How long a failing call waits for its give-back before answering (the rest goes on in
the background)."""

SESSION_ID_PREFIX = "ses_"


def new_session_id() -> str:
    return SESSION_ID_PREFIX + secrets.token_urlsafe(16)


@dataclass(frozen=True)
class CreatedSession:
    """What CreateSession answers."""

    session_id: str
    token: MintedToken
    ice_servers: list[IceServer]
    create_time: float
    lease_expires_at: float


class RealtimeSessions:
    """Creates, renews and ends realtime sessions for projects."""

    def __init__(self, store: Store, keys: ProviderKeys,
                 providers: Mapping[ProviderKind, Provider], issuer: TurnCredentialIssuer,
                 stun_uris: tuple[str, ...], clock: Clock, *, lease_seconds: int = 3600,
                 upstream_seconds: float = 35.0,
                 session_ids: Callable[[], str] = new_session_id) -> None:
        """
        Args:
            lease_seconds: The life of a session's lease, renewed by KeepAliveSession.
            upstream_seconds: The longest a provider call of CreateSession may take (it is
                also bounded by the caller's deadline); with `PENDING_MARGIN_SECONDS`, the
                life of a pending lease.
        """
        self._store = store
        self._keys = keys
        self._providers = providers
        self._issuer = issuer
        self._stun_uris = stun_uris
        self._clock = clock
        self._lease_ms = lease_seconds * 1000
        self._upstream_seconds = upstream_seconds
        self._session_ids = session_ids
        self._giving_back: set[asyncio.Task[None]] = set()

    def _provider(self, kind: ProviderKind, options: SessionOptions) -> Provider:
        provider = self._providers.get(kind)
        if provider is None:
            raise UpstreamNotConfiguredError(f"provider {kind.value} is not enabled",
                                             provider=kind.value)
        provider.validate(options)
        return provider

    async def create(self, project: Project, kind: ProviderKind, options: SessionOptions, *,
                     user_id: str, turn_ttl: float | None,
                     timeout: float | None) -> CreatedSession:
        """Mints a token and leases a session slot, or raises why not (nothing consumed)."""
        provider = self._provider(kind, options)
        session_id = self._session_ids()
        credential = self._issuer.issue_for(project, user_id or session_id, turn_ttl,
                                            ttl_field="turn_ttl")
        started = self._clock.monotonic()
        bound = self._upstream_seconds if timeout is None else min(timeout,
                                                                   self._upstream_seconds)
        now_ms = int(self._clock.now() * 1000)
        month = month_of(now_ms)
        beginning = asyncio.ensure_future(self._store.begin_session(
            project_id=project.project_id, session_id=session_id, month=month, now_ms=now_ms,
            pending_ms=int((bound + PENDING_MARGIN_SECONDS) * 1000),
            quota=project.monthly_session_quota,
            max_concurrent=project.max_concurrent_sessions, provider=key_family(kind),
            turn_username=credential.username))
        try:
            admission = await asyncio.shield(beginning)
        except BaseException:
            await self._give_back(project.project_id, session_id, month, after=beginning)
            raise
        self._refuse_unless_started(admission, project, kind, now_ms)

        assert admission.provider_key is not None  # STARTED carries the key
        confirming: asyncio.Future[bool] | None = None
        try:
            api_key = self._keys.open_record(admission.provider_key, kind)
            token = await provider.mint(api_key, options,
                                        timeout=bound - (self._clock.monotonic() - started))
            confirmed_ms = int(self._clock.now() * 1000)
            confirming = asyncio.ensure_future(self._store.confirm_session(
                project_id=project.project_id, session_id=session_id, month=month,
                now_ms=confirmed_ms, lease_ms=self._lease_ms))
            if not await asyncio.shield(confirming):
                raise StoreUnavailableError(
                    "the session start outlived its reservation before the provider answered; "
                    "retry")
            if timeout is not None and \
                    timeout - (self._clock.monotonic() - started) < ANSWER_MARGIN_SECONDS:
                raise UpstreamTimeoutError(
                    "the session could not start within the caller's deadline",
                    provider=kind.value)
        except BaseException:
            await self._give_back(project.project_id, session_id, month, after=confirming)
            raise
        return CreatedSession(
            session_id=session_id,
            token=token,
            ice_servers=build_ice_servers(self._stun_uris, credential),
            create_time=now_ms / 1000,
            lease_expires_at=(confirmed_ms + self._lease_ms) / 1000,
        )

    @staticmethod
    def _refuse_unless_started(admission: SessionAdmission, project: Project,
                               kind: ProviderKind, now_ms: int) -> None:
        """Raises the refusal of a session start that took nothing."""
        if admission.outcome is SessionOutcome.NO_PROVIDER_KEY:
            raise missing_key_error(project.project_id, kind)
        if admission.outcome is SessionOutcome.CONCURRENT_LIMIT:
            raise ConcurrentLimitError(current=admission.active_sessions,
                                       maximum=project.max_concurrent_sessions)
        if admission.outcome is SessionOutcome.QUOTA_EXCEEDED:
            raise QuotaExceededError(
                plan=project.plan, included=project.monthly_session_quota,
                used=admission.sessions_this_month, upgrade_url=project.upgrade_url,
                resets_at=utc_datetime(next_month_start_ms(now_ms) / 1000))

    async def _give_back(self, project_id: str, session_id: str, month: str, *,
                         after: asyncio.Future[object] | asyncio.Future[bool] |
                         asyncio.Future[SessionAdmission] | None) -> None:
        """Cancels a session whose caller will not get it, once the store step `after` (still
        running when the caller left, or of unknown outcome) has settled.

        Waits up to `GIVE_BACK_WAIT_SECONDS`, so that a failure answered to a caller normally
        comes with its slot already free; the give-back itself is never cancelled with the
        caller, and goes on in the background when the store is slow.
        """
        task = asyncio.ensure_future(self._cancel_when_settled(project_id, session_id, month,
                                                               after))
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)
        await asyncio.wait({task}, timeout=GIVE_BACK_WAIT_SECONDS)

    async def close(self) -> None:
        """Lets give-backs in flight finish (up to `GIVE_BACK_WAIT_SECONDS`), then stops the
        rest: what they held frees itself when its lease or pending life ends."""
        if self._giving_back:
            await asyncio.wait(set(self._giving_back), timeout=GIVE_BACK_WAIT_SECONDS)
        for task in list(self._giving_back):
            task.cancel()
        await asyncio.gather(*self._giving_back, return_exceptions=True)

    async def _cancel_when_settled(self, project_id: str, session_id: str, month: str,
                                   step: asyncio.Future[object] | asyncio.Future[bool] |
                                   asyncio.Future[SessionAdmission] | None) -> None:
        if step is not None:
            # Settled, its outcome is fixed: SQLite committed or rolled back; a Redis script
            # answered, or timed out and can no longer start (the fence in store/redis.py).
            await asyncio.wait({step})
        # Past the lease's life a confirmed session's lease is gone from the store, and with
        # it what a cancel could find; until then, keep trying.
        loop = asyncio.get_running_loop()  # the clock asyncio.sleep keeps
        give_up_at = loop.time() + self._lease_ms / 1000
        delay = GIVE_BACK_FIRST_RETRY_SECONDS
        while True:
            try:
                await self._store.cancel_session(project_id=project_id, session_id=session_id,
                                                 month=month)
                return
            except StoreUnavailableError:
                if loop.time() + delay > give_up_at:
                    break
            await asyncio.sleep(delay)
            delay = min(delay * 2, GIVE_BACK_MAX_RETRY_SECONDS)
        logger.warning("session %s of project %s not given back (store unavailable for the "
                       "lease's whole life)", Safe(session_id), Safe(project_id))

    async def mint(self, project: Project, kind: ProviderKind, options: SessionOptions, *,
                   timeout: float | None) -> MintedToken:
        """A provider token alone: no quota unit, no lease."""
        provider = self._provider(kind, options)
        api_key = await self._keys.open(project.project_id, kind)
        return await provider.mint(api_key, options, timeout=timeout)

    async def keep_alive(self, project: Project, session_id: str) -> float:
        """Renews a live session's lease; returns its new expiry (Unix seconds)."""
        _check_session_id(session_id)
        now_ms = int(self._clock.now() * 1000)
        if not await self._store.renew_session(project_id=project.project_id,
                                               session_id=session_id, now_ms=now_ms,
                                               lease_ms=self._lease_ms):
            raise NotFoundError(f"session {session_id!r} is not active (ended or expired)")
        return (now_ms + self._lease_ms) / 1000

    async def end(self, project: Project, session_id: str) -> None:
        """Ends a session, freeing its concurrency slot."""
        _check_session_id(session_id)
        if not await self._store.end_session(project_id=project.project_id,
                                             session_id=session_id,
                                             now_ms=int(self._clock.now() * 1000)):
            raise NotFoundError(f"session {session_id!r} is not active (ended or expired)")


SESSION_ID_PATTERN = re.compile(r"ses_[A-Za-z0-9_-]{4,60}")
"""A session id, to `fullmatch`: `ses_` and URL-safe base64, 8-64 characters in all."""


def _check_session_id(session_id: str) -> None:
    if not SESSION_ID_PATTERN.fullmatch(session_id):
        raise InvalidFieldError("session_id", "must be a session id from CreateSession")
