"""The vault: provider API keys sealed with AES-256-GCM under a master key.

A project's upstream key (an OpenAI or Gemini API key, say) is stored only sealed. Sealing
binds the project id and the provider name into the AES-GCM associated data, so a sealed key
copied into another project's row, or under another provider, does not open.

Sealed format, version 1 (all of it is stored; nothing else is needed to open it)::

    b"v1" | key id (8 bytes) | nonce (12 bytes) | ciphertext | GCM tag (16 bytes)

The key id is the first 8 bytes of SHA-256 of the master key, so a keyring holding several
master keys knows which one opens a blob, and `needs_reseal` can tell a blob sealed under an
older key. The header is authenticated too (it is part of the associated data).

Master key rotation: put the new key first in `ICEGATE_MASTER_KEY` (it seals), keep the old
one after it (it still opens), re-seal every stored key with `Vault.reseal`, then drop the old
key.

Nothing here puts a plaintext or key bytes into an exception message or a log line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from icegate_server.errors import IcegateError
from icegate_server.observability.logs import Safe

__all__ = [
    "MASTER_KEY_FILE_SETTING",
    "MASTER_KEY_SETTING",
    "MasterKeyring",
    "Vault",
    "VaultError",
    "generate_master_key",
    "last4",
    "load_master_keys",
]

logger = logging.getLogger(__name__)

MASTER_KEY_SETTING = "ICEGATE_MASTER_KEY"
MASTER_KEY_FILE_SETTING = "ICEGATE_MASTER_KEY_FILE"

MASTER_KEY_BYTES = 32
_VERSION = b"v1"
_KEY_ID_BYTES = 8
# 96-bit random nonces: the size GCM is specified for; with random nonces one key may seal
# about 2**32 values before a collision becomes a concern, far beyond a key store's needs.
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HEADER_BYTES = len(_VERSION) + _KEY_ID_BYTES + _NONCE_BYTES
_AAD_LABEL = b"icegate/vault/provider-key"

RandomBytes = Callable[[int], bytes]


class VaultError(IcegateError):
    """A sealed key could not be sealed or opened (wrong key, altered data, wrong owner)."""


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:_KEY_ID_BYTES]


class MasterKeyring:
    """The master keys the vault may use: the first seals, every one of them opens.

    Args:
        keys: 32-byte AES-256 keys, the sealing key first.

    Raises:
        ValueError: no key, a key of the wrong length, or the same key twice.
    """

    def __init__(self, keys: Iterable[bytes]) -> None:
        key_list = list(keys)
        if not key_list:
            raise ValueError("a master keyring needs at least one key")
        self._ciphers: dict[bytes, AESGCM] = {}
        self._order: list[bytes] = []
        for position, key in enumerate(key_list, start=1):
            if len(key) != MASTER_KEY_BYTES:
                raise ValueError(
                    f"master key {position} is {len(key)} bytes; it must be {MASTER_KEY_BYTES}")
            key_id = _key_id(key)
            if key_id in self._ciphers:
                raise ValueError(f"master key {position} is listed twice")
            self._ciphers[key_id] = AESGCM(key)
            self._order.append(key_id)

    @property
    def sealing_key_id(self) -> bytes:
        """The id of the key new seals use."""
        return self._order[0]

    @property
    def key_ids(self) -> tuple[bytes, ...]:
        """The ids of every key, the sealing key first."""
        return tuple(self._order)

    def cipher(self, key_id: bytes) -> AESGCM | None:
        """The cipher of the key with `key_id`, or None when this keyring lacks it."""
        return self._ciphers.get(key_id)

    def __repr__(self) -> str:
        # Ids only: a repr ends up in logs and tracebacks.
        ids = ", ".join(key_id.hex() for key_id in self._order)
        return f"MasterKeyring(key_ids=[{ids}])"


def _associated_data(header: bytes, project_id: str, provider: str) -> bytes:
    # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
    parts = [_AAD_LABEL, header, project_id.encode(), provider.encode()]
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


class Vault:
    """Seals and opens provider API keys, bound to their project and provider.

    Args:
        keyring: the master keys.
        random_bytes: the source of nonces (injected so tests can make seals repeatable).
    """

    def __init__(self, keyring: MasterKeyring, *, random_bytes: RandomBytes = os.urandom) -> None:
        self._keyring = keyring
        self._random_bytes = random_bytes

    @property
    def keyring(self) -> MasterKeyring:
        """The master keys this vault uses."""
        return self._keyring

    def seal(self, project_id: str, provider: str, plaintext: str) -> bytes:
        """Encrypts `plaintext` (an API key) for this project and provider.

        Returns:
            The self-describing sealed blob (see the module docstring for its layout).

        Raises:
            VaultError: the plaintext is not encodable text or the random source misbehaved.
        """
        try:
            data = plaintext.encode("utf-8")
        except UnicodeEncodeError:
            # The codec's message quotes the offending character: do not pass it on.
            raise VaultError("the key to seal is not valid Unicode text") from None
        nonce = self._random_bytes(_NONCE_BYTES)
        if len(nonce) != _NONCE_BYTES:
            raise VaultError(f"the random source returned {len(nonce)} bytes, not {_NONCE_BYTES}")
        key_id = self._keyring.sealing_key_id
        header = _VERSION + key_id + nonce
        cipher = self._keyring.cipher(key_id)
        assert cipher is not None  # the sealing key is always in its own keyring
        ciphertext = cipher.encrypt(nonce, data, _associated_data(header, project_id, provider))
        return header + ciphertext

    def open(self, project_id: str, provider: str, sealed: bytes) -> str:
        """Decrypts a key sealed for this project and provider.

        Raises:
            VaultError: the blob is malformed or of an unknown version, its master key is not
                in the keyring, it was sealed for another project or provider, or it was
                altered.
        """
        key_id, nonce, ciphertext = self._parse(sealed)
        cipher = self._keyring.cipher(key_id)
        if cipher is None:
            logger.warning("vault: no master key %s for the %s key of project %s",
                           Safe(key_id.hex()), Safe(provider), Safe(project_id))
            raise VaultError(
                f"the {provider} key of project {project_id} was sealed under master key "
                f"{key_id.hex()}, which is not configured in {MASTER_KEY_SETTING}")
        header = sealed[:_HEADER_BYTES]
        try:
            data = cipher.decrypt(nonce, ciphertext,
                                  _associated_data(header, project_id, provider))
        except InvalidTag:
            logger.warning("vault: the %s key of project %s failed authentication",
                           Safe(provider), Safe(project_id))
            raise VaultError(
                f"the sealed {provider} key of project {project_id} does not open: it was "
                "sealed for another project or provider, or it has been altered") from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            # Authenticated, so this cannot happen unless seal() was bypassed.
            raise VaultError("the opened key is not UTF-8 text") from None

    def needs_reseal(self, sealed: bytes) -> bool:
        """Whether `sealed` was sealed under a key other than the current sealing key.

        Raises:
            VaultError: the blob is malformed or of an unknown version.
        """
        key_id, _, _ = self._parse(sealed)
        return key_id != self._keyring.sealing_key_id

    def reseal(self, project_id: str, provider: str, sealed: bytes) -> bytes:
        """Opens `sealed` and seals it again under the current sealing key (fresh nonce).

        Raises:
            VaultError: as for `open`.
        """
        return self.seal(project_id, provider, self.open(project_id, provider, sealed))

    @staticmethod
    def _parse(sealed: bytes) -> tuple[bytes, bytes, bytes]:
        if not sealed.startswith(_VERSION):
            raise VaultError("the sealed key has an unknown format version")
        if len(sealed) < _HEADER_BYTES + _TAG_BYTES:
            raise VaultError("the sealed key is truncated")
        key_id = sealed[len(_VERSION):len(_VERSION) + _KEY_ID_BYTES]
        nonce = sealed[len(_VERSION) + _KEY_ID_BYTES:_HEADER_BYTES]
        return key_id, nonce, sealed[_HEADER_BYTES:]


def generate_master_key(random_bytes: RandomBytes = os.urandom) -> str:
    """A new master key, base64-encoded as `ICEGATE_MASTER_KEY` expects it."""
    return base64.b64encode(random_bytes(MASTER_KEY_BYTES)).decode("ascii")


def _decode_master_keys(text: str, setting: str) -> list[bytes]:
    # Commas, whitespace and newlines all separate keys; "#" starts a comment in a file.
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    entries = [entry for line in lines for entry in re.split(r"[\s,]+", line) if entry]
    if not entries:
        raise ValueError(f"{setting} holds no master key")
    keys: list[bytes] = []
    for position, entry in enumerate(entries, start=1):
        try:
            key = base64.b64decode(entry, validate=True)
        except (binascii.Error, ValueError):
            # Never echo the entry: it may be a real key with one character wrong.
            raise ValueError(f"{setting}: key {position} is not valid base64") from None
        if len(key) != MASTER_KEY_BYTES:
            raise ValueError(f"{setting}: key {position} decodes to {len(key)} bytes; "
                             f"a master key is {MASTER_KEY_BYTES} bytes of base64")
        keys.append(key)
    return keys


def _keyring_from_setting(text: str, setting: str) -> MasterKeyring:
    keys = _decode_master_keys(text, setting)
    try:
        return MasterKeyring(keys)
    except ValueError as exc:
        # MasterKeyring's messages name positions, never key bytes.
        raise ValueError(f"{setting}: {exc}") from None


def load_master_keys(value: str | None, file: str | None) -> MasterKeyring:
    """Builds the keyring from `ICEGATE_MASTER_KEY` or `ICEGATE_MASTER_KEY_FILE`.

    Args:
        value: the setting's value: base64 keys of 32 bytes, comma-separated, the sealing
            key first.
        file: a path to a file with the same content (commas or one key per line).

    Raises:
        ValueError: neither or both are set, the file cannot be read, or a key is not
            base64 of 32 bytes. The message names the setting and never contains its value.
    """
    if value and file:
        raise ValueError(f"set {MASTER_KEY_SETTING} or {MASTER_KEY_FILE_SETTING}, not both")
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable"
            raise ValueError(
                f"{MASTER_KEY_FILE_SETTING}: cannot read {file}: {reason}") from None
        return _keyring_from_setting(text, MASTER_KEY_FILE_SETTING)
    if value:
        return _keyring_from_setting(value, MASTER_KEY_SETTING)
    raise ValueError(f"{MASTER_KEY_SETTING} (or {MASTER_KEY_FILE_SETTING}) is not set; "
                     "create one with a fresh base64 32-byte key")


def last4(plaintext: str) -> str:
    """The form of a key shown in listings: an ellipsis and its last 4 characters.

    Keys shorter than 12 characters show nothing, since 4 characters would be too much
    of them.
    """
    if len(plaintext) < 12:
        return "…"
    return "…" + plaintext[-4:]
