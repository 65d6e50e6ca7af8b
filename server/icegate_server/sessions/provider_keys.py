"""Projects' provider API keys: sealed in the vault on the way in, opened only to mint tokens.

The GA and older dialects of a provider share one key (`openai` serves `openai_beta`,
`azure` serves `azure_legacy`), stored under the provider's family name.

A project's OpenAI webhook secret (`whsec_...`, which signs the `realtime.call.incoming`
deliveries of `sessions.incoming_calls`) is kept the same way under `openai_webhook`: set,
listed (last 4), deleted and re-sealed with the provider keys, gone with its project.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from icegate_server.clock import Clock
from icegate_server.errors import InvalidFieldError, NotFoundError, UpstreamNotConfiguredError
from icegate_server.sessions.providers import ProviderKind
from icegate_server.sessions.vault import Vault, VaultError, last4
from icegate_server.store import Store
from icegate_server.store.base import ProviderKeyRecord

WEBHOOK_SECRET_FAMILY = "openai_webhook"  # noqa: S105 (a name, not a secret)
"""Where a project's OpenAI webhook secret is kept, beside its provider keys."""
KEY_FAMILIES = ("azure", "gemini", "openai", "orga", WEBHOOK_SECRET_FAMILY)
WEBHOOK_SECRET_PATTERN = re.compile(r"whsec_[A-Za-z0-9+/]{22,512}={0,2}")
"""A Standard Webhooks secret as OpenAI shows it: `whsec_` and base64 (16 bytes or more)."""
MIN_KEY_LENGTH = 8
MAX_KEY_LENGTH = 4096


def key_family(kind: ProviderKind) -> str:
    """The name a provider's key is stored under (`openai_beta` -> `openai`)."""
    return kind.value.split("_", 1)[0]


def validate_family(provider: str) -> str:
    if provider not in KEY_FAMILIES:
        raise InvalidFieldError("provider", f"must be one of {', '.join(KEY_FAMILIES)}")
    return provider


def missing_key_error(project_id: str, kind: ProviderKind) -> UpstreamNotConfiguredError:
    """What a call needing the project's key for `kind` answers when there is none."""
    family = key_family(kind)
    return UpstreamNotConfiguredError(
        f"project {project_id!r} has no {family} key: set one with "
        f"`icegate admin provider-key set --project {project_id} --provider {family}`",
        provider=kind.value)


def check_webhook_secret(secret: str) -> None:
    """Refuses what is not a `whsec_` secret of at least 16 bytes (it never appears in the
    error)."""
    try:
        fits = bool(WEBHOOK_SECRET_PATTERN.fullmatch(secret)) and \
            len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) >= 16
    except (binascii.Error, ValueError):
        fits = False
    if not fits:
        raise InvalidFieldError("api_key", "an openai_webhook secret must be whsec_ and the "
                                "base64 of 16 bytes or more, as OpenAI shows it")


@dataclass(frozen=True)
class ResealReport:
    resealed: int
    unchanged: int
    failed: int


class ProviderKeys:
    """Stores, lists, deletes and opens sealed provider keys."""

    def __init__(self, store: Store, vault: Vault, clock: Clock) -> None:
        self._store = store
        self._vault = vault
        self._clock = clock

    async def set(self, project_id: str, provider: str, api_key: str) -> ProviderKeyRecord:
        """Seals and stores `api_key` (which is never logged nor returned)."""
        validate_family(provider)
        if provider == WEBHOOK_SECRET_FAMILY:
            check_webhook_secret(api_key)
        if not MIN_KEY_LENGTH <= len(api_key) <= MAX_KEY_LENGTH or not api_key.isprintable() \
                or api_key != api_key.strip():
            raise InvalidFieldError(
                "api_key", f"must be {MIN_KEY_LENGTH} to {MAX_KEY_LENGTH} printable characters "
                "without surrounding spaces")
        record = ProviderKeyRecord(
            project_id=project_id, provider=provider,
            sealed=self._vault.seal(project_id, provider, api_key), last4=last4(api_key),
            update_time_ms=int(self._clock.now() * 1000))
        await self._store.put_provider_key(record)
        return record

    async def list(self, project_id: str) -> list[ProviderKeyRecord]:
        return await self._store.list_provider_keys(project_id)

    async def delete(self, project_id: str, provider: str) -> None:
        validate_family(provider)
        if not await self._store.delete_provider_key(project_id, provider):
            raise NotFoundError(f"project {project_id!r} has no {provider} key")

    async def open(self, project_id: str, kind: ProviderKind) -> str:
        """The clear key to call `kind` with.

        Raises:
            UpstreamNotConfiguredError: The project has no key for the provider, or it was
                sealed under a master key no longer configured.
        """
        record = await self._store.get_provider_key(project_id, key_family(kind))
        if record is None:
            raise missing_key_error(project_id, kind)
        return self.open_record(record, kind)

    def open_record(self, record: ProviderKeyRecord, kind: ProviderKind) -> str:
        """The clear key of a record the store returned (`Store.begin_session` reads it).

        Raises:
            UpstreamNotConfiguredError: It was sealed under a master key no longer configured.
        """
        try:
            return self._vault.open(record.project_id, record.provider, record.sealed)
        except VaultError:
            raise UpstreamNotConfiguredError(
                f"the {record.provider} key of project {record.project_id!r} cannot be opened "
                "with the configured master keys", provider=kind.value) from None

    async def reseal_all(self) -> ResealReport:
        """Re-seals every key not sealed under the current master key."""
        resealed = unchanged = failed = 0
        for record in await self._store.list_provider_keys(None):
            try:
                if not self._vault.needs_reseal(record.sealed):
                    unchanged += 1
                    continue
                sealed = self._vault.reseal(record.project_id, record.provider, record.sealed)
            except VaultError:
                failed += 1
                continue
            await self._store.put_provider_key(ProviderKeyRecord(
                record.project_id, record.provider, sealed, record.last4,
                record.update_time_ms))
            resealed += 1
        return ResealReport(resealed, unchanged, failed)
