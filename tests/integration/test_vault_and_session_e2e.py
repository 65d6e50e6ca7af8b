"""Provider keys through the server: sealing, master-key rotation, the command line, and a
session whose ICE servers allocate on a real coturn."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import icegate
from fake_upstreams import FakeUpstream, OpenAIEmulation, OrgaEmulation
from harness.icegate_server import (
    TEST_ADMIN_KEY,
    TEST_MASTER_KEY,
    TEST_TURN_SECRET,
    RunningServer,
    server_settings,
)
from icegate_server.clock import FrozenClock

OPENAI_KEY = "sk-test-VAULT-openai-key-5678"
NEW_MASTER_KEY = base64.b64encode(bytes(range(100, 132))).decode()


@pytest.fixture
def openai():
    with FakeUpstream(OpenAIEmulation(OPENAI_KEY)) as fake:
        yield fake


def run_server(tmp_path, openai, master_key, transport="grpc", **overrides):
    settings = server_settings(tmp_path, master_key=master_key, openai_base_url=openai.base_url,
                               **overrides)
    return RunningServer(settings, FrozenClock(time.time()), transport=transport)


def test_master_key_rotation_reseals_every_key(tmp_path, openai):
    with run_server(tmp_path, openai, TEST_MASTER_KEY) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.create_project("acme")
        admin.set_provider_key("acme", "openai", OPENAI_KEY)
        admin.set_provider_key("default", "openai", OPENAI_KEY)

    database = (tmp_path / "icegate.sqlite3").read_bytes()
    assert OPENAI_KEY.encode() not in database

    # A new master key first, the old one still accepted for reading.
    with run_server(tmp_path, openai, f"{NEW_MASTER_KEY},{TEST_MASTER_KEY}") as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.create_session("openai", project_id="acme")
        report = admin.reseal_provider_keys()
        assert (report.resealed, report.unchanged, report.failed) == (2, 0, 0)
        assert admin.reseal_provider_keys().unchanged == 2

    # The old master key retired: resealed keys still open.
    with run_server(tmp_path, openai, NEW_MASTER_KEY) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        assert admin.create_session("openai", project_id="acme").ephemeral_token.value


def test_a_wrong_master_key_cannot_open_the_keys(tmp_path, openai):
    with run_server(tmp_path, openai, TEST_MASTER_KEY) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.set_provider_key("default", "openai", OPENAI_KEY)
    with run_server(tmp_path, openai, NEW_MASTER_KEY) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        with pytest.raises(icegate.UpstreamNotConfiguredError) as caught:
            admin.create_session("openai")
        assert "master key" in caught.value.message
        assert OPENAI_KEY not in str(caught.value)
        # The key is opened after the lease is taken: both are given back.
        sessions = admin.get_usage().sessions
        assert (sessions.used_this_month, sessions.active) == (0, 0)
    assert openai.requests_to("/v1/realtime/client_secrets") == []


def test_provider_key_set_reads_standard_input_only(tmp_path, openai, transport):
    icegate_cli = str(Path(sys.executable).parent / "icegate")
    with run_server(tmp_path, openai, TEST_MASTER_KEY, transport) as server:
        env = {"ICEGATE_TARGET": server.target, "ICEGATE_API_KEY": TEST_ADMIN_KEY,
               "PATH": "/usr/bin:/bin"}
        result = subprocess.run(
            [icegate_cli, "admin", "provider-key", "set", "--project", "default",
             "--provider", "openai"], input=OPENAI_KEY + "\n", env=env, capture_output=True,
            text=True, check=True)
        assert OPENAI_KEY not in result.stdout
        assert json.loads(result.stdout)["last4"] == "…5678"
        listed = subprocess.run(
            [icegate_cli, "admin", "provider-key", "list", "--project", "default"], env=env,
            capture_output=True, text=True, check=True)
        assert OPENAI_KEY not in listed.stdout
        assert [k["provider"] for k in json.loads(listed.stdout)] == ["openai"]
        created = subprocess.run(
            [icegate_cli, "session", "create", "--provider", "openai", "--voice", "echo"],
            env=env, capture_output=True, text=True, check=True)
        browser = json.loads(created.stdout)["browser"]
        assert browser["ephemeralToken"].startswith("ek_")
        assert [s["urls"][0].split(":")[0] for s in browser["iceServers"]] == ["stun", "turn"]
        session_id = json.loads(created.stdout)["session_id"]
        ended = subprocess.run([icegate_cli, "session", "end", session_id], env=env,
                               capture_output=True, text=True)
        assert ended.returncode == 0, ended.stderr
    # argv has no way to carry the key: the set command takes no such argument.
    usage = subprocess.run([icegate_cli, "admin", "provider-key", "set", "--help"],
                           capture_output=True, text=True, check=True).stdout
    assert "--api-key" not in usage and "--key" not in usage


def test_orga_session_returns_its_ice_servers_beside_icegates(tmp_path):
    orga_key = "orga-test-key-abcdef"
    with FakeUpstream(OrgaEmulation(orga_key)) as orga, \
            RunningServer(server_settings(tmp_path, orga_base_url=orga.base_url)) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.set_provider_key("default", "orga", orga_key)
        with pytest.raises(icegate.InvalidArgumentError) as caught:
            admin.create_session("orga")  # Orga would answer 401 as if the key were wrong
        created = admin.create_session("orga", email="dev@example.test")
        used = admin.get_usage("default").sessions.used_this_month
    assert [v.field for v in caught.value.field_violations] == ["email"]
    assert used == 1, "the refused call gave its quota unit back"
    assert len(orga.requests_to("/v1/realtime/client-secrets")) == 1
    assert created.ephemeral_token.value
    assert created.provider_ice_servers, "Orga's own ICE servers come back"
    assert [s.urls[0].split(":")[0] for s in created.ice_servers] == ["stun", "turn"]


@pytest.mark.coturn
def test_session_ice_servers_allocate_on_a_real_coturn(tmp_path, openai, coturn_factory):
    coturn = coturn_factory([TEST_TURN_SECRET])
    with run_server(tmp_path, openai, TEST_MASTER_KEY, turn_uris=(coturn.turn_uri,)) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.set_provider_key("default", "openai", OPENAI_KEY)
        created = admin.create_session("openai", user_id="alice")
    turn = created.ice_servers[-1]
    assert list(turn.urls) == [coturn.turn_uri]
    assert created.ephemeral_token.value.startswith("ek_")
    result = coturn.allocate(turn.username, turn.credential)
    assert result.ok, result.output
