"""The TURN secret ring: rotation that every replica and coturn follow without a restart.

Secrets come from two places:
- `ICEGATE_TURN_SECRETS` (settings): valid for as long as they are configured;
- the ring in the store, written by `RotateTurnSecret` (or the automatic rotation): sealed
  by the vault, shared by every replica.

The newest ring secret signs; without one, the first settings secret does. A rotation adds a
new ring secret and gives each older ring secret a retirement time: the moment the last
credential it could have signed expires (rotation time + the longest TTL any project may
ask for, `ICEGATE_TURN_TTL_MAX`). Until then coturn keeps accepting it; after it, the secret
is deleted from the ring and from coturn's database, and the credentials it signed are
refused.

Every replica refreshes its keyring from the store every `REFRESH_SECONDS`, off the hot path
(issuing a credential never touches the store for secrets), and writes the set of valid
secrets into coturn's database when it changed: the Redis set `turn/realm/<realm>/secret`
(coturn `redis-userdb`) and/or the SQL table `turn_secret(realm, value)` of coturn's SQLite
userdb. PostgreSQL/MySQL userdbs are not written (no driver is shipped); point coturn at
Redis for rotation without restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from icegate_server.clock import Clock
from icegate_server.errors import CoturnOutOfStepError, StoreUnavailableError
from icegate_server.observability.logs import Safe
from icegate_server.sessions.vault import Vault, VaultError
from icegate_server.store import Store
from icegate_server.store.base import TurnSecretRecord
from icegate_server.turn.coturn_userdb import CoturnSecretSink
from icegate_server.turn.credentials import TurnCredentialIssuer, TurnSecretKeyring

log = logging.getLogger(__name__)

REFRESH_SECONDS = 1.0
_VAULT_PROJECT = "_icegate"
_VAULT_PURPOSE = "turn-secret"


def secret_id(secret: str) -> str:
    """A public name for a secret (a digest prefix: tells nothing about the secret)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class RingEntry:
    """A secret of the ring as operators see it (never the secret itself)."""

    secret_id: str
    created_ms: int
    retire_at_ms: int
    source: str
    """"ring" (rotated in through icegate) or "settings" (ICEGATE_TURN_SECRETS)."""


