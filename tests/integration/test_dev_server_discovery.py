"""`icegate` (the command) finds the `make run` dev server on whatever port it took.

The dev server records where it listens in `.icegate/dev-secrets.json`; the command (and any
client) started in that directory dials it when ICEGATE_TARGET is not set.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import icegate
from harness.ports import free_tcp_port
from harness.redis_server import RedisServer

BIN = Path(sys.executable).parent


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICEGATE_")}
    env.update(extra)
    return env


def icegate_command(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "icegate"), "--timeout", "5", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def recorded(path: Path, process: subprocess.Popen[str]) -> dict[str, str]:
    """The dev secrets file once the server wrote where it listens."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early: {process.communicate()[1]}")
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}
        if "grpc_target" in stored:
            return stored  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError("the dev server did not record where it listens within 30 s")


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[Path, dict[str, str]]]:
    """`icegate-server` as `make run ARGS="--listen 127.0.0.1:0 ..."` starts it: nothing
    configured but where it listens, any free port."""
    workdir = tmp_path_factory.mktemp("devserver")
    process = subprocess.Popen(
        [str(BIN / "icegate-server"), "--listen", "127.0.0.1:0",
         "--http-listen", "127.0.0.1:0"],
        cwd=workdir, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        stored = recorded(workdir / ".icegate" / "dev-secrets.json", process)
        yield workdir, stored
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=15)


def test_the_dev_server_records_where_it_listens(dev_server: tuple[Path, dict[str, str]]
                                                 ) -> None:
    workdir, stored = dev_server
    host, _, port = stored["grpc_target"].rpartition(":")
    assert host == "127.0.0.1" and int(port) not in (0, 50051)
    assert stored["http_url"].startswith("http://127.0.0.1:")
    assert stored["http_url"] != f"http://127.0.0.1:{port}"
    # Still the private secrets file it was (it holds the dev key).
    assert stat.S_IMODE((workdir / ".icegate" / "dev-secrets.json").stat().st_mode) == 0o600
    assert {"api_key", "turn_secret", "master_key"} <= set(stored)


def test_the_command_finds_it_with_nothing_set(dev_server: tuple[Path, dict[str, str]]) -> None:
    workdir, _ = dev_server
    assert icegate_command("health", cwd=workdir, env=clean_env()).stdout.strip() == "SERVING"
    servers = icegate_command("ice-servers", "--user", "alice", cwd=workdir, env=clean_env())
    assert servers.returncode == 0, servers.stderr
    assert any(entry.get("credential") for entry in json.loads(servers.stdout))


def test_the_recorded_http_url_serves_connect(dev_server: tuple[Path, dict[str, str]]) -> None:
    _, stored = dev_server
    with icegate.Client(stored["http_url"], stored["api_key"]) as client:
        assert client.health() == "SERVING"


def test_icegate_target_still_wins(dev_server: tuple[Path, dict[str, str]]) -> None:
    workdir, _ = dev_server
    elsewhere = f"127.0.0.1:{free_tcp_port()}"
    result = icegate_command("health", cwd=workdir, env=clean_env(ICEGATE_TARGET=elsewhere))
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr


@pytest.mark.parametrize("recorded_target", [
    "evil.example:50051\nextra", "host:port", "", "x" * 300 + ":1", "127.0.0.1:1/../2",
])
def test_a_tampered_record_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      recorded_target: str) -> None:
    (tmp_path / ".icegate").mkdir()
    (tmp_path / ".icegate" / "dev-secrets.json").write_text(
        json.dumps({"api_key": "igk_dev_key", "grpc_target": recorded_target}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ICEGATE_TARGET", raising=False)
    with icegate.Client() as client:
        assert client._connection.target == "127.0.0.1:50051"


@pytest.mark.redis
def test_dev_workers_record_their_fixed_ports(tmp_path: Path, redis_server: RedisServer) -> None:
    """`--workers 2` (on Redis, on fixed ports): the command finds them too."""
    port, http_port = free_tcp_port(), free_tcp_port()
    process = subprocess.Popen(
        [str(BIN / "icegate-server"), "--workers", "2", "--listen", f"127.0.0.1:{port}",
         "--http-listen", f"127.0.0.1:{http_port}", "--store", redis_server.url],
        cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        stored = recorded(tmp_path / ".icegate" / "dev-secrets.json", process)
        assert stored["grpc_target"] == f"127.0.0.1:{port}"
        assert stored["http_url"] == f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 30  # recorded before the workers listen
        while (health := icegate_command("health", cwd=tmp_path, env=clean_env())
               ).stdout.strip() != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert health.stdout.strip() == "SERVING", health.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
