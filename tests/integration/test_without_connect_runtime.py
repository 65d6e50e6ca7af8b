"""Python 3.10, where the Connect runtime (connectrpc, pyqwest) cannot be installed: the client
calls over gRPC without it, a URL target is refused with the reason, and the server refuses
ICEGATE_HTTP_LISTEN instead of failing at import.

This machine runs 3.11, so a subprocess hides the two packages from the import system, as a
3.10 installation (where the `python_version >= '3.11'` marker leaves them out) would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import icegate
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer
from harness.server_process import ServerProcess

REPO = Path(__file__).resolve().parents[2]

HIDE_CONNECT_RUNTIME = textwrap.dedent("""
    import sys

    # As if not installed: importing either raises ModuleNotFoundError, find_spec gives None.
    sys.modules["connectrpc"] = None
    sys.modules["pyqwest"] = None
""")


def hiding_connect(directory: Path) -> dict[str, str]:
    """The environment of a Python that cannot import the Connect runtime (a sitecustomize)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(HIDE_CONNECT_RUNTIME)
    return {"PYTHONPATH": os.pathsep.join(filter(None, (str(directory),
                                                        os.environ.get("PYTHONPATH"))))}


def run_without_connect(tmp_path: Path, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ICEGATE_")}
    environment.update(env, **hiding_connect(tmp_path / "hide"))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          env=environment, capture_output=True, text=True, timeout=60,
                          check=False)


def test_the_client_calls_over_grpc_without_the_connect_runtime(icegate_server: RunningServer,
                                                                tmp_path: Path):
    result = run_without_connect(tmp_path, f"""
        import json, sys
        import icegate
        import icegate.aio
        with icegate.Client({icegate_server.target!r}, {TEST_ADMIN_KEY!r}) as client:
            credential = client.issue_turn_credentials("alice", ttl=600)
            try:
                client.issue_turn_credentials("bad user\\n")
            except icegate.InvalidArgumentError as error:
                refused = icegate.ErrorReason.Name(error.error_reason)
        try:
            icegate.Client("http://127.0.0.1:8080", "k")
        except icegate.ConfigurationError as error:
            url_refusal = str(error)
        print(json.dumps({{
            "username": credential.username, "refused": refused, "url_refusal": url_refusal,
            "loaded": sorted(name for name, module in sys.modules.items() if module is not None
                             and name.partition(".")[0] in ("connectrpc", "pyqwest")),
        }}))
    """)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["username"].endswith(":default/alice")
    assert answer["refused"] == "ERROR_REASON_INVALID_FIELD"
    assert "Python 3.11" in answer["url_refusal"]
    assert "host:port" in answer["url_refusal"]
    assert answer["loaded"] == []


def test_grpc_clients_do_not_load_the_connect_runtime():
    # With the runtime installed too: `import icegate` and a gRPC client leave it unloaded.
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        import icegate, icegate.aio
        icegate.Client("127.0.0.1:1", "k").close()
        print(sorted(n for n in sys.modules if n.partition(".")[0] in ("connectrpc", "pyqwest")))
    """)], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_server_refuses_the_http_listener_without_the_connect_runtime(tmp_path: Path):
    result = run_without_connect(
        tmp_path, "import sys; from icegate_server.__main__ import main; sys.exit(main())",
        ICEGATE_DATA_DIR=str(tmp_path), ICEGATE_LISTEN="127.0.0.1:0",
        ICEGATE_HTTP_LISTEN="127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert "ICEGATE_HTTP_LISTEN" in line
    assert "Python 3.11" in line


def test_the_server_serves_grpc_without_the_connect_runtime(tmp_path: Path):
    server = ServerProcess(tmp_path / "server")
    server.env.update(hiding_connect(tmp_path / "hide"))
    with server, icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        credential = client.issue_turn_credentials("alice", ttl=600)
    assert credential.username.endswith(":default/alice")
    assert "connectrpc" not in server.read_log()
