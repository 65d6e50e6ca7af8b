"""Caller authentication: the `authorization: Bearer <key>` metadata, and key digests.

Keys are looked up by their SHA-256 digest, never compared as strings: whatever timing the
lookup shows depends only on the digest, and learning digest prefixes tells an attacker
nothing about any key (that is the constant-time property string comparison lacks). Keys
are high-entropy random strings (256 bits), so a plain, unsalted, fast hash is enough:
there is no dictionary to guess from, and a slow password hash would only tax every call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import NamedTuple

from icegate_server.errors import InvalidApiKeyError

AUTHORIZATION_HEADER = "authorization"
_BEARER_PREFIX = "bearer "
MAX_KEY_LENGTH = 512


class Caller(NamedTuple):
    """Who is calling: a key's id (never the key) and what it may act on.

    An admin caller may act on every project; any other caller only on `project_id`.
    """

    key_id: str
    is_admin: bool
    project_id: str = ""


def key_digest(key: str) -> bytes:
    """The SHA-256 digest a key is stored and looked up under."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def has_authorization(metadata: Iterable[tuple[str, str | bytes]]) -> bool:
    """Whether `metadata` carries any authorization header (well-formed or not)."""
    return any(name == AUTHORIZATION_HEADER for name, _ in metadata)


def bearer_key(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The key of the single `authorization: Bearer <key>` header in `metadata`.

    Raises:
        InvalidApiKeyError: No such header, several, or one not of the Bearer form.
    """
    values = [value for name, value in metadata if name == AUTHORIZATION_HEADER]
    if not values:
        raise InvalidApiKeyError("missing 'authorization: Bearer <key>' metadata")
    if len(values) > 1:
        raise InvalidApiKeyError("more than one authorization header")
    value = values[0]
    if isinstance(value, bytes) or len(value) > MAX_KEY_LENGTH + len(_BEARER_PREFIX):
        raise InvalidApiKeyError("malformed authorization header")
    if value[: len(_BEARER_PREFIX)].lower() != _BEARER_PREFIX:
        raise InvalidApiKeyError("authorization header must be 'Bearer <key>'")
    key = value[len(_BEARER_PREFIX):].strip()
    if not key:
        raise InvalidApiKeyError("authorization header carries no key")
    return key
