"""`make demo`, as a user runs it: the page in Debian's headless Chromium, then Ctrl-C.

One `make demo` (on free ports, in a temporary data directory) and one browser serve the whole
module. The page's call must go through coturn (the candidate in use is `relay`), hear the
fake provider's events, and Stop must end the session on the server; Ctrl-C on `make demo`
must leave nothing running. Chromium comes from Debian (chromium, chromium-driver); nothing is
downloaded, and with CI=true a missing browser fails the module instead of skipping it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

import icegate
from harness.ports import free_tcp_port, free_tcp_udp_port, reserve_relay_range
from harness.pytest_plugin import require_binaries

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1000,1150")
START_TIMEOUT = 90


def load_launcher() -> ModuleType:
    spec = importlib.util.spec_from_file_location("icegate_demo_run",
                                                  REPO / "examples/demo/run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@dataclass
class RunningDemo:
    """`make demo` started in its own process group, as a terminal's job is."""

    process: subprocess.Popen[str]
    data_dir: Path
    ports: dict[str, int]
    output: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['web']}/"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def admin(self) -> icegate.Client:
        secrets = json.loads((self.data_dir / "dev-secrets.json").read_text())
        return icegate.Client(self.target, secrets["api_key"])

    def read_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if "press Start" in line:
                self.ready.set()
        self.ready.set()  # the launcher is gone: stop waiting
        self.finished.set()

    def ctrl_c(self) -> int:
        """What a terminal does on Ctrl-C: SIGINT to the job's process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(30)


def port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def processes_naming(text: str) -> dict[int, str]:
    """The live processes whose command line mentions `text`: pid -> command line."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in command and "pytest" not in command:
                found[int(cmdline.parent.name)] = command
    return found


def start_demo(data_root: Path, **ports: int) -> RunningDemo:
    args = (f"--web 127.0.0.1:{ports['web']} --grpc-port {ports['grpc']} "
            f"--turn-port {ports['turn']} --provider-port {ports['provider']}")
    if "relay_min" in ports:
        args += f" --relay-ports {ports['relay_min']}-{ports['relay_max']}"
    # As from a shell: not as a sub-make of `make test` (whose jobserver is not passed on).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    process = subprocess.Popen(
        ["make", "--no-print-directory", "-s", "demo", f"DEV_DIR={data_root}", f"ARGS={args}"],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    demo = RunningDemo(process, data_root / "demo", ports)
    threading.Thread(target=demo.read_output, daemon=True).start()
    return demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDemo]:
    require_binaries("make", "turnserver", "chromium", "chromedriver")
    relay = reserve_relay_range()
    data_root = tmp_path_factory.mktemp("make-demo")
    # A store left by an earlier run (here one no server could open): every run starts afresh,
    # so nothing of the last one (an hour-long lease of a session left open) counts in this one.
    (data_root / "demo").mkdir()
    (data_root / "demo" / "icegate.sqlite3").write_bytes(b"an earlier run's store " * 100)
    running = start_demo(data_root, web=free_tcp_port(),
                         grpc=free_tcp_port(), turn=free_tcp_udp_port(),
                         provider=free_tcp_port(), relay_min=relay.min_port,
                         relay_max=relay.max_port)
    try:
        running.ready.wait(START_TIMEOUT)
        assert running.process.poll() is None and port_answers(running.ports["web"]), \
            "make demo did not start:\n" + "".join(running.output)
        yield running
    finally:
        if running.process.poll() is None:
            running.ctrl_c()
        relay.release()


@pytest.fixture(scope="module")
def browser(demo: RunningDemo) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="icegate-chromium-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # Both paths given: Selenium Manager has nothing to look up or download.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def text_of(browser: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(browser.find_element(By.ID, element_id).text)


