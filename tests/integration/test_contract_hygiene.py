"""The contract's hygiene: `buf lint` and `buf breaking`, as `make lint` runs them.

buf is npm's @bufbuild/buf, pinned in tools/buf/ and installed there by `make buf` (a
prerequisite of `make test` and `make lint`). Its rules are in buf.yaml at the root; the
released contract `buf breaking` compares against is the newest committed image in
protos/released/ (the Makefile's RELEASED_CONTRACT picks it the same way).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "tools" / "buf" / "node_modules" / ".bin" / "buf"
RELEASED = ROOT / "protos" / "released"


@pytest.fixture(scope="module")
def buf() -> Path:
    if not BUF.exists():
        message = "buf is not installed: run `make buf` (npm ci in tools/buf)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return BUF


def released_contract() -> Path:
    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.stem))

    images = sorted(RELEASED.glob("v*.binpb"), key=version)
    assert images, "no released contract image in protos/released/"
    return images[-1]


def run_buf(buf: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(buf), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def copy_of_the_contract(tmp_path: Path) -> Path:
    """buf.yaml and protos/icegate (not the released images) in a directory of their own."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos" / "icegate", tmp_path / "protos" / "icegate")
    return tmp_path


def test_the_protos_pass_buf_lint(buf):
    result = run_buf(buf, "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_contract_keeps_the_released_one(buf):
    result = run_buf(buf, "breaking", "--against", str(released_contract()))
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_refuses_a_renumbered_field(buf, tmp_path):
    copy = copy_of_the_contract(tmp_path)
    proto = copy / "protos" / "icegate" / "v1" / "credentials.proto"
    text = proto.read_text()
    assert "string user_id = 1;" in text
    proto.write_text(text.replace("string user_id = 1;", "string user_id = 9;", 1))

    result = run_buf(buf, "breaking", "--against", str(released_contract()), cwd=copy)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "credentials.proto" in output and "IssueTurnCredentialsRequest" in output, output


def test_buf_lint_refuses_a_message_without_its_comment(buf, tmp_path):
    """The COMMENTS rules are on: every message, field, service and RPC says what it means."""
    copy = copy_of_the_contract(tmp_path)
    proto = copy / "protos" / "icegate" / "v1" / "credentials.proto"
    proto.write_text(proto.read_text() + "\nmessage Undocumented {\n  string name = 1;\n}\n")

    result = run_buf(buf, "lint", cwd=copy)
    assert result.returncode != 0
    assert "Undocumented" in result.stdout + result.stderr
