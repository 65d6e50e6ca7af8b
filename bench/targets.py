"""The servers under load: icegate (SQLite, Redis, --workers; gRPC and Connect) and the two
baselines.

Each `start_*` returns a started `ManagedProcess`; the caller stops it (try/finally). icegate
gets its own data directory, the benchmark's TURN settings and admin key, and a project
(`scenario.PROJECT_ID`) created through the admin API with limits no run can reach
(10^9 requests per day, 10^9 sessions a month, 10^6 concurrent), plus a caller key bound to
that project: the load goes through the full path (key digest, project, rate limit).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import scenario
from processes import ManagedProcess, free_port

import icegate

BENCH_DIR = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
ICEGATE_SERVER = str(BIN / "icegate-server")

UNLIMITED = {
    "rate_limit_requests": 10**9,
    "rate_limit_window": 86400,
    "monthly_session_quota": 10**9,
    "max_concurrent_sessions": 10**6,
}


def redis_store_available() -> bool:
    """Whether this checkout has the Redis store (it lands on another branch)."""
    return importlib.util.find_spec("icegate_server.store.redis") is not None


def workers_flag_available() -> bool:
    """Whether `icegate-server --help` offers `--workers`."""
    completed = subprocess.run([ICEGATE_SERVER, "--help"], capture_output=True, text=True,
                               timeout=30, check=False)
    return "--workers" in completed.stdout


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def icegate_env(port: int, data_dir: Path, store_url: str | None = None,
                openai_base_url: str | None = None,
                http_port: int | None = None) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("ICEGATE_")}
    env.update({
        "ICEGATE_LISTEN": f"127.0.0.1:{port}",
        "ICEGATE_DATA_DIR": str(data_dir),
        "ICEGATE_TURN_SECRETS": scenario.TURN_SECRET,
        "ICEGATE_TURN_URIS": ",".join(scenario.TURN_URIS),
        "ICEGATE_STUN_URIS": ",".join(scenario.STUN_URIS),
        "ICEGATE_API_KEYS": scenario.ADMIN_KEY,
        "ICEGATE_MASTER_KEY": scenario.MASTER_KEY,
        "ICEGATE_DEV_SECRETS": "false",
        "ICEGATE_SHUTDOWN_GRACE": "2",
        "ICEGATE_LOG_LEVEL": "INFO",
    })
    if http_port is not None:
        env["ICEGATE_HTTP_LISTEN"] = f"127.0.0.1:{http_port}"
    if store_url:
        env["ICEGATE_STORE"] = store_url
    if openai_base_url:
        env["ICEGATE_OPENAI_BASE_URL"] = openai_base_url
    return env


def start_icegate(name: str, work: Path, *, store_url: str | None = None, workers: int = 1,
                  openai_base_url: str | None = None) -> ManagedProcess:
    port, http_port = free_port(), free_port()
    data_dir = work / f"{name}-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [ICEGATE_SERVER]
    if workers > 1:
        argv += ["--workers", str(workers)]
    # Both transports, as `make run` serves them: gRPC on `port`, Connect on `http_port`.
    return ManagedProcess(name, argv, port=port, log_dir=work, cwd=data_dir,
                          http_port=http_port,
                          env=icegate_env(port, data_dir, store_url, openai_base_url,
                                          http_port)).start()


def start_bare_grpc(work: Path) -> ManagedProcess:
    port = free_port()
    return ManagedProcess("bare-grpc", [sys.executable, str(BENCH_DIR / "bare_grpc_server.py"),
                                        "--port", str(port)], port=port, log_dir=work).start()


def start_bare_connect(work: Path) -> ManagedProcess:
    port = free_port()
    return ManagedProcess("bare-connect", [
        sys.executable, str(BENCH_DIR / "bare_connect_server.py"), "--port", str(port)],
        port=port, log_dir=work).start()


def start_fastapi(work: Path) -> ManagedProcess:
    port = free_port()
    return ManagedProcess("fastapi", [sys.executable, str(BENCH_DIR / "fastapi_server.py"),
                                      "--port", str(port)], port=port, log_dir=work).start()


def start_fake_openai(work: Path, latency_ms: float) -> ManagedProcess:
    port = free_port()
    return ManagedProcess("fake-openai", [
        sys.executable, str(BENCH_DIR / "fake_openai.py"), "--port", str(port),
        "--latency-ms", f"{latency_ms:g}"], port=port, log_dir=work).start()


def start_redis(work: Path) -> ManagedProcess:
    binary = redis_server_binary()
    assert binary is not None
    port = free_port()
    directory = work / f"redis-{port}"
    directory.mkdir(parents=True, exist_ok=True)
    return ManagedProcess("redis", [
        binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory),
        "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", ""],
        port=port, log_dir=work).start()


@dataclass(frozen=True)
class PreparedProject:
    """The load project of a running icegate and the caller key bound to it."""

    project_id: str
    api_key: str


def prepare_project(port: int, *, with_openai_key: bool = False) -> PreparedProject:
    """Creates the benchmark project and its caller key through the admin API."""
    with icegate.Client(f"127.0.0.1:{port}", scenario.ADMIN_KEY) as admin:
        admin.create_project(scenario.PROJECT_ID, timeout=10, **UNLIMITED)
        key = admin.create_api_key(scenario.PROJECT_ID, display_name="bench", timeout=10)
        if with_openai_key:
            admin.set_provider_key(scenario.PROJECT_ID, "openai", scenario.OPENAI_KEY,
                                   timeout=10)
    return PreparedProject(scenario.PROJECT_ID, key.secret)


def check_call(port: int | str, api_key: str, method: str) -> None:
    """One real call through the typed client (to a gRPC port, or a Connect URL): raises the
    typed error if the set-up is wrong."""
    with icegate.Client(port if isinstance(port, str) else f"127.0.0.1:{port}",
                        api_key) as client:
        if method == scenario.ISSUE:
            client.issue_turn_credentials(scenario.USER_ID, ttl=scenario.TTL_SECONDS, timeout=10)
        elif method == scenario.ICE:
            client.get_ice_servers(scenario.USER_ID, ttl=scenario.TTL_SECONDS, timeout=10)
        else:
            client.create_session("openai", user_id=scenario.USER_ID, model="gpt-realtime",
                                  voice="alloy", timeout=10)


def sessions_used(port: int, api_key: str) -> int:
    """The project's sessions this month, from the server's own counters (GetUsage)."""
    with icegate.Client(f"127.0.0.1:{port}", api_key) as client:
        return int(client.get_usage(timeout=10).sessions.used_this_month)
