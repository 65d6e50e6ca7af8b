"""README.md runs: every `sh` and `python` block, in order, as a reader runs them in one shell.

A server is started as `make run` starts it (`icegate-server` in a fresh directory, nothing
configured but its data directory, its coturn userdb and where it listens), with two stand-ins
for what a reader brings: OpenAI is the local fake (`$OPENAI_API_KEY` is its key, the
server's OpenAI base URL points at it) and coturn's admin CLI is the fake CLI. It listens on
free ports; the README's `127.0.0.1:50051` and `127.0.0.1:8080` are mapped to them, and
nothing else of a block is changed. The blocks run in one `bash -e -o pipefail` script
(python blocks through `python - <<'...'`, the interpreter `. .venv/bin/activate` put on
PATH), so a failing step fails the test, naming its README line.

A block whose first line is `# untested: <why>` is not run: the convention for the few steps
that cannot run here (`make run` itself, files only the reader has).
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fake_upstreams import FakeUpstream, OpenAIEmulation
from harness.fake_coturn_cli import FAKE_CLI_PASSWORD, FakeCoturnCli

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RUN = ("sh", "bash", "python")
UNTESTED = re.compile(r"# untested: (\S.{9,})")
OPENAI_KEY = "sk-readme-openai-key-0123456789"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"readme-webhook-secret-32-bytes!!").decode()
MAX_UNTESTED = 4


@dataclass(frozen=True)
class Block:
    line: int
    language: str
    text: str

    @property
    def untested(self) -> str | None:
        first = self.text.partition("\n")[0]
        match = UNTESTED.fullmatch(first.strip())
        return match.group(1) if match else None


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with the line their fence opens on."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        fence = re.fullmatch(r"\s*```\s*([\w+-]*).*", line)
        if language is None and fence:
            language, start, lines = fence.group(1), number, []
        elif language is not None and re.fullmatch(r"\s*```\s*", line):
            blocks.append(Block(start, language, "\n".join(lines)))
            language = None
        elif language is not None:
            lines.append(line)
    assert language is None, f"README.md line {start}: a fence is never closed"
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def script(blocks: list[Block], addresses: dict[str, str]) -> str:
    """One bash script of the blocks, each announced on stderr with its README line."""
    parts = ["set -e -o pipefail"]
    for block in blocks:
        text = block.text
        for written, actual in addresses.items():
            text = text.replace(written, actual)
        parts.append(f"echo '>>> README.md line {block.line}' >&2")
        if block.language == "python":
            assert "\nPYTHON_BLOCK\n" not in f"\n{text}\n"
            parts.append(f"python - <<'PYTHON_BLOCK'\n{text}\nPYTHON_BLOCK")
        else:
            parts.append(text)
    return "\n".join(parts) + "\n"


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


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """`make run`'s server in a fresh directory holding the repository's .venv and examples."""
    workdir = tmp_path_factory.mktemp("readme")
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


def test_every_shell_and_python_block_runs_in_order(dev_server: DevServer) -> None:
    runnable = [b for b in BLOCKS if b.language in RUN and b.untested is None]
    text = script(runnable, {"127.0.0.1:50051": dev_server.grpc_target,
                             "127.0.0.1:8080": dev_server.http_address})
    result = subprocess.run(
        ["bash", "-c", text], cwd=dev_server.workdir, capture_output=True, text=True,
        timeout=300, env=clean_env(OPENAI_API_KEY=OPENAI_KEY, WHSEC=WEBHOOK_SECRET))
    (dev_server.workdir / "readme.out").write_text(result.stdout + result.stderr)

    announced = re.findall(r">>> README.md line (\d+)", result.stderr)
    assert result.returncode == 0, (
        f"README.md line {announced[-1] if announced else '?'}: the block failed "
        f"(exit {result.returncode})\n--- stdout\n{result.stdout[-3000:]}\n"
        f"--- stderr\n{result.stderr[-3000:]}")
    assert [int(n) for n in announced] == [b.line for b in runnable]
    # What the Python snippets' comments show: the field violation, and the browser's answer.
    assert "FieldViolation(field='user_id'" in result.stdout
    assert "200 ['ephemeralToken', 'expiresAt', 'iceServers', 'model', 'sessionId', 'voice']" \
        in result.stdout


def test_untested_blocks_are_few_and_say_why() -> None:
    marked = [b for b in BLOCKS if b.language in RUN and "untested" in b.text.partition("\n")[0]]
    assert all(b.untested for b in marked), [b.line for b in marked if not b.untested]
    assert len(marked) <= MAX_UNTESTED, [b.line for b in marked]


def test_one_way_of_calling_the_command() -> None:
    # `. .venv/bin/activate` once, then `icegate ...`: never `.venv/bin/icegate` beside it.
    assert ".venv/bin/icegate" not in README.read_text(encoding="utf-8")


def test_the_block_reader_sees_every_fence() -> None:
    # A block the parser missed would silently go untested.
    fences = sum(1 for line in README.read_text(encoding="utf-8").splitlines()
                 if line.strip().startswith("```"))
    assert fences == 2 * len(BLOCKS)
    assert sum(b.language in RUN for b in BLOCKS) >= 10
