"""TURN REST credentials: the draft's vectors, issuing, rotation, TTL policy and user ids."""

from __future__ import annotations

import base64
import hashlib
import hmac
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from icegate_server.clock import FrozenClock
from icegate_server.errors import InvalidFieldError
from icegate_server.projects.records import Project
from icegate_server.turn.credentials import (
    TtlPolicy,
    TurnCredentialIssuer,
    TurnSecretKeyring,
    turn_password,
    validate_user_id,
)

# Published vectors (draft-uberti-behave-turn-rest-00 and coturn's docs; see reference/coturn.md).
VECTORS = [
    ("north", "1266890800:mbzrxpgjys", "nbRcrnq5h6xXhyNhlwk+lDLvVVo="),
    ("foobar", "1599491771", "Tpz/nKkyvX/vMSLKvL4sbtBt8Vs="),
]

NEW_SECRET = "new-secret-0123456789"
OLD_SECRET = "old-secret-0123456789"
URIS = ("turn:turn.example.test:3478?transport=udp", "turns:turn.example.test:5349")
PROJECT = Project(project_id="acme-eu", turn_ttl_default_seconds=900, turn_ttl_max_seconds=7200)


def hmac_password(secret: str, username: str) -> str:
    """The password as coturn computes it, written out with nothing from icegate."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


@pytest.mark.parametrize(("secret", "username", "password"), VECTORS)
def test_turn_password_matches_published_vector(secret, username, password):
    assert turn_password(secret, username) == password


@pytest.mark.parametrize(("secret", "username", "password"), VECTORS)
def test_keyring_signs_published_vector(secret, username, password):
    keyring = TurnSecretKeyring([secret])
    assert keyring.sign(username) == password
    # Signing reuses a prepared HMAC state: a second call must not be polluted by the first.
    assert keyring.sign(username) == password


def test_keyring_refuses_no_secrets():
    with pytest.raises(ValueError):
        TurnSecretKeyring([])


def test_keyring_repr_hides_secrets():
    keyring = TurnSecretKeyring([NEW_SECRET, OLD_SECRET])
    assert NEW_SECRET not in repr(keyring)
    assert OLD_SECRET not in repr(keyring)


def test_issue_binds_expiry_and_user_under_frozen_clock():
    clock = FrozenClock(1_700_000_000.75)
    issuer = TurnCredentialIssuer(TurnSecretKeyring([NEW_SECRET]), clock, URIS)

    credential = issuer.issue("alice", 600)

    assert credential.username == "1700000600:alice"
    assert credential.expires_at == 1_700_000_600
    assert credential.ttl_seconds == 600
    assert credential.uris == URIS
    assert credential.password == hmac_password(NEW_SECRET, credential.username)
    assert credential.password not in repr(credential)


def test_issue_follows_the_clock():
    clock = FrozenClock(1_700_000_000)
    issuer = TurnCredentialIssuer(TurnSecretKeyring([NEW_SECRET]), clock, URIS)
    first = issuer.issue("alice", 60)
    clock.advance(30)
    second = issuer.issue("alice", 60)
    assert second.expires_at == first.expires_at + 30
    assert second.password != first.password


def test_rotation_signs_with_the_newest_secret_only():
    issuer = TurnCredentialIssuer(TurnSecretKeyring([NEW_SECRET, OLD_SECRET]), FrozenClock(), URIS)
    credential = issuer.issue("bob", 3600)
    assert credential.password == hmac_password(NEW_SECRET, credential.username)
    assert credential.password != hmac_password(OLD_SECRET, credential.username)


def test_keyring_lists_every_secret_signing_first():
    assert TurnSecretKeyring([NEW_SECRET, OLD_SECRET]).secrets == (NEW_SECRET, OLD_SECRET)


POLICY = TtlPolicy(default=3600, minimum=60, maximum=86400)


def test_ttl_default_when_none_requested():
    assert POLICY.resolve(None) == 3600


@pytest.mark.parametrize("ttl", [60, 61, 3600, 86399, 86400, 60.0, 86400.0])
def test_ttl_within_bounds_is_kept(ttl):
    resolved = POLICY.resolve(ttl)
    assert resolved == ttl
    assert isinstance(resolved, int)


@pytest.mark.parametrize(
    "ttl", [59, 0, -1, -3600, 86401, 10**12, 60.5, 3600.001, math.nan, math.inf, -math.inf]
)
def test_ttl_outside_policy_is_refused_not_clamped(ttl):
    with pytest.raises(InvalidFieldError) as caught:
        POLICY.resolve(ttl)
    assert [v.field for v in caught.value.violations] == ["ttl"]
    assert "ttl" in caught.value.message


def test_ttl_refusal_names_the_field_it_was_asked_for():
    with pytest.raises(InvalidFieldError) as caught:
        POLICY.resolve(5, field="session.ttl")
    assert caught.value.violations[0].field == "session.ttl"


@pytest.mark.parametrize(
    "user_id",
    ["alice", "a", "user-42@example.test", "Zoë", "名前", "x" * 256, "é" * 128, "a b"],
)
def test_valid_user_ids_are_accepted(user_id):
    validate_user_id(user_id)


@pytest.mark.parametrize(
    "user_id",
    [
        "",
        "x" * 257,
        "é" * 129,  # 258 bytes of UTF-8 in 129 characters
        "名" * 86,  # 258 bytes
        "alice:admin",
        ":",
        "1700000000:alice",
        "alice\n",
        "al\x00ice",
        "alice\x7f",
        "alice\u2028",
        "alice\t",
        "\ud800alice",
        "alice\udfff",
    ],
)
def test_invalid_user_ids_are_refused(user_id):
    with pytest.raises(InvalidFieldError) as caught:
        validate_user_id(user_id)
    assert caught.value.violations[0].field == "user_id"


def test_user_id_limit_counts_bytes_not_characters():
    validate_user_id("é" * 128)  # 256 bytes
    with pytest.raises(InvalidFieldError):
        validate_user_id("é" * 128 + "a")  # 257 bytes


def test_issue_for_binds_the_project_into_the_username():
    issuer = TurnCredentialIssuer(TurnSecretKeyring([NEW_SECRET]), FrozenClock(1_700_000_000),
                                  URIS)
    credential = issuer.issue_for(PROJECT, "alice@example.test", 600)
    assert credential.username == "1700000600:acme-eu/alice@example.test"
    assert credential.password == hmac_password(NEW_SECRET, credential.username)


def test_same_user_in_two_projects_gets_different_credentials():
    issuer = TurnCredentialIssuer(TurnSecretKeyring([NEW_SECRET]), FrozenClock(), URIS)
    other = Project(project_id="acme-us")
    assert (issuer.issue_for(PROJECT, "alice", 600).password
            != issuer.issue_for(other, "alice", 600).password)


def test_issue_for_applies_the_project_ttl_policy():
    issuer = TurnCredentialIssuer(TurnSecretKeyring([NEW_SECRET]), FrozenClock(1_700_000_000),
                                  URIS, min_ttl_seconds=120)
    assert issuer.issue_for(PROJECT, "alice", None).ttl_seconds == 900
    assert issuer.issue_for(PROJECT, "alice", 7200).ttl_seconds == 7200
    assert issuer.issue_for(PROJECT, "alice", 120).ttl_seconds == 120
    for refused in (7201, 119):
        with pytest.raises(InvalidFieldError) as caught:
            issuer.issue_for(PROJECT, "alice", refused)
        assert caught.value.violations[0].field == "ttl"


def test_issue_for_refuses_a_bad_user_id_before_signing():
    issuer = TurnCredentialIssuer(TurnSecretKeyring([NEW_SECRET]), FrozenClock(), URIS)
    with pytest.raises(InvalidFieldError) as caught:
        issuer.issue_for(PROJECT, "1700000000:mallory", 600)
    assert caught.value.violations[0].field == "user_id"


@given(st.text(min_size=1, max_size=300))
def test_any_accepted_user_id_yields_an_unambiguous_username(user_id):
    try:
        validate_user_id(user_id)
    except InvalidFieldError:
        return
    issuer = TurnCredentialIssuer(TurnSecretKeyring([NEW_SECRET]), FrozenClock(), URIS)

    credential = issuer.issue(user_id, 60)
    expiry, separator, rest = credential.username.partition(":")
    assert separator == ":"
    assert expiry.isascii() and expiry.isdigit()
    assert rest == user_id
    assert credential.password == hmac_password(NEW_SECRET, credential.username)

    # icegate's own layout parses back: first ':' ends the expiry, first '/' the project.
    bound = issuer.issue_for(PROJECT, user_id, 60)
    expiry, _, rest = bound.username.partition(":")
    assert expiry.isascii() and expiry.isdigit()
    project_id, _, user = rest.partition("/")
    assert (project_id, user) == (PROJECT.project_id, user_id)


@given(st.text(max_size=50), st.text(max_size=50))
def test_any_user_id_with_the_separator_is_refused(before, after):
    with pytest.raises(InvalidFieldError):
        validate_user_id(f"{before}:{after}")