class TurnSecretRotation:
    """Keeps the issuer's keyring and coturn's secrets in step with the store's ring."""

    def __init__(self, store: Store, vault: Vault, clock: Clock, issuer: TurnCredentialIssuer,
                 *, static_secrets: Sequence[str], max_ttl_seconds: int,
                 sinks: Sequence[CoturnSecretSink] = (), rotate_every_seconds: int = 0,
                 on_sync_failure: Callable[[], None] = lambda: None) -> None:
        self._store = store
        self._vault = vault
        self._clock = clock
        self._issuer = issuer
        self._static = tuple(static_secrets)
        self._max_ttl_ms = max_ttl_seconds * 1000
        self._sinks = tuple(sinks)
        self._rotate_every_ms = rotate_every_seconds * 1000
        self._on_sync_failure = on_sync_failure
        self._entries: tuple[RingEntry, ...] = ()
        self._synced: frozenset[str] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def entries(self) -> tuple[RingEntry, ...]:
        """The secrets in force, the signer first."""
        return self._entries

    def _now_ms(self) -> int:
        return int(self._clock.now() * 1000)

    async def refresh(self) -> None:
        """Reads the ring, retires what is due, installs the keyring, syncs coturn."""
        now_ms = self._now_ms()
        await self._store.purge_turn_secrets(now_ms)
        ring: list[tuple[str, TurnSecretRecord]] = []
        for record in await self._store.list_turn_secrets():
            if record.retire_at_ms and record.retire_at_ms <= now_ms:
                continue
            try:
                ring.append((self._vault.open(_VAULT_PROJECT, _VAULT_PURPOSE, record.sealed),
                             record))
            except VaultError:
                log.error("TURN secret %s cannot be opened with the configured master keys",
                          Safe(record.secret_id))
        # The signer (not retiring) first, then the retiring ones, newest first.
        ring.sort(key=lambda item: (item[1].retire_at_ms != 0, -item[1].created_ms))
        values = [value for value, _ in ring]
        values += [s for s in self._static if s not in values]
        if not values:
            return
        self._issuer.use_keyring(TurnSecretKeyring(values))
        self._entries = (
            *(RingEntry(r.secret_id, r.created_ms, r.retire_at_ms, "ring") for _, r in ring),
            *(RingEntry(secret_id(s), 0, 0, "settings") for s in self._static
              if s not in [v for v, _ in ring]),
        )
        await self._sync(frozenset(values))

    async def _sync(self, values: frozenset[str]) -> None:
        if values == self._synced or not self._sinks:
            return
        try:
            for sink in self._sinks:
                await sink.replace(values)
        except Exception:
            # Retried at the next refresh (every REFRESH_SECONDS): nothing counts as synced.
            self._on_sync_failure()
            raise
        self._synced = values
        log.info("coturn's TURN secrets updated (%d in force)", len(values))

    def signing_secret_age(self, now: float) -> float:
        """Seconds since the signing secret was made; NaN for a secret from the settings
        (or none yet), whose making icegate never saw."""
        if not self._entries or self._entries[0].source != "ring":
            return math.nan
        return max(0.0, now - self._entries[0].created_ms / 1000)

    @property
    def keeps_coturn_in_step(self) -> bool:
        """Whether icegate writes the secrets into a coturn database, so coturn follows."""
        return bool(self._sinks)

    async def rotate(self, *, min_age_seconds: float = 0,
                     coturn_restart_planned: bool = False) -> bool:
        """Makes a fresh secret the signer; False if the signer is younger than the minimum.

        Raises:
            CoturnOutOfStepError: icegate keeps no coturn database, so coturn would refuse
                every credential the new secret signs, and the caller did not say that
                coturn will be restarted with the new secrets (`coturn_restart_planned`).
        """
        if not self.keeps_coturn_in_step and coturn_restart_planned:
            log.warning(
                "rotating the TURN secret with nothing keeping coturn in step "
                "(ICEGATE_COTURN_REDIS/SQLITE unset): coturn refuses the credentials the new "
                "secret signs until it is restarted with it (re-render its config: "
                "install-coturn-config, make coturn, or the compose coturn-config service)")
        if not self.keeps_coturn_in_step and not coturn_restart_planned:
            raise CoturnOutOfStepError(
                "coturn would refuse every credential signed with the new secret: icegate "
                "keeps no coturn database (set ICEGATE_COTURN_REDIS or ICEGATE_COTURN_SQLITE), "
                "or set coturn_restart_planned and restart coturn on such a database")
        now_ms = self._now_ms()
        value = secrets.token_urlsafe(32)
        record = TurnSecretRecord(
            secret_id=secret_id(value),
            sealed=self._vault.seal(_VAULT_PROJECT, _VAULT_PURPOSE, value),
            created_ms=now_ms)
        rotated = await self._store.rotate_turn_secret(
            record, now_ms=now_ms, retire_at_ms=now_ms + self._max_ttl_ms,
            min_age_ms=int(min_age_seconds * 1000))
        await self.refresh()
        if rotated:
            log.info("TURN secret rotated: %s signs now", Safe(record.secret_id))
        return rotated

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                if self._rotate_every_ms:
                    await self.rotate(min_age_seconds=self._rotate_every_ms / 1000)
                else:
                    await self.refresh()
            except StoreUnavailableError as error:
                # Store errors name the store and the failure, never a secret.
                log.warning("TURN secret refresh failed: %s", Safe(error.message))
            except Exception:
                log.exception("TURN secret refresh failed")

    def start(self) -> None:
        """Starts refreshing (and rotating, when configured) in the background."""
        self._task = asyncio.get_running_loop().create_task(self._maintain())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sink in self._sinks:
            await sink.close()
