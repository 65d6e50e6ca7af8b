"""A stolen TURN secret from ICEGATE_TURN_SECRETS is retired by the restart path SECURITY.md
gives: put a fresh secret in its place and restart icegate. With a coturn userdb icegate
keeps, coturn refuses the stolen secret's credentials from that restart on, without a coturn
restart; without one, re-rendering coturn's config and restarting coturn does the same.
Rotated ring secrets, and every other credential, keep working.
"""

from __future__ import annotations

import time

import pytest

import icegate
from harness.coturn import rest_credential
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer, server_settings
from harness.ports import free_tcp_udp_port, reserve_relay_range
from harness.pytest_plugin import require_binaries
from harness.rendered_coturn import RenderedCoturn, run_coturn_config_command
from harness.turn_client import TurnClient
from icegate_server.clock import FrozenClock

pytestmark = pytest.mark.coturn

REALM = "retire.icegate.test"
STOLEN = "stolen-turn-secret-0123456789"
FRESH = "fresh-turn-secret-0123456789"


def accepted(coturn, username: str, password: str, *, within: float = 5.0) -> bool:
    """Whether coturn allocates for this credential (waiting up to `within` seconds for a
    change icegate is writing into coturn's userdb to show)."""
    deadline = time.monotonic() + within
    while True:
        with TurnClient(coturn.host, coturn.port) as client:
            code = client.allocate(username, password).code
        if code == 0 or time.monotonic() > deadline:
            return code == 0
        time.sleep(0.2)


def refused(coturn, username: str, password: str, *, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while True:
        with TurnClient(coturn.host, coturn.port) as client:
            code = client.allocate(username, password).code
        if code == 401 or time.monotonic() > deadline:
            return code == 401
        time.sleep(0.2)


def test_restart_with_a_fresh_secret_retires_the_stolen_one_through_the_userdb(
        tmp_path, coturn_factory):
    userdb = tmp_path / "coturn" / "turndb"
    userdb.parent.mkdir()
    coturn = coturn_factory(realm=REALM, sqlite_userdb=userdb)
    settings = server_settings(tmp_path / "icegate", turn_realm=REALM,
                               turn_uris=(coturn.turn_uri,), coturn_sqlite=str(userdb),
                               turn_secrets=(STOLEN,))
    expiry = int(time.time()) + 3600
    with RunningServer(settings, FrozenClock(time.time())) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.rotate_turn_secret()  # a ring secret signs now; the settings one stays valid
        ring_signed = admin.issue_turn_credentials("bob", ttl=600)
    stolen = rest_credential(STOLEN, "mallory", expiry)
    assert accepted(coturn, *stolen)

    # The operator's answer: ICEGATE_TURN_SECRETS=<fresh> (the stolen one out), restart.
    restarted = server_settings(tmp_path / "icegate", turn_realm=REALM,
                                turn_uris=(coturn.turn_uri,), coturn_sqlite=str(userdb),
                                turn_secrets=(FRESH,))
    with RunningServer(restarted, FrozenClock(time.time())) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        assert refused(coturn, *stolen)
        assert accepted(coturn, *rest_credential(FRESH, "alice", expiry))
        # The rotated secret and what it signed are untouched.
        assert accepted(coturn, ring_signed.username, ring_signed.password)
        fresh = admin.issue_turn_credentials("carol", ttl=600)
        assert accepted(coturn, fresh.username, fresh.password)
        listed = {entry.secret_id for entry in admin.list_turn_secrets()}
    from icegate_server.turn.rotation import secret_id

    assert secret_id(STOLEN) not in listed and secret_id(FRESH) in listed


def test_without_a_userdb_coturn_restarts_on_the_rerendered_config(tmp_path):
    """Static secrets (no userdb): the stolen one stays valid in coturn until its config is
    rendered again from the new ICEGATE_TURN_SECRETS and coturn restarted, as the restart
    path says."""
    require_binaries("turnserver")
    port = free_tcp_udp_port()
    relay = reserve_relay_range()
    config = tmp_path / "turnserver.conf"

    def render(secrets: str) -> None:
        rendered = run_coturn_config_command(
            {"ICEGATE_TURN_SECRETS": secrets, "ICEGATE_TURN_REALM": REALM,
             "ICEGATE_TURN_URIS": f"turn:127.0.0.1:{port}?transport=udp",
             "ICEGATE_DATA_DIR": str(tmp_path / "data")},
            config, "--coturn-min-port", str(relay.min_port),
            "--coturn-max-port", str(relay.max_port))
        assert rendered.returncode == 0, rendered.stderr

    stolen = rest_credential(STOLEN, "mallory", int(time.time()) + 3600)
    try:
        render(STOLEN)
        with RenderedCoturn(config, "127.0.0.1", port) as coturn:
            assert accepted(coturn, *stolen)
        render(FRESH)
        with RenderedCoturn(config, "127.0.0.1", port) as coturn:
            assert refused(coturn, *stolen)
            assert accepted(coturn, *rest_credential(FRESH, "alice", int(time.time()) + 3600))
    finally:
        relay.release()
