"""examples/README.md runs: its shell block, as a reader runs it next to `make run`.

The block sets up a provider key and a caller key, lists the command that starts each of the
three apps, and shows the `curl` a browser's backend call comes down to. Here the set-up runs
once, then each app is started in turn, as listed (in the background, on a free port instead of
8000), sent that `curl`, and stopped: each must answer a browser session.
"""

from __future__ import annotations

import json
import re
import subprocess

from harness.markdown_blocks import Block, markdown_blocks
from harness.ports import free_tcp_port
from harness.readme_server import OPENAI_KEY, ROOT, DevServer, clean_env

EXAMPLES_README = ROOT / "examples" / "README.md"
APPS = re.compile(r"(?P<command>(?:uvicorn|flask|python) [^#]*?)\s*#\s*(?P<name>\w+).*")
"""An app's line: its command, then a comment naming the framework."""


def shell_block() -> Block:
    [block] = [b for b in markdown_blocks(EXAMPLES_README.read_text(encoding="utf-8"),
                                          "examples/README.md")
               if b.language in ("sh", "bash", "python")]
    return block


def test_the_shell_block_starts_each_app_and_the_curl_gets_a_session(
        dev_server: DevServer) -> None:
    lines = shell_block().text.splitlines()
    apps = [(number, match) for number, line in enumerate(lines)
            if (match := APPS.fullmatch(line))]
    assert [match["name"] for _, match in apps] == ["FastAPI", "Flask", "Django"]
    first, last = apps[0][0], apps[-1][0]
    setup, call = "\n".join(lines[:first]), "\n".join(lines[last + 1:]).strip()
    assert call.startswith("curl ") and "localhost:8000" in call

    parts = ["set -e -o pipefail -m", setup]  # -m: each app in a process group of its own
    for _, match in apps:
        port = free_tcp_port()
        command = match["command"].replace("8000", str(port))
        parts += [
            f"echo '>>> {match['name']}' >&2",
            f"{command} > {match['name']}.log 2>&1 &",
            "app=$!",
            # Up once it answers HTTP at all.
            f"for _ in $(seq 150); do curl -s -o /dev/null localhost:{port} && break; "
            "sleep 0.2; done",
            f"echo '=== {match['name']}'",
            call.replace("localhost:8000", f"localhost:{port}"),
            "echo",
            'kill -- "-$app"; wait "$app" || true',
        ]
    result = subprocess.run(
        ["bash", "-c", "\n".join(parts) + "\n"], cwd=dev_server.workdir, capture_output=True,
        text=True, timeout=300,
        env=clean_env(OPENAI_API_KEY=OPENAI_KEY, DJANGO_SECRET_KEY="readme-" + "x" * 50))
    logs = {name: (dev_server.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
            for name in ("FastAPI", "Flask", "Django")
            if (dev_server.workdir / f"{name}.log").exists()}
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:], logs)

    answers = dict(part.strip().split("\n", 1)
                   for part in result.stdout.split("=== ")[1:])
    assert set(answers) == {"FastAPI", "Flask", "Django"}, (result.stdout, logs)
    for name, text in answers.items():
        session = json.loads(text)
        assert set(session) == {"sessionId", "ephemeralToken", "expiresAt", "iceServers",
                                "model", "voice"}, (name, session)
        assert session["voice"] == "echo", name
        assert any(server.get("credential") for server in session["iceServers"]), name
        # What the browser gets holds no key of the backend's.
        assert OPENAI_KEY not in text and "igk_" not in text, name
