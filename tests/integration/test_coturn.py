"""Credentials issued by a running icegate, checked by a real coturn (Debian's `coturn`)."""

from __future__ import annotations

import time

import pytest

import icegate
from harness.icegate_server import TEST_ADMIN_KEY, TEST_TURN_SECRET, RunningServer, server_settings
from icegate_server.clock import FrozenClock

pytestmark = pytest.mark.coturn

OLD_SECRET = TEST_TURN_SECRET
NEW_SECRET = "rotated-turn-secret-9876543210"


def issue(server: RunningServer, user: str, ttl: int = 600) -> tuple[str, str]:
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        credential = client.issue_turn_credentials(user, ttl=ttl)
    return credential.username, credential.password


def real_time_server(tmp_path, coturn, secrets) -> RunningServer:
    """An icegate whose clock is the real one (coturn checks expiry against real time)."""
    settings = server_settings(tmp_path, turn_secrets=tuple(secrets), turn_uris=(coturn.turn_uri,))
    return RunningServer(settings, clock=FrozenClock(time.time()))


def test_issued_credentials_allocate(tmp_path, coturn_factory):
    coturn = coturn_factory([OLD_SECRET])
    with real_time_server(tmp_path, coturn, [OLD_SECRET]) as server:
        username, password = issue(server, "alice")
        with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
            servers = client.get_ice_servers("alice")
    turn = servers.ice_servers[-1]
    assert list(turn.urls) == [coturn.turn_uri]
    for result in coturn.allocate_each([(username, password), (turn.username, turn.credential)]):
        assert result.ok, result.output


def test_unknown_secret_tampered_and_expired_are_refused(tmp_path, coturn_factory):
    coturn = coturn_factory([OLD_SECRET])
    with real_time_server(tmp_path / "a", coturn, ["a-secret-coturn-does-not-know"]) as stranger:
        foreign = issue(stranger, "mallory")
    with real_time_server(tmp_path / "b", coturn, [OLD_SECRET]) as server:
        username, password = issue(server, "alice")
    settings = server_settings(tmp_path / "c", turn_secrets=(OLD_SECRET,),
                               turn_uris=(coturn.turn_uri,))
    # Issued as if an hour ago with a 60 s TTL: expired by now.
    with RunningServer(settings, clock=FrozenClock(time.time() - 3600)) as server:
        expired = issue(server, "bob", ttl=60)

    assert not coturn.allocate(*foreign).ok
    tampered = ("A" if password[0] != "A" else "B") + password[1:]
    assert not coturn.allocate(username, tampered).ok
    assert not coturn.allocate(expired[0], expired[1]).ok
    assert coturn.allocate(username, password).ok  # the untouched one still works


def test_rotation_keeps_old_and_new_credentials_valid(tmp_path, coturn_factory):
    coturn = coturn_factory([OLD_SECRET])
    with real_time_server(tmp_path / "before", coturn, [OLD_SECRET]) as server:
        old_credential = issue(server, "alice")

    # Rotate on both sides: the new secret first (it signs), the old one still listed.
    coturn.restart(secrets=[NEW_SECRET, OLD_SECRET])
    with real_time_server(tmp_path / "after", coturn, [NEW_SECRET, OLD_SECRET]) as server:
        new_credential = issue(server, "alice")

    assert new_credential[1] != old_credential[1]
    assert [result.ok for result in coturn.allocate_each([old_credential, new_credential])] \
        == [True, True]

    # Once the old secret is retired from coturn, only the new credentials allocate.
    coturn.restart(secrets=[NEW_SECRET])
    assert [result.ok for result in coturn.allocate_each([old_credential, new_credential])] \
        == [False, True]
