"""Revoking TURN credentials against a real coturn 4.6.1 and its admin CLI.

`icegate admin turn revoke` ends a relaying client's allocations on coturn (gone from coturn's
own session list by the time the call answers), refuses fresh credentials for that user on
every call that issues them, and leaves other users alone. A realtime session's allocations
end when the session is ended, when its lease expires, or when the session is revoked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

import icegate
from fake_upstreams import FakeUpstream, OpenAIEmulation
from harness.coturn_observed import (
    ObservedCoturn,
    RelayingClient,
    StatsTotals,
    coturn_cli_sessions,
    issue_credential,
    live_on_coturn,
    turn_usage,
    wait_for,
)
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer, ServerFactory
from harness.redis_server import RedisServer
from icegate.cli import main as icegate_cli
from icegate_server.clock import SystemClock

PROJECT = "acme"
OPENAI_KEY = "sk-test-SECRET-openai-key-1234"
TTL_MAX = 7200


@pytest.fixture
def openai() -> Iterator[FakeUpstream]:
    with FakeUpstream(OpenAIEmulation(OPENAI_KEY)) as fake:
        yield fake


@pytest.fixture
def server(server_factory: ServerFactory, store_url: str, stats_redis: RedisServer,
           observed_coturn: ObservedCoturn, openai: FakeUpstream,
           monkeypatch: pytest.MonkeyPatch) -> RunningServer:
    monkeypatch.setenv("ICEGATE_API_KEY", TEST_ADMIN_KEY)
    server = server_factory(SystemClock(), store=store_url, coturn_statsdb=stats_redis.url,
                            coturn_cli=observed_coturn.cli_address,
                            coturn_cli_password=observed_coturn.cli_password,
                            turn_ttl_max=TTL_MAX, openai_base_url=openai.base_url,
                            session_lease_seconds=3)
    with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.create_project(PROJECT)
        admin.set_provider_key(PROJECT, "openai", OPENAI_KEY)
    return server


def _revoke(server: RunningServer, capsys: pytest.CaptureFixture[str], *whose: str) -> dict:
    code = icegate_cli(["--target", server.target, "admin", "turn", "revoke",
                        "--project", PROJECT, *whose])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _relaying(coturn: ObservedCoturn, username: str, password: str) -> tuple[RelayingClient, int]:
    client = RelayingClient(coturn, username, password, seconds=60)
    live = wait_for(lambda: (n := live_on_coturn(coturn, username)) >= 2 and n,
                    message="the client's allocations")
    return client, live


def test_revoke_cuts_a_relaying_user_and_refuses_it_fresh_credentials(
        server: RunningServer, observed_coturn: ObservedCoturn,
        capsys: pytest.CaptureFixture[str]) -> None:
    alice, alice_live = _relaying(observed_coturn, *issue_credential(server.target, PROJECT,
                                                                     "alice"))
    bob, bob_live = _relaying(observed_coturn, *issue_credential(server.target, PROJECT, "bob"))
    with alice, bob:
        started = time.monotonic()
        revoked = _revoke(server, capsys, "--user", "alice")
        took = time.monotonic() - started
        # Gone from coturn's own list by the time the call answered; bob's untouched.
        assert revoked["allocations_ended"] == alice_live
        listed = [username for _, username in coturn_cli_sessions(observed_coturn)]
        assert not any(u.endswith(f":{PROJECT}/alice") for u in listed)
        assert sum(u.endswith(f":{PROJECT}/bob") for u in listed) == bob_live
        print(f"revoke ended {alice_live} allocations in {took * 1000:.0f} ms")
        # The stats stream tells icegate too: only bob's allocations are live.
        wait_for(lambda: turn_usage(server.target, PROJECT, "alice").user.live_allocations == 0
                 and turn_usage(server.target, PROJECT).live_allocations == bob_live,
                 message="the ends metered")
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        for issue in (lambda: client.issue_turn_credentials("alice", project_id=PROJECT),
                      lambda: client.get_ice_servers("alice", project_id=PROJECT),
                      lambda: client.create_session("openai", project_id=PROJECT,
                                                    user_id="alice")):
            with pytest.raises(icegate.TurnCredentialsRevokedError) as refused:
                issue()
            assert refused.value.revoked_until is not None
            until = refused.value.revoked_until.timestamp()
            assert abs(until - (time.time() + TTL_MAX)) < 60
        client.issue_turn_credentials("bob", project_id=PROJECT)
        # Revoking again is safe: nothing left to end, the refusal stays.
        again = client.revoke_turn_credentials(PROJECT, user_id="alice")
        assert again.allocations_ended == 0
        assert abs(again.revoked_until.seconds - until) <= 1


def test_a_credential_issued_before_the_revocation_is_cut_when_used(
        server: RunningServer, observed_coturn: ObservedCoturn,
        coturn_totals: StatsTotals) -> None:
    # Issued, not yet used: it cannot be unsigned, and coturn accepts it until it expires...
    username, password = issue_credential(server.target, PROJECT, "frank")
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        wait_for(lambda: client.get_usage(PROJECT).turn.metering
                 == icegate.v1.usage_pb2.TURN_METERING_LIVE, message="metering live")
        assert client.revoke_turn_credentials(PROJECT, user_id="frank").allocations_ended == 0
    # ...but the allocations it opens are ended as soon as coturn reports them.
    with RelayingClient(observed_coturn, username, password, seconds=60) as relaying:
        # coturn reports them ended while the client still means to relay for a minute: it is
        # still running, or it already failed because it was cut (it never finished its run).
        wait_for(lambda: coturn_totals.ended(username) >= 2,
                 message="the revoked credential's allocations ended")
        assert relaying.process.poll() != 0
        wait_for(lambda: live_on_coturn(observed_coturn, username) == 0,
                 message="none left on coturn")


def test_a_revocation_can_be_lifted(server: RunningServer,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        assert client.revoke_turn_credentials(PROJECT, user_id="erin").allocations_ended == 0
        with pytest.raises(icegate.TurnCredentialsRevokedError):
            client.issue_turn_credentials("erin", project_id=PROJECT)
    code = icegate_cli(["--target", server.target, "admin", "turn", "restore",
                        "--project", PROJECT, "--user", "erin"])
    assert code == 0
    assert json.loads(capsys.readouterr().out) == {"was_revoked": True}
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        client.issue_turn_credentials("erin", project_id=PROJECT)
        assert client.restore_turn_credentials(PROJECT, user_id="erin") is False


def test_ending_a_session_ends_its_allocations_and_no_other(
        server: RunningServer, observed_coturn: ObservedCoturn) -> None:
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        # Two sessions of one user: credentials of different lifetimes, so their usernames
        # differ even when issued in the same second.
        first = client.create_session("openai", project_id=PROJECT, user_id="carol")
        second = client.create_session("openai", project_id=PROJECT, user_id="carol",
                                       turn_ttl=600)
        usernames, clients = [], []
        try:
            for created in (first, second):
                turn = next(s for s in created.ice_servers if s.username)
                usernames.append(turn.username)
                clients.append(_relaying(observed_coturn, turn.username, turn.credential)[0])
            client.keep_alive_session(second.session_id, project_id=PROJECT)
            client.end_session(first.session_id, project_id=PROJECT)
            wait_for(lambda: live_on_coturn(observed_coturn, usernames[0]) == 0,
                     message="the ended session's allocations ended")
            assert live_on_coturn(observed_coturn, usernames[1]) >= 2
            # The second is not kept alive: its lease expires, and its allocations end too.
            wait_for(lambda: live_on_coturn(observed_coturn, usernames[1]) == 0,
                     message="the expired session's allocations ended")
        finally:
            for relaying in clients:
                relaying.stop()


def test_revoking_a_session_ends_its_allocations(
        server: RunningServer, observed_coturn: ObservedCoturn,
        capsys: pytest.CaptureFixture[str]) -> None:
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        with_user = client.create_session("openai", project_id=PROJECT, user_id="dave")
        without = client.create_session("openai", project_id=PROJECT)
    relaying = []
    try:
        for created in (with_user, without):
            turn = next(s for s in created.ice_servers if s.username)
            relaying.append((turn.username,
                             _relaying(observed_coturn, turn.username, turn.credential)))
        for (username, (_, live)), created in zip(relaying, (with_user, without), strict=True):
            revoked = _revoke(server, capsys, "--session", created.session_id)
            assert revoked["allocations_ended"] == live
            assert live_on_coturn(observed_coturn, username) == 0
        # A session's revocation bars the session's id, not its user.
        issue_credential(server.target, PROJECT, "dave")
        with icegate.Client(server.target, TEST_ADMIN_KEY) as client, \
                pytest.raises(icegate.TurnCredentialsRevokedError):
            client.issue_turn_credentials(without.session_id, project_id=PROJECT)
    finally:
        for _, (client_process, _) in relaying:
            client_process.stop()
