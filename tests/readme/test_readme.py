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
import re
import subprocess

from harness.markdown_blocks import Block, markdown_blocks
from harness.readme_server import OPENAI_KEY, ROOT, DevServer, clean_env

README = ROOT / "README.md"
RUN = ("sh", "bash", "python")
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"readme-webhook-secret-32-bytes!!").decode()
NOT_RUN = ("", "json", "toml", "text", "ini", "yaml", "javascript", "typescript", "html")
"""Languages of blocks that are data or another runtime's code, shown and not run."""
MAX_UNTESTED = 5


BLOCKS = markdown_blocks(README.read_text(encoding="utf-8"), "README.md")


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
    # A `shell` or `console` block would be skipped without anyone noticing: name it sh.
    assert {b.language for b in BLOCKS} <= {*RUN, *NOT_RUN}, \
        [(b.line, b.language) for b in BLOCKS if b.language not in (*RUN, *NOT_RUN)]
    assert sum(b.language in RUN for b in BLOCKS) >= 10
