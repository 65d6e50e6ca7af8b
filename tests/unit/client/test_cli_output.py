"""What `icegate` (the command) prints, as a person reads it: plain text, clean timestamps."""

from __future__ import annotations

import json
import re

import pytest

from harness.icegate_server import TEST_ADMIN_KEY, RunningServer
from icegate import cli
from icegate_server.clock import FrozenClock

# A wall clock with nanoseconds that are not whole milliseconds, as a real one has.
NOW = 1_765_008_295.299_000_064


@pytest.fixture(scope="module")
def server(module_server_factory) -> RunningServer:
    return module_server_factory(FrozenClock(NOW))


def run(server: RunningServer, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, *args: str, stdin: str = "") -> str:
    monkeypatch.setenv("ICEGATE_API_KEY", TEST_ADMIN_KEY)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(stdin))
    assert cli.main(["--target", server.target, *args]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_last4_prints_as_text(server: RunningServer, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    run(server, capsys, monkeypatch, "admin", "provider-key", "set", "--project", "default",
        "--provider", "openai", stdin="sk-test-cli-output-key-1234\n")
    out = run(server, capsys, monkeypatch, "admin", "provider-key", "list", "--project",
              "default")
    assert '"last4": "…1234"' in out
    assert "\\u" not in out
    assert "sk-test-cli-output-key" not in out


def test_timestamps_print_to_the_millisecond(server: RunningServer,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    created = json.loads(run(server, capsys, monkeypatch, "admin", "project", "create", "acme"))
    assert created["create_time"] == "2025-12-06T08:04:55.299Z"

    credential = json.loads(run(server, capsys, monkeypatch, "turn-credentials", "--user",
                                "alice", "--ttl", "600"))
    assert credential["expires_at"] == "2025-12-06T08:14:55Z"  # TURN expiries are whole seconds

    usage = run(server, capsys, monkeypatch, "usage", "--project", "acme")
    times = re.findall(r'"(\d{4}-\d\d-\d\dT[^"]*)"', usage)
    assert times and all(re.fullmatch(r"[-\dT:]+(\.\d{3})?Z", value) for value in times), times


def test_field_prints_one_value_for_scripts(server: RunningServer,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    key_id = run(server, capsys, monkeypatch, "--field", "api_key.key_id", "admin", "key",
                 "create", "--project", "default", "--name", "script").strip()
    assert re.fullmatch(r"[0-9a-f]{12}", key_id)
    listed = run(server, capsys, monkeypatch, "--field", "0", "admin", "key", "list",
                 "--project", "default")
    assert json.loads(listed)["key_id"] == key_id  # not text: printed as JSON


@pytest.mark.parametrize("path", ["nope", "api_key.key_id.deeper", "api_key.9", "-1"])
def test_a_missing_field_is_one_clear_line(server: RunningServer,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    monkeypatch.setenv("ICEGATE_API_KEY", TEST_ADMIN_KEY)
    assert cli.main(["--target", server.target, "--field", path, "admin", "key", "create",
                     "--project", "default"]) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"icegate: no field {path!r} in the answer\n")


def test_an_error_names_its_code_once(server: RunningServer, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICEGATE_API_KEY", TEST_ADMIN_KEY)
    assert cli.main(["--target", server.target, "session", "end", "ses_gone"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("icegate: NOT_FOUND: ")
    assert "NOT_FOUND NOT_FOUND" not in err
