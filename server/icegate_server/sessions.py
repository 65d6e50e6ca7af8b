"""Realtime sessions: a provider token plus ICE servers, under quota and concurrency leases.

Order of work in `create`, chosen so that nothing is consumed by a request that was bound to
fail: validate the options (no network), issue the TURN credential (validates user and TTL),
then, in one atomic store call, read the sealed provider key and take the quota unit and the
lease (none taken without a key), and only then open the key and call the provider. A key
that does not open, or a failed or abandoned provider call, gives the unit and the lease
back (`Store.cancel_session`), shielded from the caller's cancellation.
"""

from __future__ import annotations

import asyncio
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
    UpstreamNotConfiguredError,
)
from icegate_server.ice_servers import IceServer, build_ice_servers
from icegate_server.projects import Project
from icegate_server.provider_keys import ProviderKeys, key_family, missing_key_error
from icegate_server.providers import MintedToken, Provider, ProviderKind, SessionOptions
from icegate_server.store import Store
from icegate_server.store.base import SessionOutcome, month_of
from icegate_server.turn import TurnCredentialIssuer
from icegate_server.usage import next_month_start_ms

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
                 session_ids: Callable[[], str] = new_session_id) -> None:
        self._store = store
        self._keys = keys
        self._providers = providers
        self._issuer = issuer
        self._stun_uris = stun_uris
        self._clock = clock
        self._lease_ms = lease_seconds * 1000
        self._session_ids = session_ids

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
        now_ms = int(self._clock.now() * 1000)
        month = month_of(now_ms)
        admission = await self._store.begin_session(
            project_id=project.project_id, session_id=session_id, month=month, now_ms=now_ms,
            lease_ms=self._lease_ms, quota=project.monthly_session_quota,
            max_concurrent=project.max_concurrent_sessions, provider=key_family(kind))
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

        assert admission.provider_key is not None  # STARTED carries the key
        try:
            api_key = self._keys.open_record(admission.provider_key, kind)
            token = await provider.mint(api_key, options, timeout=timeout)
        except BaseException:
            # Give back what this attempt took, even when the caller went away (cancelled).
            await asyncio.shield(self._store.cancel_session(
                project_id=project.project_id, session_id=session_id, month=month))
            raise
        return CreatedSession(
            session_id=session_id,
            token=token,
            ice_servers=build_ice_servers(self._stun_uris, credential),
            create_time=now_ms / 1000,
            lease_expires_at=(now_ms + self._lease_ms) / 1000,
        )

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
