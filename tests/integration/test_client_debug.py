"""`Client(debug=True)` and `AsyncClient(debug=True)`: one console line per call, no secret.

The user's situation is a fresh interpreter that configured no logging, so the calls run in a
child Python whose standard error the test reads (capfd); a server on a free port answers.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap

import pytest

import icegate
from harness.icegate_server import TEST_ADMIN_KEY, TEST_TURN_SECRET, RunningServer
from icegate.call_log import shown_target


@pytest.fixture(scope="module")
def server(module_server_factory) -> RunningServer:
    return module_server_factory()


def run_child(code: str, target: str) -> None:
    subprocess.run([sys.executable, "-c", textwrap.dedent(code), target, TEST_ADMIN_KEY],
                   check=True, timeout=60)


SYNC = """
    import sys, icegate
    target, key = sys.argv[1:]
    with icegate.Client(target, key, debug=True) as client:
        servers = client.get_ice_servers("alice")
        print(servers.ice_servers[-1].credential)
        try:
            client.create_session("openai", voice="echo")
        except icegate.UpstreamNotConfiguredError:
            pass
"""

ASYNC = """
    import asyncio, sys, icegate
    async def main(target, key):
        async with icegate.AsyncClient(target, key, debug=True) as client:
            servers = await client.get_ice_servers("alice")
            print(servers.ice_servers[-1].credential)
            try:
                await client.create_session("openai", voice="echo")
            except icegate.UpstreamNotConfiguredError:
                pass
    asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.parametrize("code", [SYNC, ASYNC], ids=["Client", "AsyncClient"])
def test_debug_prints_each_call_on_stderr_without_logging_set_up(
        server: RunningServer, capfd: pytest.CaptureFixture[str], code: str) -> None:
    run_child(code, server.target)
    out, err = capfd.readouterr()
    credential = out.strip()
    assert credential  # the call worked, and printed what must not be logged

    lines = err.splitlines()
    target = re.escape(server.target)
    assert re.fullmatch(rf"\d\d:\d\d:\d\d icegate: GetIceServers {target} OK \d+\.\d ms",
                        lines[0]), err
    assert re.fullmatch(rf"\d\d:\d\d:\d\d icegate: CreateSession {target} FAILED_PRECONDITION "
                        rf"UPSTREAM_NOT_CONFIGURED \d+\.\d ms: .*openai.*", lines[1]), err
    assert len(lines) == 2, err
    for secret in (TEST_ADMIN_KEY, TEST_ADMIN_KEY[-8:], credential, TEST_TURN_SECRET):
        assert secret not in err


def test_no_debug_prints_nothing(server: RunningServer,
                                 capfd: pytest.CaptureFixture[str]) -> None:
    run_child(SYNC.replace("debug=True", "debug=False"), server.target)
    assert capfd.readouterr().err == ""


def test_debug_lines_go_to_the_logging_the_application_set_up(
        server: RunningServer, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str]) -> None:
    # Under pytest the root logger has handlers, as in an application that set logging up:
    # the lines go there (at DEBUG, though the root is at WARNING), and no console copy.
    logging.getLogger().setLevel(logging.WARNING)
    icegate_log = logging.getLogger("icegate")
    try:
        with icegate.Client(server.target, TEST_ADMIN_KEY, debug=True) as client:
            client.health()
    finally:
        icegate_log.setLevel(logging.NOTSET)
    assert [r.getMessage().split()[:3] for r in caplog.records if r.name == "icegate"] == \
        [["HealthCheck", server.target, "OK"]]
    assert "icegate" not in capfd.readouterr().err


@pytest.mark.parametrize(("target", "shown"), [
    ("127.0.0.1:50051", "127.0.0.1:50051"),
    ("https://user:pa55word@icegate.example.test:8443/", "https://icegate.example.test:8443/"),
    ("dns:///icegate.internal:50051", "dns:///icegate.internal:50051"),
    ("user:pa55word@icegate.internal:50051", "icegate.internal:50051"),
])
def test_the_target_is_shown_without_credentials(target: str, shown: str) -> None:
    assert shown_target(target) == shown