def value_of(browser: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(browser.find_element(By.ID, element_id).get_attribute("data-value") or "")


def wait_until(browser: Any, what: str, condition: Any, seconds: float = 30) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(browser, seconds, poll_frequency=0.2).until(lambda _: condition())
    except TimeoutException:
        pytest.fail(f"the page never showed {what}; error line: {text_of(browser, 'error')!r}")


def event_types(browser: Any) -> list[str]:
    from selenium.webdriver.common.by import By

    return [str(item.get_attribute("data-type"))
            for item in browser.find_elements(By.CSS_SELECTOR, "#events li")]


def start_call(demo: RunningDemo, browser: Any) -> str:
    """Opens the page, presses Start, waits for the relayed connection; the session id."""
    from selenium.webdriver.common.by import By

    browser.get(demo.url)
    browser.find_element(By.ID, "start").click()
    wait_until(browser, "a connected call", lambda: value_of(browser, "connection-state")
               in ("connected", "failed", "closed") or text_of(browser, "error"))
    return value_of(browser, "session-id")


def test_start_connects_through_coturn_and_shows_the_providers_events(
        demo: RunningDemo, browser: Any, tmp_path: Path) -> None:
    session_id = start_call(demo, browser)
    assert text_of(browser, "error") == ""
    assert value_of(browser, "connection-state") == "connected"
    wait_until(browser, "the candidate in use", lambda: value_of(browser, "candidate-type"))
    assert value_of(browser, "candidate-type") == "relay"
    assert text_of(browser, "candidate-type").startswith("relay (udp, 127.0.0.1:")
    wait_until(browser, "the provider's greeting",
               lambda: "response.done" in event_types(browser))
    events = event_types(browser)
    assert events[0] == "session.created"
    assert "response.output_audio_transcript.delta" in events
    assert text_of(browser, "transcript").startswith("Hello from the demo provider.")
    # The provider's audio track reached the browser, relayed like the data channel.
    wait_until(browser, "the provider's audio", lambda: int(value_of(browser, "audio") or 0) > 0)
    assert session_id.startswith("ses_")
    with demo.admin() as admin:
        assert admin.get_usage("default").sessions.active == 1
    browser.save_screenshot(str(tmp_path / "demo-page.png"))
    assert (tmp_path / "demo-page.png").stat().st_size > 10_000


def test_stop_ends_the_session_on_the_server(demo: RunningDemo, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    session_id = value_of(browser, "session-id")
    if value_of(browser, "connection-state") != "connected":
        session_id = start_call(demo, browser)
    browser.find_element(By.ID, "stop").click()
    wait_until(browser, "the session ended", lambda: value_of(browser, "session-state")
               == "ended" or text_of(browser, "error"))
    assert text_of(browser, "error") == ""
    assert value_of(browser, "connection-state") == "closed"
    with demo.admin() as admin:
        with pytest.raises(icegate.NotFoundError):
            admin.keep_alive_session(session_id, project_id="default")
        assert admin.get_usage("default").sessions.active == 0


def test_leaving_the_page_ends_its_session(demo: RunningDemo, browser: Any) -> None:
    session_id = start_call(demo, browser)
    assert value_of(browser, "connection-state") == "connected"
    browser.get("about:blank")
    with demo.admin() as admin:
        ended = False
        for _ in range(100):  # the page's beacon is sent as it goes; wait for icegate
            try:
                admin.keep_alive_session(session_id, project_id="default")
            except icegate.NotFoundError:
                ended = True
                break
            time.sleep(0.1)
        assert ended, "the session outlived its page"
        assert admin.get_usage("default").sessions.active == 0


def test_a_second_demo_on_the_same_data_dir_is_refused_and_the_first_goes_on(
        demo: RunningDemo) -> None:
    ports = {"web": free_tcp_port(), "grpc": free_tcp_port(), "turn": free_tcp_udp_port(),
             "provider": free_tcp_port()}
    second = start_demo(demo.data_dir.parent, **ports)
    assert second.process.wait(60) != 0
    assert second.finished.wait(10)
    assert f"another make demo runs with {demo.data_dir}" in "".join(second.output)
    assert not any(port_answers(port) for port in ports.values())
    assert port_answers(demo.ports["web"])
    with demo.admin() as admin:  # the first one's store was left alone
        keys = admin.list_provider_keys("default")
        assert [key.provider for key in keys] == ["openai"]


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    answer = httpx.post(url, content=body, timeout=10,
                        headers={"Content-Type": "application/json", **headers})
    return answer.status_code, answer.json()


@pytest.mark.parametrize(("user", "field"), [
    ("alice:admin", "user_id"), ("x" * 600, "user_id"), ("", "user_id"),
])
def test_the_ice_servers_endpoint_refuses_a_bad_user_with_400(
        demo: RunningDemo, user: str, field: str) -> None:
    status, body = post(f"{demo.url}api/ice-servers", b"{}", {"X-User-Id": user})
    assert status == 400
    assert body["error"] == "invalid_argument"
    assert [violation["field"] for violation in body["fields"]] == [field]


def test_the_fake_provider_takes_only_its_key_and_a_real_offer(demo: RunningDemo) -> None:
    base = f"http://127.0.0.1:{demo.ports['provider']}/v1/realtime"
    key = load_launcher().FAKE_PROVIDER_KEY
    status, body = post(f"{base}/calls", b"", {"Authorization": "Bearer sk-wrong-key-0000"})
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    assert key not in json.dumps(body)
    status, body = post(f"{base}/calls", b"not multipart", {"Authorization": f"Bearer {key}"})
    assert status == 400
    status, _ = post(f"{base}/calls/rtc_nonesuch/hangup", b"", {"Authorization": f"Bearer {key}"})
    assert status == 404


def test_a_busy_port_stops_make_demo_with_one_clear_line_and_nothing_left(
        tmp_path: Path) -> None:
    require_binaries("make", "turnserver")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = {"web": busy.getsockname()[1], "grpc": free_tcp_port(),
                 "turn": free_tcp_udp_port(), "provider": free_tcp_port()}
        failed = start_demo(tmp_path, **ports)
        assert failed.process.wait(60) != 0
    assert failed.finished.wait(10)
    output = "".join(failed.output)
    assert f"cannot listen on 127.0.0.1:{ports['web']}" in output
    assert "Traceback" not in output
    assert not any(port_answers(port) for port in ports.values())


def test_a_part_that_dies_stops_the_whole_demo(tmp_path: Path) -> None:
    require_binaries("make", "turnserver")
    ports = {"web": free_tcp_port(), "grpc": free_tcp_port(), "turn": free_tcp_udp_port(),
             "provider": free_tcp_port()}
    demo = start_demo(tmp_path, **ports)
    try:
        assert demo.ready.wait(START_TIMEOUT) and demo.process.poll() is None, \
            "".join(demo.output)
        (provider,) = [pid for pid, command in processes_naming(
            f"fake_provider.py --listen 127.0.0.1:{ports['provider']}").items()]
        os.kill(provider, signal.SIGKILL)
        assert demo.process.wait(30) != 0
    finally:
        if demo.process.poll() is None:
            demo.ctrl_c()
    assert demo.finished.wait(10)
    assert "icegate demo: provider stopped" in "".join(demo.output)
    assert not any(port_answers(port) for port in ports.values())
    assert processes_naming(str(demo.data_dir)) == {}


def test_ctrl_c_stops_everything_make_demo_started(demo: RunningDemo) -> None:
    """Last in the module: it ends the module's demo."""
    demo.ctrl_c()
    assert demo.finished.wait(10)
    assert "icegate demo: stopping" in "".join(demo.output)
    for name, port in demo.ports.items():
        if not name.startswith("relay"):
            assert not port_answers(port), f"{name} still listens on {port} after Ctrl-C"
    assert processes_naming(str(demo.data_dir)) == {}
