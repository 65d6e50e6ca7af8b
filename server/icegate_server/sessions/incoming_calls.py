"""Incoming calls: OpenAI's `realtime.call.incoming` webhook, accepted or rejected per project.

A SIP call to an OpenAI project rings its webhook; icegate takes the delivery on its own
listener (`ICEGATE_WEBHOOK_LISTEN`, `transports/webhook_listener.py`) and decides here:

1. The Standard Webhooks signature is checked with the `standardwebhooks` library against
   every project's webhook secret (`openai_webhook`, sealed beside the provider keys:
   `sessions.provider_keys`); the project whose secret signed it is the call's project. A
   delivery no secret signed, or whose `webhook-timestamp` is more than
   `TOLERANCE_SECONDS` off icegate's clock, is refused.
2. Its `webhook-id` is claimed once per project (`Store.claim_webhook_delivery`, kept past
   the timestamp window): a replay, by a sender's retry or by anyone who saw the request, is
   refused.
3. The call is accepted with the project's OpenAI session policy
   (`RealtimeSessions.accept_incoming_call`: a quota unit and a lease, as CreateSession
   takes them, given back on every failure; hung up when the session ends), or, when the
   project is over its monthly quota or its concurrent sessions, or its policy cannot make
   a session without a caller, rejected (`/reject`, SIP 486 Busy Here or 603 Decline).

Nothing of a delivery's body, nor any secret, reaches a log line: only the outcome, the
project, and the delivery and call ids once they `fullmatch` their patterns.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from icegate_server.clock import Clock
from icegate_server.errors import (
    ConcurrentLimitError,
    IcegateError,
    InvalidFieldError,
    QuotaExceededError,
    SessionPolicyError,
    StoreUnavailableError,
    UpstreamError,
    UpstreamNotConfiguredError,
)
from icegate_server.observability.logs import Safe
from icegate_server.sessions.provider_keys import WEBHOOK_SECRET_FAMILY, ProviderKeys
from icegate_server.sessions.providers import ProviderKind
from icegate_server.sessions.providers.openai import OpenAIProvider
from icegate_server.sessions.providers.upstream_text import UpstreamField
from icegate_server.sessions.realtime import RealtimeSessions
from icegate_server.sessions.vault import Vault, VaultError
from icegate_server.store import Store

logger = logging.getLogger(__name__)

EVENT_TYPE = "realtime.call.incoming"
TOLERANCE_SECONDS = 300
"""How far a delivery's `webhook-timestamp` may be from icegate's clock (Standard Webhooks'
5 minutes, which the library also applies)."""
REMEMBER_SECONDS = 2 * TOLERANCE_SECONDS + 60
"""How long a delivery id is remembered: past it, the delivery's timestamp is stale anyway."""
SIP_BUSY_HERE = 486
"""The rejection of a call over the project's quota or concurrent sessions."""
SIP_DECLINE = 603
"""The rejection of a call the project's policy cannot make a session for."""
REJECT_SECONDS = 5.0
"""How long a rejection may take at the provider."""
DELIVERY_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
TIMESTAMP_PATTERN = re.compile(r"[0-9]{1,12}")
SIGNATURE_PATTERN = re.compile(r"v1,[A-Za-z0-9+/=]{1,100}( v1,[A-Za-z0-9+/=]{1,100}){0,7}")
"""What the three Standard Webhooks headers may hold; anything else is refused unread."""
CALL_ID_PATTERN = re.compile(UpstreamField.CALL_ID.value or "")


class DeliveryOutcome(enum.Enum):
    """What became of one webhook delivery (the listener answers each with its status)."""

    ACCEPTED = "accepted"
    """The call was accepted with the project's session."""
    REJECTED = "rejected"
    """The call was rejected (over quota, over concurrency, no session by policy)."""
    IGNORED = "ignored"
    """Signed and new, but not a `realtime.call.incoming` event: acknowledged, nothing done."""
    UNSIGNED = "unsigned"
    """Headers missing or malformed, or no project's secret signed it."""
    STALE = "stale"
    """Its timestamp is more than `TOLERANCE_SECONDS` from icegate's clock."""
    REPLAYED = "replayed"
    """Its `webhook-id` was seen before for the project."""
    MALFORMED = "malformed"
    """Signed, but its body is not the event's JSON (no call id that fits)."""
    FAILED = "failed"
    """The call could be neither accepted nor rejected (store, key or provider trouble)."""


