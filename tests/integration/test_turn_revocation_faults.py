"""RevokeTurnCredentials when coturn's CLI cannot be used, and with hostile requests.

Whatever happens to the CLI, the refusal of new credentials is stored first and holds; the
caller is told, with its own reason, that allocations could not be ended. Bad requests are
INVALID_ARGUMENT (or NOT_FOUND) before anything is revoked or sent to coturn."""

from __future__ import annotations

import pytest

import icegate
from harness.coturn_observed import (
    ObservedCoturn,
    RelayingClient,
    issue_credential,
    live_on_coturn,
    wait_for,
)
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer, ServerFactory
from harness.ports import free_tcp_port
from icegate.v1 import admin_pb2
from icegate_server.clock import SystemClock

PROJECT = "acme"


def _server(factory: ServerFactory, store_url: str, **overrides: object) -> RunningServer:
    server = factory(SystemClock(), store=store_url, **overrides)
    with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.create_project(PROJECT)
    return server


def _revoke_refused(server: RunningServer, error: type[icegate.IcegateError]) -> None:
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        with pytest.raises(error) as refused:
            client.revoke_turn_credentials(PROJECT, user_id="alice")
        assert "password" not in refused.value.message.lower() or \
            "ICEGATE_COTURN_CLI_PASSWORD" in refused.value.message
        # The refusal of new credentials holds all the same.
        with pytest.raises(icegate.TurnCredentialsRevokedError):
            client.issue_turn_credentials("alice", project_id=PROJECT)
        client.issue_turn_credentials("bob", project_id=PROJECT)


def test_without_a_cli_allocations_cannot_be_ended_but_the_refusal_holds(
        server_factory: ServerFactory, store_url: str) -> None:
    server = _server(server_factory, store_url)
    _revoke_refused(server, icegate.CoturnCliNotConfiguredError)


def test_a_cli_nobody_listens_on_is_unavailable(server_factory: ServerFactory,
                                                store_url: str) -> None:
    server = _server(server_factory, store_url, coturn_cli=f"127.0.0.1:{free_tcp_port()}",
                     coturn_cli_password="cli-password-0123")
    _revoke_refused(server, icegate.CoturnCliUnavailableError)


def test_a_wrong_cli_password_is_unavailable_and_never_echoed(
        server_factory: ServerFactory, store_url: str,
        observed_coturn: ObservedCoturn) -> None:
    wrong = "wrong-cli-password-42"
    server = _server(server_factory, store_url, coturn_cli=observed_coturn.cli_address,
                     coturn_cli_password=wrong)
    username, password = issue_credential(server.target, PROJECT, "alice")
    with RelayingClient(observed_coturn, username, password, seconds=30):
        live = wait_for(lambda: live_on_coturn(observed_coturn, username),
                        message="the client's allocations")
        with icegate.Client(server.target, TEST_ADMIN_KEY) as client, \
                pytest.raises(icegate.CoturnCliUnavailableError) as refused:
            client.revoke_turn_credentials(PROJECT, user_id="alice")
        assert wrong not in str(refused.value)
        assert "ICEGATE_COTURN_CLI_PASSWORD" in refused.value.message
        assert live_on_coturn(observed_coturn, username) == live  # nothing was ended
        with icegate.Client(server.target, TEST_ADMIN_KEY) as client, \
                pytest.raises(icegate.TurnCredentialsRevokedError):
            client.issue_turn_credentials("alice", project_id=PROJECT)


def test_a_cli_that_is_not_coturn_is_unavailable(server_factory: ServerFactory,
                                                 store_url: str) -> None:
    # Something that talks, but not coturn's dialogue: an HTTP-ish banner, then silence.
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def answer() -> None:
        connection, _ = listener.accept()
        connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n> > > Total sessions: x\r\n")
        connection.recv(1024)
        connection.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        server = _server(server_factory, store_url,
                         coturn_cli=f"127.0.0.1:{listener.getsockname()[1]}",
                         coturn_cli_password="cli-password-0123")
        _revoke_refused(server, icegate.CoturnCliUnavailableError)
    finally:
        listener.close()


@pytest.mark.parametrize(("request_fields", "field"), [
    ({}, "user_id"),                                       # neither subject
    ({"user_id": "a:b"}, "user_id"),                       # the TURN separator
    ({"user_id": " alice"}, "user_id"),
    ({"user_id": "al\nice"}, "user_id"),
    ({"user_id": "x" * 257}, "user_id"),
    ({"session_id": "not-a-session"}, "session_id"),
    ({"session_id": "ses_\r\ncs 1"}, "session_id"),
    ({"session_id": "ses_" + "a" * 100}, "session_id"),
])
def test_malformed_subjects_are_invalid_arguments(server_factory: ServerFactory, store_url: str,
                                                  request_fields: dict[str, str],
                                                  field: str) -> None:
    server = _server(server_factory, store_url)
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        with pytest.raises(icegate.InvalidArgumentError) as bad:
            client._call(client._admin.RevokeTurnCredentials,  # the raw request, unchecked
                         admin_pb2.RevokeTurnCredentialsRequest(project_id=PROJECT,
                                                                **request_fields), None, ())
        assert [v.field for v in bad.value.field_violations] == [field]


def test_unknown_or_malformed_projects(server_factory: ServerFactory, store_url: str) -> None:
    server = _server(server_factory, store_url)
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        with pytest.raises(icegate.NotFoundError):
            client.revoke_turn_credentials("nosuch", user_id="alice")
        with pytest.raises(icegate.InvalidArgumentError):
            client.revoke_turn_credentials("Bad Project\n", user_id="alice")
        # Only admins may revoke.
        key = client.create_api_key(PROJECT)
    with icegate.Client(server.target, key.secret) as project_key, \
            pytest.raises(icegate.ProjectForbiddenError):
        project_key.revoke_turn_credentials(PROJECT, user_id="alice")
