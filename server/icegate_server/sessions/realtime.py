"""Realtime sessions: a provider token plus ICE servers, under quota and concurrency leases.

Order of work in `create`, chosen so that nothing is consumed by a request that was bound to
fail: validate the options (no network), read the project's session policy for the provider
and hold the options to it (`sessions.policy`: what it fixes is what the provider is sent),
issue the TURN credential (validates user and TTL), then, in one atomic store call, read the
sealed provider key and take a *pending* lease (none taken without a key), then open the
key and call the provider, and only when it answered confirm the session: the lease becomes
a full one and the month's count goes up by one.

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
import functools
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from icegate_server.clock import Clock, utc_datetime
from icegate_server.errors import (
    ConcurrentLimitError,
    InvalidFieldError,
    NotFoundError,
    QuotaExceededError,
    StoreUnavailableError,
    UpstreamError,
    UpstreamNotConfiguredError,
    UpstreamTimeoutError,
)
from icegate_server.observability.logs import Safe
from icegate_server.projects.records import Project
from icegate_server.projects.usage import next_month_start_ms
from icegate_server.sessions.policy import SessionPolicy, apply_policy
from icegate_server.sessions.provider_keys import ProviderKeys, key_family, missing_key_error
from icegate_server.sessions.providers import (
    CallingProvider,
    CreatedCall,
    MintedToken,
    Provider,
    ProviderKind,
    SessionOptions,
)
from icegate_server.sessions.providers.azure import AzureProvider
from icegate_server.sessions.providers.openai import OpenAIProvider
from icegate_server.sessions.providers.upstream_text import sdp_lines_fit
from icegate_server.sessions.sideband import LockedSession, Sidebands
from icegate_server.store import Store
from icegate_server.store.base import SessionAdmission, SessionOutcome, SessionRecord, month_of
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
HANG_UP_SECONDS = 5.0
"""How long EndSession waits for the provider to hang a call up."""
REAP_INTERVAL_SECONDS = 1.0
REAP_BATCH = 100
"""Every second, the calls of up to 100 sessions whose lease is gone are hung up (one store
call when there are none)."""
GIVE_BACK_WAIT_SECONDS = 1.0
"""How long a failing call waits for its give-back before answering (the rest goes on in
the background)."""

SESSION_ID_PREFIX = "ses_"


def new_session_id() -> str:
    return SESSION_ID_PREFIX + secrets.token_urlsafe(16)


T = TypeVar("T")
Upstream = Callable[[str, SessionOptions, float], Awaitable[T]]
"""The provider call of a session start: (api key, options held to the policy, seconds
left) -> what the provider answered."""
OnStarted = Callable[[T, str, SessionOptions, "SessionPolicy | None", str], None]
"""Called once a session started: (provider answer, api key, options sent, policy, id)."""
CALLING_PROVIDERS = (OpenAIProvider, AzureProvider)
"""The adapters CreateCall takes (the GA calls API)."""
MAX_SDP_OFFER_CHARS = 32 * 1024


def check_sdp_offer(sdp_offer: str) -> None:
    """Refuses an offer that is not SDP before it goes anywhere."""
    if not sdp_lines_fit(sdp_offer, MAX_SDP_OFFER_CHARS):
        raise InvalidFieldError("sdp_offer", "must be an SDP offer: v=0 first, then type=value "
                                f"lines of printable ASCII, at most {MAX_SDP_OFFER_CHARS} "
                                "characters")


@dataclass(frozen=True)
class _Started(Generic[T]):
    session_id: str
    result: T
    ice_servers: list[IceServer]
    create_time: float
    lease_expires_at: float


@dataclass(frozen=True)
class CreatedCallSession:
    """What CreateCall answers."""

    session_id: str
    call: CreatedCall
    ice_servers: list[IceServer]
    create_time: float
    lease_expires_at: float


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
                 session_ids: Callable[[], str] = new_session_id,
                 sidebands: Sidebands | None = None) -> None:
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
        self._sidebands = sidebands or Sidebands()

    def _provider(self, kind: ProviderKind, options: SessionOptions) -> Provider:
        provider = self._providers.get(kind)
        if provider is None:
            raise UpstreamNotConfiguredError(f"provider {kind.value} is not enabled",
                                             provider=kind.value)
        provider.validate(options)
        return provider

    async def _hold_to_policy(self, project: Project, kind: ProviderKind, provider: Provider,
                              options: SessionOptions
                              ) -> tuple[SessionOptions, SessionPolicy | None]:
        """The options to send upstream under the project's policy for the provider, and the
        policy (None when it has none). One store read; nothing is taken.

        Raises:
            SessionPolicyError: An option the policy does not allow.
            InvalidFieldError: What the policy made of the options breaks a provider rule.
        """
        record = await self._store.get_session_policy(project.project_id, key_family(kind))
        policy = _parsed_policy(record.policy_json) if record is not None else None
        held = apply_policy(policy, options, kind,
                            provider_default_ttl=provider.default_token_ttl_seconds)
        if held is not options:
            provider.validate(held)
        return held, policy

    async def create(self, project: Project, kind: ProviderKind, options: SessionOptions, *,
                     user_id: str, turn_ttl: float | None,
                     timeout: float | None) -> CreatedSession:
        """Mints a token and leases a session slot, or raises why not (nothing consumed)."""
        provider = self._provider(kind, options)

        async def mint(api_key: str, held: SessionOptions, left: float) -> MintedToken:
            return await provider.mint(api_key, held, timeout=left)

        started = await self._start(project, kind, provider, options, user_id=user_id,
                                    turn_ttl=turn_ttl, timeout=timeout, upstream=mint)
        return CreatedSession(started.session_id, started.result, started.ice_servers,
                              started.create_time, started.lease_expires_at)

    async def create_call(self, project: Project, kind: ProviderKind, options: SessionOptions,
                          sdp_offer: str, *, user_id: str, turn_ttl: float | None,
                          timeout: float | None) -> CreatedCallSession:
        """Starts a provider call for the browser's offer under a session slot, or raises
        why not (nothing consumed)."""
        check_sdp_offer(sdp_offer)
        provider = self._provider(kind, options)
        calling = self._calling(kind, provider)

        async def call(api_key: str, held: SessionOptions, left: float) -> CreatedCall:
            return await calling.create_call(api_key, held, sdp_offer, timeout=left)

        started = await self._start(project, kind, provider, options, user_id=user_id,
                                    turn_ttl=turn_ttl, timeout=timeout, upstream=call,
                                    call_id_of=lambda created: created.call_id,
                                    on_started=self._enforcer(project, provider))
        return CreatedCallSession(started.session_id, started.result, started.ice_servers,
                                  started.create_time, started.lease_expires_at)

    async def accept_incoming_call(self, project: Project, call_id: str, *,
                                   timeout: float | None) -> CreatedCallSession:
        """Accepts an OpenAI call that rang icegate's webhook (`sessions.incoming_calls`) with
        the project's policy session, under a session slot and a quota unit as CreateSession
        takes them; the call is hung up when its session ends. Raises why not, nothing kept:
        `ConcurrentLimitError`, `QuotaExceededError` (the caller rejects the call then).
        """
        kind = ProviderKind.OPENAI
        provider = self._provider(kind, SessionOptions())
        if not isinstance(provider, OpenAIProvider):
            raise UpstreamNotConfiguredError("provider openai is not enabled",
                                             provider=kind.value)
        openai = provider

        async def accept(api_key: str, held: SessionOptions, left: float) -> CreatedCall:
            return await openai.accept_call(api_key, call_id, held, timeout=left)

        started = await self._start(project, kind, provider, SessionOptions(), user_id="",
                                    turn_ttl=None, timeout=timeout, upstream=accept,
                                    call_id_of=lambda created: created.call_id,
                                    on_started=self._enforcer(project, provider))
        return CreatedCallSession(started.session_id, started.result, started.ice_servers,
                                  started.create_time, started.lease_expires_at)

    def _enforcer(self, project: Project, provider: Provider) -> OnStarted[CreatedCall]:
        """What opens a started call's sideband when its policy enforces (OpenAI only)."""

        def enforce(created: CreatedCall, api_key: str, held: SessionOptions,
                    policy: SessionPolicy | None, session_id: str) -> None:
            if policy is None or not policy.enforcement or not created.call_id or \
                    not isinstance(provider, OpenAIProvider):
                return
            locked = locked_session(policy, held)
            if locked.empty:
                return
            url, headers = provider.sideband(api_key, created.call_id)

            async def hang_up() -> None:
                await self._end_by_policy(project.project_id, session_id)

            self._sidebands.watch(session_id, created.call_id, url, headers, locked,
                                  restore=policy.enforcement == "restore", hang_up=hang_up)

        return enforce

    @staticmethod
    def _calling(kind: ProviderKind, provider: Provider) -> CallingProvider:
        if not isinstance(provider, CALLING_PROVIDERS):
            raise InvalidFieldError("provider", "CreateCall takes PROVIDER_OPENAI or "
                                    "PROVIDER_AZURE (the GA calls API)")
        return provider

    async def _start(self, project: Project, kind: ProviderKind, provider: Provider,
                     options: SessionOptions, *, user_id: str, turn_ttl: float | None,
                     timeout: float | None, upstream: Upstream[T],
                     call_id_of: Callable[[T], str] | None = None,
                     on_started: OnStarted[T] | None = None) -> _Started[T]:
        """What CreateSession and CreateCall share: policy, TURN credential, pending lease,
        the provider call `upstream`, confirmation; everything given back on failure."""
        # `timeout` was measured when the call arrived: every step counts against it, the
        # policy read included (a session confirmed past the caller's deadline is one the
        # caller never gets).
        started = self._clock.monotonic()
        options, policy = await self._hold_to_policy(project, kind, provider, options)
        session_id = self._session_ids()
        credential = self._issuer.issue_for(project, user_id or session_id, turn_ttl,
                                            ttl_field="turn_ttl")
        bound = self._upstream_seconds if timeout is None else min(timeout,
                                                                   self._upstream_seconds)
        now_ms = int(self._clock.now() * 1000)
        month = month_of(now_ms)
        ends_ms = 0
        if policy is not None and policy.max_session_duration_seconds:
            ends_ms = now_ms + policy.max_session_duration_seconds * 1000
            if call_id_of is None:
                # Kept before the session begins (a record takes no unit and no slot), so
                # that no keep-alive of the session can ever miss it.
                await self._store.put_session_record(
                    SessionRecord(project.project_id, session_id, kind.value, ends_ms), now_ms)
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
            result = await upstream(api_key, options,
                                    bound - (self._clock.monotonic() - started))
            if call_id_of is not None:
                # What ending the session needs to hang the call up, kept before the session
                # is confirmed (a lease nothing could hang up must not be handed out).
                await self._store.put_session_record(SessionRecord(
                    project.project_id, session_id, kind.value, ends_ms,
                    call_id=call_id_of(result)), now_ms)
            confirmed_ms = int(self._clock.now() * 1000)
            lease_ms = self._lease_ms if not ends_ms else min(self._lease_ms,
                                                               ends_ms - confirmed_ms)
            confirming = asyncio.ensure_future(self._store.confirm_session(
                project_id=project.project_id, session_id=session_id, month=month,
                now_ms=confirmed_ms, lease_ms=lease_ms))
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
        if on_started is not None:
            on_started(result, api_key, options, policy, session_id)
        return _Started(session_id, result, build_ice_servers(self._stun_uris, credential),
                        now_ms / 1000, (confirmed_ms + lease_ms) / 1000)

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
        """Stops the sidebands; lets give-backs in flight finish (up to
        `GIVE_BACK_WAIT_SECONDS`), then stops the rest: what they held frees itself when its
        lease or pending life ends."""
        await self._sidebands.close()
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
        started = self._clock.monotonic()
        options, _ = await self._hold_to_policy(project, kind, provider, options)
        api_key = await self._keys.open(project.project_id, kind)
        left = None if timeout is None else timeout - (self._clock.monotonic() - started)
        return await provider.mint(api_key, options, timeout=left)

    async def keep_alive(self, project: Project, session_id: str) -> float:
        """Renews a live session's lease; returns its new expiry (Unix seconds)."""
        _check_session_id(session_id)
        now_ms = int(self._clock.now() * 1000)
        lease_ms = self._lease_ms
        record = await self._store.get_session_record(project.project_id, session_id)
        if record is not None and record.ends_ms:
            if record.ends_ms <= now_ms:
                # Its lease expired then at the latest (it was never renewed past it).
                raise NotFoundError(f"session {session_id!r} reached the longest duration "
                                    "its project's session policy allows")
            lease_ms = min(lease_ms, record.ends_ms - now_ms)
        if not await self._store.renew_session(project_id=project.project_id,
                                               session_id=session_id, now_ms=now_ms,
                                               lease_ms=lease_ms):
            raise NotFoundError(f"session {session_id!r} is not active (ended or expired)")
        return (now_ms + lease_ms) / 1000

    async def end(self, project: Project, session_id: str) -> None:
        """Ends a session, freeing its concurrency slot."""
        _check_session_id(session_id)
        if not await self._store.end_session(project_id=project.project_id,
                                             session_id=session_id,
                                             now_ms=int(self._clock.now() * 1000)):
            raise NotFoundError(f"session {session_id!r} is not active (ended or expired)")
        # Whoever takes the record hangs its call up: this call, or `reap_ended_calls` on
        # any replica, never both.
        record = await self._store.take_session_record(project.project_id, session_id)
        if record is not None and record.call_id:
            await self.hang_up(record)

    async def reap_ended_calls(self) -> int:
        """Hangs up the calls whose session's lease is gone (expired, at its policy's
        maximum duration, cancelled) without an EndSession; returns how many it took."""
        records = await self._store.take_ended_calls(int(self._clock.now() * 1000),
                                                     REAP_BATCH)
        for record in records:
            await self.hang_up(record)
        return len(records)

    async def run_reaper(self, interval: float = REAP_INTERVAL_SECONDS) -> None:
        """`reap_ended_calls` every `interval` seconds, until cancelled."""
        while True:
            try:
                await self.reap_ended_calls()
            except StoreUnavailableError:
                logger.warning("ended calls not reaped this round (store unavailable)")
            await asyncio.sleep(interval)

    async def _end_by_policy(self, project_id: str, session_id: str) -> None:
        """Ends a session whose browser broke its policy (enforcement `hang_up`): its lease,
        and its call (if no EndSession or reaper took it meanwhile)."""
        await self._store.end_session(project_id=project_id, session_id=session_id,
                                      now_ms=int(self._clock.now() * 1000))
        record = await self._store.take_session_record(project_id, session_id)
        if record is not None and record.call_id:
            await self.hang_up(record)

    async def hang_up(self, record: SessionRecord) -> None:
        """Hangs up the provider call of an ended session: a step of its own, beside the lease
        release (and the end of its TURN allocations), so a provider that is down does not
        keep the session's slot. A failure is logged (no key, no provider text) and left:
        the provider ends a call nobody speaks on by itself."""
        await self._sidebands.stop(record.session_id)
        kind = ProviderKind(record.provider)
        provider = self._providers.get(kind)
        if not isinstance(provider, CALLING_PROVIDERS):
            return
        try:
            api_key = await self._keys.open(record.project_id, kind)
            await provider.hang_up(api_key, record.call_id, timeout=HANG_UP_SECONDS)
        except (UpstreamError, StoreUnavailableError, ValueError) as error:
            status = error.upstream_status if isinstance(error, UpstreamError) else 0
            logger.warning("call %s of session %s (project %s) not hung up: %s (HTTP %d)",
                           Safe(record.call_id), Safe(record.session_id),
                           Safe(record.project_id), Safe(type(error).__name__), status)


def locked_session(policy: SessionPolicy, sent: SessionOptions) -> LockedSession:
    """What of the session `sent` the policy fixed, for its sideband to hold."""
    fixed_instructions = bool(policy.instructions or policy.instructions_template)
    return LockedSession(
        instructions=sent.instructions if fixed_instructions else None,
        tool_names=tuple(str(tool.get("name")) for tool in sent.tools) if policy.tools
        else None,
        tools=tuple(sent.tools) if policy.tools else (),
        voice=sent.voice if policy.allowed_voices and sent.voice else None)


@functools.lru_cache(maxsize=1024)
def _parsed_policy(text: str) -> SessionPolicy:
    # Cached by the record's text, as projects are: a changed policy is a new text.
    return SessionPolicy.from_json(text)


SESSION_ID_PATTERN = re.compile(r"ses_[A-Za-z0-9_-]{4,60}")
"""A session id, to `fullmatch`: `ses_` and URL-safe base64, 8-64 characters in all."""


def _check_session_id(session_id: str) -> None:
    if not SESSION_ID_PATTERN.fullmatch(session_id):
        raise InvalidFieldError("session_id", "must be a session id from CreateSession")
