"""Caller authentication: the bearer header, and static admin keys admitted by AccessControl."""

from __future__ import annotations

import asyncio

import pytest

from icegate_server.access.control import AccessControl, MethodPolicy
from icegate_server.access.keys import MAX_KEY_LENGTH, bearer_key
from icegate_server.clock import FrozenClock
from icegate_server.errors import InvalidApiKeyError
from icegate_server.store import open_store

KEY = "igk_test_key_0123456789abcdef"
OTHER_KEY = "igk_test_key_fedcba9876543210"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(scheme):
    assert bearer_key([("authorization", f"{scheme} {KEY}")]) == KEY


def test_bearer_key_ignores_other_metadata_and_surrounding_space():
    metadata = [("user-agent", "grpc-python"), ("authorization", f"Bearer  {KEY} "),
                ("x-request-id", "abc")]
    assert bearer_key(metadata) == KEY


def test_longest_allowed_key_is_accepted():
    key = "k" * MAX_KEY_LENGTH
    assert bearer_key([("authorization", f"Bearer {key}")]) == key


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param([], id="no-metadata"),
        pytest.param([("x-api-key", KEY)], id="other-header-only"),
        pytest.param([("authorization", f"Bearer {KEY}"), ("authorization", f"Bearer {KEY}")],
                     id="two-headers"),
        pytest.param([("authorization", f"Basic {KEY}")], id="basic-scheme"),
        pytest.param([("authorization", KEY)], id="no-scheme"),
        pytest.param([("authorization", f"Bearer{KEY}")], id="no-space"),
        pytest.param([("authorization", "Bearer ")], id="empty-key"),
        pytest.param([("authorization", "Bearer    ")], id="blank-key"),
        pytest.param([("authorization", "Bearer " + "k" * (MAX_KEY_LENGTH + 1))],
                     id="oversized"),
        pytest.param([("authorization", f"Bearer {KEY}".encode())], id="bytes-value"),
    ],
)
def test_malformed_authorization_is_refused_without_echoing_it(metadata):
    with pytest.raises(InvalidApiKeyError) as caught:
        bearer_key(metadata)
    assert KEY not in caught.value.message
    assert "k" * 64 not in caught.value.message


async def admit(static_keys, key, policy, tmp_path):
    """One admission decision against a fresh SQLite store, as the server makes it."""
    store = await open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    try:
        access = AccessControl(store, FrozenClock(), static_keys)
        return await access.admit(key, policy, "")
    finally:
        await store.close()


def test_static_keys_authenticate_as_admins(tmp_path):
    first = asyncio.run(admit([KEY, OTHER_KEY], KEY, MethodPolicy.ADMIN, tmp_path))
    second = asyncio.run(admit([KEY, OTHER_KEY], OTHER_KEY, MethodPolicy.ADMIN, tmp_path))
    assert first.caller.is_admin and second.caller.is_admin
    assert first.caller.key_id != second.caller.key_id
    # The caller identity that reaches logs never holds the key itself.
    assert KEY not in repr(first)
    assert OTHER_KEY not in repr(second)


@pytest.mark.parametrize("policy", [MethodPolicy.ADMIN, MethodPolicy.PROJECT])
@pytest.mark.parametrize(
    "presented",
    [OTHER_KEY, KEY.upper(), KEY + " ", KEY[:-1], "\ud800-lone-surrogate-key"],
)
def test_unknown_key_is_refused_without_echoing_it(tmp_path, policy, presented):
    with pytest.raises(InvalidApiKeyError) as caught:
        asyncio.run(admit([KEY], presented, policy, tmp_path))
    assert presented not in caught.value.message
    assert presented not in str(caught.value)


def test_no_static_keys_refuses_everything(tmp_path):
    with pytest.raises(InvalidApiKeyError):
        asyncio.run(admit([], KEY, MethodPolicy.ADMIN, tmp_path))
