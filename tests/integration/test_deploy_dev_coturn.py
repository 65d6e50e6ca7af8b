"""`make coturn` beside `make run` follows `icegate admin turn-secret rotate`: the dev set-up
keeps coturn's SQLite userdb in step, so a credential signed with the rotated secret is
accepted by the running coturn, without a restart.

`make coturn` runs for real (its coturn in the foreground, in DEV_DIR=<tmp>); icegate runs as
`make run` starts it, with the settings the Makefile's recipe gives it (read from `make -n`,
since `make run` would regenerate the committed stubs first).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import icegate
from harness.icegate_server import TEST_ADMIN_KEY
from harness.ports import free_tcp_udp_port, reserve_relay_range
from harness.pytest_plugin import require_binaries
from harness.server_process import ServerProcess
from harness.turn_client import TurnClient, wait_until_answering

pytestmark = pytest.mark.coturn

REPO = Path(__file__).resolve().parents[2]


def make_dry_run(target: str, dev_dir: Path) -> str:
    return subprocess.run(["make", "-s", "-n", target, f"DEV_DIR={dev_dir}"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True).stdout


def run_settings(dev_dir: Path) -> dict[str, str]:
    """The ICEGATE_* assignments `make run` puts before icegate-server, defaults resolved."""
    (line,) = [line for line in make_dry_run("run", dev_dir).splitlines()
               if "icegate-server" in line]
    return {name: default for name, default in
            re.findall(r"(ICEGATE_[A-Z_]+)=\$\{ICEGATE_[A-Z_]+-([^}]*)\}", line)}


def issued(client: icegate.Client) -> tuple[str, str]:
    credential = client.issue_turn_credentials("dev-user", ttl=600)
    return credential.username, credential.password


def test_make_coturn_follows_a_rotation(tmp_path):
    require_binaries("turnserver", "make")
    dev_dir = tmp_path / "dev"
    port = free_tcp_udp_port()
    relay = reserve_relay_range()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICEGATE_")}
    env.update(ICEGATE_TURN_URIS=f"turn:127.0.0.1:{port}?transport=udp",
               ICEGATE_STUN_URIS=f"stun:127.0.0.1:{port}")
    settings = run_settings(dev_dir)
    assert settings["ICEGATE_COTURN_SQLITE"] == f"{dev_dir}/coturn/turndb"
    make = subprocess.Popen(
        ["make", "-s", "coturn", f"DEV_DIR={dev_dir}",
         f"ARGS=--coturn-min-port {relay.min_port} --coturn-max-port {relay.max_port}"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        wait_until_answering("127.0.0.1", port, timeout=60)
        # `make run`'s server: its settings, and the dev secrets coturn-config made in DEV_DIR.
        server = ServerProcess(tmp_path / "server", **{
            name.removeprefix("ICEGATE_").lower(): value for name, value in settings.items()})
        for name in ("ICEGATE_TURN_SECRETS", "ICEGATE_MASTER_KEY"):
            server.env.pop(name)
        server.env.update(ICEGATE_DEV_SECRETS="true",
                          ICEGATE_TURN_URIS=env["ICEGATE_TURN_URIS"])
        with server:
            with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
                before = issued(admin)
                assert allocate(port, *before) == 0
                admin.rotate_turn_secret()  # no --coturn-restart-planned: coturn follows
                after = issued(admin)
            assert after[1] != before[1]
            assert allocate(port, *after) == 0  # the new signer, at once, no restart
            assert allocate(port, *before) == 0  # the old one until its credentials expire
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(20)
        relay.release()


def allocate(port: int, username: str, password: str) -> int:
    deadline = time.monotonic() + 5
    while True:  # icegate writes the userdb right after the rotation answers; allow a beat
        with TurnClient("127.0.0.1", port) as client:
            code = client.allocate(username, password).code
        if code == 0 or time.monotonic() > deadline:
            return code
        time.sleep(0.2)
