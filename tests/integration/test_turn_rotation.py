"""TURN secret rotation through icegate, followed by a real coturn reading a real Redis."""

from __future__ import annotations

import time

import grpc
import pytest

import icegate
from harness.coturn import redis_secret_key
from harness.icegate_server import (
    TEST_ADMIN_KEY,
    TEST_MASTER_KEY,
    TEST_TURN_SECRET,
    RunningServer,
    server_settings,
)
from icegate_server.clock import FrozenClock

pytestmark = [pytest.mark.coturn, pytest.mark.redis]
REALM = "icegate.test"


def credential(client: icegate.Client) -> tuple[str, str]:
    issued = client.issue_turn_credentials("alice", ttl=60)
    return issued.username, issued.password


def coturn_secrets(redis_server) -> set[str]:
    return {m.decode() for m in redis_server.command("SMEMBERS", redis_secret_key(REALM))}


def test_rotation_and_retirement_without_restarting_coturn(tmp_path, redis_server,
                                                           coturn_factory):
    coturn = coturn_factory(realm=REALM, redis_port=redis_server.port)
    settings = server_settings(
        tmp_path, turn_realm=REALM, turn_uris=(coturn.turn_uri,), coturn_redis=redis_server.url,
        turn_ttl_min=60, turn_ttl_default=60, turn_ttl_max=120)
    with RunningServer(settings, FrozenClock(time.time())) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        # At start icegate writes the secrets in force into coturn's Redis set.
        assert coturn_secrets(redis_server) == {TEST_TURN_SECRET}
        static_signed = credential(admin)

        after_first = admin.rotate_turn_secret()
        assert [s.source for s in after_first] == ["ring", "settings"]
        assert after_first[0].signing
        first_ring_signed = credential(admin)
        assert first_ring_signed[1] != static_signed[1]

        server.clock.advance(1)
        after_second = admin.rotate_turn_secret()
        retiring = after_second[1]
        assert retiring.secret_id == after_first[0].secret_id
        assert retiring.retire_time.seconds == int(server.clock.now()) + 120
        second_ring_signed = credential(admin)
        assert len(coturn_secrets(redis_server)) == 3
        assert TEST_TURN_SECRET.encode() not in b"".join(
            s.SerializeToString() for s in after_second)

        for result in coturn.allocate_each([static_signed, first_ring_signed,
                                            second_ring_signed]):
            assert result.ok, result.output

        # Past the longest TTL the retired secret leaves icegate and coturn.
        server.clock.advance(120)
        in_force = admin.list_turn_secrets()
        assert [s.secret_id for s in in_force] == [after_second[0].secret_id,
                                                   after_second[2].secret_id]
        assert len(coturn_secrets(redis_server)) == 2
        retired, kept = coturn.allocate_each([first_ring_signed, second_ring_signed])
        assert not retired.ok
        assert kept.ok, kept.output


def test_every_replica_signs_with_the_new_secret(tmp_path, redis_server):
    # Replicas share a Redis (one SQLite file belongs to one process).
    store = redis_server.url
    first = RunningServer(server_settings(tmp_path / "a", store=store))
    second = RunningServer(server_settings(tmp_path / "b", store=store))
    try:
        with icegate.Client(first.target, TEST_ADMIN_KEY) as a, \
                icegate.Client(second.target, TEST_ADMIN_KEY) as b:
            # No coturn here: the override says coturn is restarted by other means.
            signer = a.rotate_turn_secret(coturn_restart_planned=True)[0].secret_id
            deadline = time.monotonic() + 5
            while b.list_turn_secrets()[0].secret_id != signer:
                assert time.monotonic() < deadline, "the other replica never saw the rotation"
                time.sleep(0.1)
            assert a.issue_turn_credentials("u").password == \
                b.issue_turn_credentials("u").password
    finally:
        first.stop()
        second.stop()