@dataclass(frozen=True)
class Delivery:
    """What `IncomingCalls.receive` decided, for the listener's answer."""

    outcome: DeliveryOutcome
    project_id: str = ""
    call_id: str = ""
    session_id: str = ""


@dataclass(frozen=True)
class _Verifier:
    sealed: bytes
    webhook: Webhook


class IncomingCalls:
    """Verifies `realtime.call.incoming` deliveries and accepts or rejects their calls."""

    def __init__(self, store: Store, vault: Vault, keys: ProviderKeys,
                 sessions: RealtimeSessions, providers: Mapping[ProviderKind, object],
                 clock: Clock) -> None:
        self._store = store
        self._vault = vault
        self._keys = keys
        self._sessions = sessions
        self._providers = providers
        self._clock = clock
        self._verifiers: dict[str, _Verifier] = {}
        """Opened secrets by project, each kept while its sealed bytes are unchanged."""

    async def receive(self, headers: Mapping[str, str], body: bytes) -> Delivery:
        """Decides one delivery: `headers` with lower-case names, `body` the raw bytes."""
        try:
            return await self._receive(headers, body)
        except StoreUnavailableError:
            return self._refused(DeliveryOutcome.FAILED, "", "",
                                 "store unavailable before the call was decided")

    async def _receive(self, headers: Mapping[str, str], body: bytes) -> Delivery:
        delivery_id = headers.get("webhook-id", "")
        timestamp = headers.get("webhook-timestamp", "")
        signature = headers.get("webhook-signature", "")
        if not (DELIVERY_ID_PATTERN.fullmatch(delivery_id) and
                TIMESTAMP_PATTERN.fullmatch(timestamp) and
                SIGNATURE_PATTERN.fullmatch(signature)):
            return self._refused(DeliveryOutcome.UNSIGNED, "", "",
                                 "webhook-id, webhook-timestamp or webhook-signature missing or "
                                 "malformed")
        if abs(self._clock.now() - int(timestamp)) > TOLERANCE_SECONDS:
            return self._refused(DeliveryOutcome.STALE, "", delivery_id,
                                 "timestamp more than 5 minutes off")
        signed = {"webhook-id": delivery_id, "webhook-timestamp": timestamp,
                  "webhook-signature": signature}
        project_id = await self._signer(signed, body)
        if project_id is None:
            return self._refused(DeliveryOutcome.UNSIGNED, "", delivery_id,
                                 "no project's webhook secret signed it")
        now_ms = int(self._clock.now() * 1000)
        if not await self._store.claim_webhook_delivery(
                project_id, delivery_id, now_ms=now_ms,
                until_ms=now_ms + REMEMBER_SECONDS * 1000):
            return self._refused(DeliveryOutcome.REPLAYED, project_id, delivery_id,
                                 "its webhook-id was seen before")
        event_type, call_id = _event(body)
        if event_type is None:
            return self._refused(DeliveryOutcome.MALFORMED, project_id, delivery_id,
                                 "body is not an event object")
        if event_type != EVENT_TYPE:
            logger.info("webhook delivery %s of project %s ignored: another event type",
                        Safe(delivery_id), Safe(project_id))
            return Delivery(DeliveryOutcome.IGNORED, project_id)
        if call_id is None:
            return self._refused(DeliveryOutcome.MALFORMED, project_id, delivery_id,
                                 "no data.call_id that fits")
        return await self._answer(project_id, delivery_id, call_id)

    async def _signer(self, signed: Mapping[str, str], body: bytes) -> str | None:
        """The project whose webhook secret signed `body`, None when none did."""
        records = [record for record in await self._store.list_provider_keys(None)
                   if record.provider == WEBHOOK_SECRET_FAMILY]
        self._verifiers = {project_id: verifier for project_id, verifier in
                           self._verifiers.items()
                           if any(r.project_id == project_id for r in records)}
        for record in records:
            verifier = self._verifiers.get(record.project_id)
            if verifier is None or verifier.sealed != record.sealed:
                try:
                    secret = self._vault.open(record.project_id, record.provider,
                                              record.sealed)
                    verifier = _Verifier(record.sealed, Webhook(secret))
                except (VaultError, ValueError):
                    logger.warning("the webhook secret of project %s cannot be opened with the "
                                   "configured master keys", Safe(record.project_id))
                    continue
                self._verifiers[record.project_id] = verifier
            try:
                verifier.webhook.verify(body, dict(signed), json_parse=False)
            except WebhookVerificationError:
                continue
            return record.project_id
        return None

    async def _answer(self, project_id: str, delivery_id: str, call_id: str) -> Delivery:
        """Accepts the call under a session, or rejects it; never raises."""
        try:
            project = await self._store.get_project(project_id)
            if project is None:
                return self._refused(DeliveryOutcome.FAILED, project_id, delivery_id,
                                     "its project is gone")
            started = await self._sessions.accept_incoming_call(project, call_id,
                                                                timeout=None)
        except (ConcurrentLimitError, QuotaExceededError) as error:
            return await self._reject(project_id, delivery_id, call_id, SIP_BUSY_HERE,
                                      type(error).__name__)
        except (SessionPolicyError, InvalidFieldError) as error:
            return await self._reject(project_id, delivery_id, call_id, SIP_DECLINE,
                                      type(error).__name__)
        except IcegateError as error:  # the store, the key, the provider
            status = error.upstream_status if isinstance(error, UpstreamError) else 0
            return self._refused(DeliveryOutcome.FAILED, project_id, delivery_id,
                                 f"call not accepted: {type(error).__name__} (HTTP {status})",
                                 call_id)
        logger.info("incoming call %s of project %s accepted as session %s",
                    Safe(call_id), Safe(project_id), Safe(started.session_id))
        return Delivery(DeliveryOutcome.ACCEPTED, project_id, call_id, started.session_id)

    async def _reject(self, project_id: str, delivery_id: str, call_id: str,
                      sip_status: int, why: str) -> Delivery:
        provider = self._providers.get(ProviderKind.OPENAI)
        try:
            if not isinstance(provider, OpenAIProvider):
                raise UpstreamNotConfiguredError("provider openai is not enabled",
                                                 provider=ProviderKind.OPENAI.value)
            api_key = await self._keys.open(project_id, ProviderKind.OPENAI)
            await provider.reject_call(api_key, call_id, sip_status=sip_status,
                                       timeout=REJECT_SECONDS)
        except (IcegateError, ValueError) as error:
            status = error.upstream_status if isinstance(error, UpstreamError) else 0
            return self._refused(DeliveryOutcome.FAILED, project_id, delivery_id,
                                 f"call not rejected ({why}): {type(error).__name__} "
                                 f"(HTTP {status})", call_id)
        logger.warning("incoming call %s of project %s rejected (SIP %d): %s", Safe(call_id),
                       Safe(project_id), sip_status, Safe(why))
        return Delivery(DeliveryOutcome.REJECTED, project_id, call_id)

    @staticmethod
    def _refused(outcome: DeliveryOutcome, project_id: str, delivery_id: str, why: str,
                 call_id: str = "") -> Delivery:
        # `why` is one of this module's own sentences (class names and numbers at most);
        # the ids fullmatched their patterns; nothing of the body, nothing of a secret.
        logger.warning("webhook delivery %s refused (%s) for project %s: %s",
                       Safe(delivery_id or "-"), Safe(outcome.value), Safe(project_id or "-"),
                       Safe(why))
        return Delivery(outcome, project_id, call_id)


def _event(body: bytes) -> tuple[str | None, str | None]:
    """(the event's type, its `data.call_id` when it fits), (None, None) when the body is
    not an event object."""
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return None, None
    data = event.get("data")
    call_id = data.get("call_id") if isinstance(data, dict) else None
    if not isinstance(call_id, str) or not CALL_ID_PATTERN.fullmatch(call_id):
        return event["type"], None
    return event["type"], call_id
