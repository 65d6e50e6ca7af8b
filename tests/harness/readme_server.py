"""The server the README tests run a document's steps against: `icegate-server` started as
`make run` starts it, in a fresh directory, nothing configured but its data directory, its
coturn userdb and where it listens, with two stand-ins for what a reader brings: OpenAI is the
local fake (`OPENAI_KEY` is its key, the server's OpenAI base URL points at it) and coturn's
admin CLI is the fake CLI. It listens on free ports, recorded in the dev secrets file."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fake_upstreams import FakeUpstream, OpenAIEmulation
from harness.fake_coturn_cli import FAKE_CLI_PASSWORD, FakeCoturnCli

ROOT = Path(__file__).resolve().parents[2]
OPENAI_KEY = "sk-readme-openai-key-0123456789"


def clean_env(**extra: str) -> dict[str, str]:
    keep = ("HOME", "LANG", "LC_ALL", "TMPDIR")
    env = {name: os.environ[name] for name in keep if name in os.environ}
    env.update(PATH="/usr/local/bin:/usr/bin:/bin", **extra)
    return env


@dataclass
class DevServer:
    workdir: Path
    grpc_target: str
    http_address: str


@contextlib.contextmanager
def dev_server(workdir: Path) -> Iterator[DevServer]:
    """`make run`'s server in `workdir`, which is given the repository's .venv and examples."""
    (workdir / ".venv").symlink_to(ROOT / ".venv")
    (workdir / "examples").symlink_to(ROOT / "examples")
    (workdir / ".icegate" / "coturn").mkdir(parents=True)
    with FakeUpstream(OpenAIEmulation(OPENAI_KEY)) as openai, FakeCoturnCli() as coturn_cli:
        env = clean_env(
            ICEGATE_DATA_DIR=".icegate",
            ICEGATE_COTURN_SQLITE=str(workdir / ".icegate" / "coturn" / "turndb"),
            ICEGATE_LISTEN="127.0.0.1:0", ICEGATE_HTTP_LISTEN="127.0.0.1:0",
            ICEGATE_OPENAI_BASE_URL=openai.base_url,
            ICEGATE_COTURN_CLI=coturn_cli.address,
            ICEGATE_COTURN_CLI_PASSWORD=FAKE_CLI_PASSWORD,
        )
        log = (workdir / "server.log").open("wb")
        process = subprocess.Popen([str(Path(sys.executable).parent / "icegate-server")],
                                   cwd=workdir, env=env, stdout=log, stderr=log)
        try:
            stored = _listening(workdir / ".icegate" / "dev-secrets.json", process, workdir)
            yield DevServer(workdir, stored["grpc_target"],
                            stored["http_url"].removeprefix("http://"))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=15)
            log.close()


def _listening(path: Path, process: subprocess.Popen[bytes], workdir: Path) -> dict[str, str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError((workdir / "server.log").read_text(errors="replace"))
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}
        if "grpc_target" in stored and "http_url" in stored:
            return stored  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError("the dev server did not record where it listens within 30 s")