def test_coturn_config_from_icegate_settings_runs_a_matching_coturn(tmp_path, redis_server,
                                                                   coturn_factory):
    """`icegate-server coturn-config` renders a coturn that accepts icegate's credentials."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from harness.coturn import _stun_binding_answered
    from harness.ports import free_tcp_udp_port

    port = free_tcp_udp_port()
    turn_uri = f"turn:127.0.0.1:{port}?transport=udp"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICEGATE_")}
    env.update(ICEGATE_TURN_URIS=turn_uri, ICEGATE_TURN_REALM=REALM,
               ICEGATE_COTURN_REDIS=redis_server.url, ICEGATE_TURN_SECRETS=TEST_TURN_SECRET,
               ICEGATE_API_KEYS=TEST_ADMIN_KEY, ICEGATE_MASTER_KEY=TEST_MASTER_KEY,
               ICEGATE_DATA_DIR=str(tmp_path / "data"))
    config = tmp_path / "turnserver.conf"
    # Loopback peers: the probe below relays between two allocations on 127.0.0.1.
    subprocess.run([str(Path(sys.executable).parent / "icegate-server"), "coturn-config",
                    "--coturn-allow-loopback-peers", "--output", str(config)], env=env,
                   check=True, timeout=30)
    assert (config.stat().st_mode & 0o777) == 0o600
    text = config.read_text()
    assert f"realm={REALM}" in text and f"listening-port={port}" in text
    assert "\nstatic-auth-secret=" not in text  # coturn reads the secrets from Redis

    settings = server_settings(tmp_path / "icegate", turn_realm=REALM, turn_uris=(turn_uri,),
                               coturn_redis=redis_server.url)
    coturn = subprocess.Popen(["turnserver", "-c", str(config)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        assert any(_stun_binding_answered("127.0.0.1", port, 0.2) for _ in range(50))
        with RunningServer(settings, FrozenClock(time.time())) as server, \
                icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
            admin.rotate_turn_secret()
            username, password = credential(admin)
        probe = coturn_factory([TEST_TURN_SECRET], realm=REALM)  # borrow its client binary
        result = subprocess.run(
            [probe.client_binary, "-p", str(port), "-n", "1", "-m", "1", "-l", "100", "-y",
             "-u", username, "-w", password, "-e", "127.0.0.1", "127.0.0.1"],
            capture_output=True, timeout=20)
        assert result.returncode == 0, result.stdout[-500:]
    finally:
        coturn.terminate()
        coturn.wait(10)


def test_automatic_rotation_on_an_interval(tmp_path):
    settings = server_settings(tmp_path, turn_rotate_interval=3600,
                               coturn_sqlite=str(tmp_path / "coturn.sqlite3"))
    with RunningServer(settings, FrozenClock(time.time())) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:

        def signer_after(previous: str | None) -> str:
            deadline = time.monotonic() + 5
            while True:
                current = admin.list_turn_secrets()[0]
                if current.source == "ring" and current.secret_id != previous:
                    return current.secret_id
                assert time.monotonic() < deadline, "no automatic rotation happened"
                time.sleep(0.1)

        first = signer_after(None)  # the first ring secret appears by itself
        time.sleep(1.5)
        assert admin.list_turn_secrets()[0].secret_id == first  # not due yet
        server.clock.advance(3600)
        second = signer_after(first)
        ring = admin.list_turn_secrets()
        assert [s.secret_id for s in ring[:2]] == [second, first]
        assert ring[1].retire_time.seconds == int(server.clock.now()) + 86400


# -- rotation that coturn would not follow --------------------------------------------------


def test_rotation_without_a_coturn_database_is_refused_unless_planned(tmp_path):
    """No userdb icegate keeps: coturn would refuse every credential the new secret signs."""
    settings = server_settings(tmp_path)  # neither coturn_redis nor coturn_sqlite
    with RunningServer(settings) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        before = credential(admin)
        with pytest.raises(icegate.CoturnOutOfStepError) as refused:
            admin.rotate_turn_secret()
        assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.reason == "COTURN_OUT_OF_STEP"
        assert "ICEGATE_COTURN_REDIS" in refused.value.message
        assert "coturn_restart_planned" in refused.value.message
        # Nothing rotated: the settings secret still signs, as coturn expects.
        assert [s.source for s in admin.list_turn_secrets()] == ["settings"]
        assert credential(admin)[1] == before[1]

        async def rotate_async(planned: bool) -> list[str]:
            async with icegate.AsyncClient(server.target, TEST_ADMIN_KEY) as client:
                return [s.source for s in
                        await client.rotate_turn_secret(coturn_restart_planned=planned)]

        with pytest.raises(icegate.CoturnOutOfStepError):
            server.run(rotate_async(False))

        # The override: the operator restarts coturn with the new secrets.
        assert [s.source for s in admin.rotate_turn_secret(coturn_restart_planned=True)] == [
            "ring", "settings"]
        assert credential(admin)[1] != before[1]
        assert server.run(rotate_async(True))[0] == "ring"


def test_cli_rotation_needs_the_flag_without_a_coturn_database(tmp_path, monkeypatch, capsys):
    from icegate.cli import main as cli_main

    with RunningServer(server_settings(tmp_path)) as server:
        monkeypatch.setenv("ICEGATE_TARGET", server.target)
        monkeypatch.setenv("ICEGATE_API_KEY", TEST_ADMIN_KEY)
        assert cli_main(["admin", "turn-secret", "rotate"]) == 1
        err = capsys.readouterr().err
        assert "FAILED_PRECONDITION COTURN_OUT_OF_STEP" in err and err[-1] == "\n"
        assert cli_main(["admin", "turn-secret", "list"]) == 0
        assert '"source": "ring"' not in capsys.readouterr().out
        assert cli_main(["admin", "turn-secret", "rotate", "--coturn-restart-planned"]) == 0
        assert '"source": "ring"' in capsys.readouterr().out


def test_rotation_with_a_sqlite_userdb_keeps_a_real_coturn_in_step(tmp_path, coturn_factory):
    """ICEGATE_COTURN_SQLITE: coturn reads the secrets icegate writes, no restart, no flag."""
    userdb = tmp_path / "coturn" / "turndb"
    userdb.parent.mkdir()
    settings = server_settings(tmp_path / "icegate", turn_realm=REALM,
                               coturn_sqlite=str(userdb), turn_ttl_min=60,
                               turn_ttl_default=60, turn_ttl_max=120)
    with RunningServer(settings, FrozenClock(time.time())) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        # icegate wrote the settings secret at start; coturn reads only its database here.
        coturn = coturn_factory(realm=REALM, sqlite_userdb=userdb)
        old = credential(admin)
        admin.rotate_turn_secret()  # no override needed: coturn follows
        new = credential(admin)
        assert new[1] != old[1]
        for signed in (old, new):
            result = coturn.allocate(*signed)
            assert result.ok, result.output


def test_what_the_override_accepts_coturn_refuses_the_new_credentials(tmp_path, coturn_factory):
    """The defect the refusal prevents: rotated without a userdb, coturn knows no new secret."""
    coturn = coturn_factory([TEST_TURN_SECRET], realm=REALM)
    settings = server_settings(tmp_path, turn_realm=REALM, turn_uris=(coturn.turn_uri,))
    with RunningServer(settings, FrozenClock(time.time())) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        before = credential(admin)
        admin.rotate_turn_secret(coturn_restart_planned=True)
        after = credential(admin)
    assert coturn.allocate(*before).ok
    assert not coturn.allocate(*after).ok  # the silent breakage, now only by explicit choice
