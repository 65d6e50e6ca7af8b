"""The container's HEALTHCHECK command, run as Docker would, against a real icegate-server:
plaintext, and with TLS on (the image's environment then holds the server's certificate)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from harness.pki import TestCA
from harness.server_process import BIN, ServerProcess

DOCKERFILE = Path(__file__).resolve().parents[2] / "deploy" / "container" / "Dockerfile"


def healthcheck_argv() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, flags=re.MULTILINE)
    assert match is not None, "the Dockerfile has no exec-form HEALTHCHECK"
    argv: list[str] = json.loads(match.group(1))
    return argv


def run_healthcheck(server: ServerProcess, tmp_path: Path,
                    **extra: str) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK as Docker runs it: the container's environment (the server's settings,
    no API key), the image's PATH with the console scripts on it."""
    env = {k: v for k, v in server.env.items() if k != "ICEGATE_API_KEY"}
    env.update(extra)
    env["PATH"] = f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    env["ICEGATE_TARGET"] = "127.0.0.1:9"  # the image's default, which must not matter
    return subprocess.run(healthcheck_argv(), env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=30, check=False)


def test_dockerfile_health_check_reports_serving(tmp_path):
    with ServerProcess(tmp_path) as server:
        result = run_healthcheck(server, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SERVING"


def test_dockerfile_health_check_follows_the_listen_address(tmp_path):
    with ServerProcess(tmp_path) as server:
        listen = server.env["ICEGATE_LISTEN"]
        server.env["ICEGATE_LISTEN"] = "0.0.0.0:" + listen.rpartition(":")[2]
        wildcard = run_healthcheck(server, tmp_path)
        server.env["ICEGATE_LISTEN"] = "127.0.0.1:9"
        elsewhere = run_healthcheck(server, tmp_path)
    assert wildcard.returncode == 0, wildcard.stderr
    assert elsewhere.returncode == 1


def test_dockerfile_health_check_with_tls_on(tmp_path):
    ca = TestCA(tmp_path / "pki")
    cert = ca.issue("server", "icegate.internal", dns=("icegate.internal",), server=True)
    with ServerProcess(tmp_path / "server", tls_cert=cert.cert, tls_key=cert.key) as server:
        # As the env example says: the CA and a name in the certificate.
        serving = run_healthcheck(server, tmp_path, ICEGATE_TLS_CA=ca.cert,
                                  ICEGATE_TLS_SERVER_NAME="icegate.internal")
        # Without them the certificate cannot be checked (127.0.0.1 is not its name, and the
        # system's roots did not sign it): the check fails, as it must.
        unnamed = run_healthcheck(server, tmp_path, ICEGATE_TLS_CA=ca.cert)
        untrusted = run_healthcheck(server, tmp_path,
                                    ICEGATE_TLS_SERVER_NAME="icegate.internal")
    assert serving.returncode == 0, serving.stderr
    assert serving.stdout.strip() == "SERVING"
    assert unnamed.returncode == 1 and untrusted.returncode == 1
