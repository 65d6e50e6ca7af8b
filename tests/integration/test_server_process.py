"""The `icegate-server` and `icegate` commands as an operator and a script use them."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def command(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is not installed in {BIN}"
    return str(path)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICEGATE_")}
    env.update(extra)
    return env


def wait_serving(target: str, cwd: Path, env: dict[str, str], process: subprocess.Popen[str]
                 ) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early: {process.stderr.read()}")  # type: ignore[union-attr]
        result = subprocess.run([command("icegate"), "--target", target, "--timeout", "1",
                                 "health"], cwd=cwd, env=env, capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip() == "SERVING":
            return
        time.sleep(0.1)
    raise AssertionError("server did not report SERVING within 20 s")


@pytest.fixture
def dev_server(tmp_path, free_port_unused):
    """`icegate-server` started with nothing configured, as `make run` does, in tmp_path."""
    target = f"127.0.0.1:{free_port_unused}"
    env = clean_env(ICEGATE_LISTEN=target)
    process = subprocess.Popen([command("icegate-server")], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(target, tmp_path, env, process)
        yield process, target, env
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def test_first_start_generates_dev_secrets_kept_private(dev_server, tmp_path):
    secrets_file = tmp_path / ".icegate" / "dev-secrets.json"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert (tmp_path / ".icegate" / "icegate.sqlite3").exists()
    assert stat.S_IMODE((tmp_path / ".icegate" / "icegate.sqlite3").stat().st_mode) == 0o600


def test_cli_ice_servers_prints_an_rtc_ice_server_list(dev_server, tmp_path):
    _, target, env = dev_server
    result = subprocess.run([command("icegate"), "--target", target, "ice-servers", "--user",
                             "alice"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=True)
    servers = json.loads(result.stdout)
    assert isinstance(servers, list) and servers
    for server in servers:
        urls = server["urls"]
        assert isinstance(urls, list) and all(u.split(":")[0] in {"stun", "turn", "turns"}
                                              for u in urls)
        if any(u.startswith("turn") for u in urls):
            assert server["username"].endswith(":default/alice")
            assert server["username"].split(":")[0].isdigit()
            assert len(server["credential"]) == 28  # base64 of a 20-byte HMAC-SHA1
        else:
            assert set(server) == {"urls"}


def test_cli_turn_credentials(dev_server, tmp_path):
    _, target, env = dev_server
    result = subprocess.run([command("icegate"), "--target", target, "turn-credentials",
                             "--user", "alice", "--ttl", "600"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, check=True)
    answer = json.loads(result.stdout)
    assert answer["ttl"] == 600
    assert set(answer) == {"username", "password", "ttl", "expires_at", "uris"}
    expiry = int(answer["username"].split(":")[0])
    assert abs(expiry - (time.time() + 600)) < 30


def test_cli_reports_bad_input_on_one_line(dev_server, tmp_path):
    _, target, env = dev_server
    result = subprocess.run([command("icegate"), "--target", target, "turn-credentials",
                             "--user", "a:b"], cwd=tmp_path, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "user_id" in result.stderr


def test_restart_keeps_the_dev_secrets_and_sigterm_exits_zero(dev_server, tmp_path):
    process, target, env = dev_server
    secrets_before = (tmp_path / ".icegate" / "dev-secrets.json").read_text()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0

    restarted = subprocess.Popen([command("icegate-server")], cwd=tmp_path, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(target, tmp_path, env, restarted)
        assert (tmp_path / ".icegate" / "dev-secrets.json").read_text() == secrets_before
        key = json.loads(secrets_before)["api_key"]
        other_dir = tmp_path / "elsewhere"
        other_dir.mkdir()
        result = subprocess.run([command("icegate"), "--target", target, "ice-servers",
                                 "--user", "bob"], cwd=other_dir,
                                env={**env, "ICEGATE_API_KEY": key},
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        restarted.send_signal(signal.SIGINT)
        assert restarted.wait(timeout=15) == 0
    finally:
        if restarted.poll() is None:
            restarted.kill()
        restarted.communicate(timeout=10)


def test_server_logs_no_secret(dev_server, tmp_path):
    process, target, env = dev_server
    subprocess.run([command("icegate"), "--target", target, "ice-servers", "--user", "zed"],
                   cwd=tmp_path, env=env, capture_output=True, check=True)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=15)
    stored = json.loads((tmp_path / ".icegate" / "dev-secrets.json").read_text())
    for name in ("api_key", "turn_secret", "master_key"):  # not where it listens: no secret
        assert stored[name] not in out + err


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"ICEGATE_TURN_TTL_MAX": "abc"}, "ICEGATE_TURN_TTL_MAX"),
        ({"ICEGATE_TURN_TTL_MIN": "7200", "ICEGATE_TURN_TTL_MAX": "60"}, "ICEGATE_TURN_TTL_MAX"),
        ({"ICEGATE_LISTEN": "nonsense"}, "ICEGATE_LISTEN"),
        ({"ICEGATE_TURN_SECRETS": "short"}, "ICEGATE_TURN_SECRETS"),
        ({"ICEGATE_TURN_URIS": "http://x"}, "ICEGATE_TURN_URIS"),
        ({"ICEGATE_STORE": "postgres://x"}, "ICEGATE_STORE"),
        ({"ICEGATE_DEV_SECRETS": "false"}, "ICEGATE_TURN_SECRETS"),
    ],
)
def test_bad_setting_stops_the_server_with_one_line(tmp_path, env, setting):
    result = subprocess.run([command("icegate-server")], cwd=tmp_path, env=clean_env(**env),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and setting in lines[0], result.stderr
    assert "short" not in lines[0]  # a secret's value is never echoed
    assert not (tmp_path / ".icegate").exists()  # nothing started half-configured


def test_bad_flag_names_the_flag(tmp_path):
    result = subprocess.run([command("icegate-server"), "--turn-ttl-default", "10"],
                            cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "ICEGATE_TURN_TTL_DEFAULT" in result.stderr


def test_port_in_use_is_refused(dev_server, tmp_path):
    _, _, env = dev_server
    other = tmp_path / "second"
    other.mkdir()
    result = subprocess.run([command("icegate-server")], cwd=other, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "in use" in result.stderr or "listen" in result.stderr
