"""The container's HEALTHCHECK command, run as Docker would, against a real icegate-server."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from harness.server_process import BIN, ServerProcess

DOCKERFILE = Path(__file__).resolve().parents[2] / "deploy" / "container" / "Dockerfile"


def healthcheck_argv() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, flags=re.MULTILINE)
    assert match is not None, "the Dockerfile has no exec-form HEALTHCHECK"
    argv: list[str] = json.loads(match.group(1))
    return argv


def test_dockerfile_health_check_reports_serving(tmp_path):
    argv = healthcheck_argv()
    with ServerProcess(tmp_path) as server:
        # The image sets ICEGATE_TARGET to its own listen address; no API key is needed.
        env = {k: v for k, v in server.env.items() if k != "ICEGATE_API_KEY"}
        env["ICEGATE_TARGET"] = server.target
        result = subprocess.run([str(BIN / argv[0]), *argv[1:]], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SERVING"
