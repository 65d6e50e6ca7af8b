"""`make demo`: a whole realtime voice session on this machine, in your own browser.

Starts, each as its own process with its log in `<data-dir>/logs/`:
1. the demo's fake provider (fake_provider.py: a real WebRTC peer, OpenAI's calls API);
2. the dev server (`icegate-server` with `make run`'s settings: dev secrets and coturn's
   SQLite userdb in the data directory), its OpenAI base URL pointed at the fake;
3. a coturn in step with it (`make coturn`: the same secrets, realm and TURN port);
4. the FastAPI example with the demo page (web.py), on a caller key made for it;
then prints the page's URL. Ctrl-C (or SIGTERM) stops everything it started, in reverse order.

The data directory is the demo's own (`.icegate/demo` by default), not `make run`'s: the demo
sets the project's OpenAI key to the fake's, which must never replace a real one. The ports of
the server, coturn and the fake are free ones unless given.

    make demo                          # the page on http://127.0.0.1:8000/
    make demo ARGS="--web 127.0.0.1:9000 --turn-port 3478"
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
PROJECT = "default"
FAKE_PROVIDER_KEY = "sk-demo-fake-provider-key-not-a-real-one"
"""The key the fake accepts, set as the project's OpenAI key: it opens nothing anywhere else."""
CALLER_KEY_NAME = "demo-web"
STORE_FILES = "icegate.sqlite3*"
"""The dev server's SQLite store in its data directory, with its -wal, -shm and lock files."""
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class DemoError(Exception):
    """The demo cannot start; the message says why in one line."""


def free_port(udp_too: bool = False) -> int:
    """A loopback port nothing listens on now (for coturn: free for both TCP and UDP)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if not udp_too:
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe, \
                contextlib.suppress(OSError):
            probe.bind(("127.0.0.1", port))
            return port
    raise DemoError("no free loopback port")


def split_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not host:port")
    return host.strip("[]"), int(port)


def port_range(value: str) -> tuple[int, int]:
    low, _, high = value.partition("-")
    if not (low.isascii() and low.isdigit() and high.isascii() and high.isdigit()
            and 1024 <= int(low) <= int(high) <= 65535):
        raise argparse.ArgumentTypeError(f"{value!r} is not MIN-MAX (1024-65535)")
    return int(low), int(high)


def ensure_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise DemoError(f"{what}: cannot listen on {host}:{port} ({error.strerror}); "
                            "pass another with ARGS=...") from None


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM if the launcher dies without stopping it (kill -9).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    """One started process: its own process group, its output in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes] = field(repr=False)
    ready: Callable[[], bool] = field(repr=False)

    def tail(self, lines: int = 15) -> str:
        self.log.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(f"  {self.name}| {line}" for line in text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            # The whole group: `make coturn` and its turnserver, not make alone.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # Whatever the group left behind (a turnserver whose make went first).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


class Demo:
    """The started processes, stopped in reverse order whatever happens."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.logs = data_dir / "logs"
        self.children: list[Child] = []
        self.lock: IO[bytes] | None = None
        # Nothing of the caller's ICEGATE_* settings reaches the demo's processes: the demo
        # sets its own, and a stray ICEGATE_STORE or ICEGATE_TARGET would point elsewhere.
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith("ICEGATE_")}

    def own(self, data_dir: Path) -> None:
        """Holds the data directory for this run (an flock, let go when the launcher exits).

        Raises:
            DemoError: Another demo runs on it.
        """
        self.lock = (data_dir / "demo.lock").open("wb")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DemoError(f"another make demo runs with {data_dir}; stop it first, or "
                            "pass another --data-dir") from None

    def start(self, name: str, command: Sequence[str], env: dict[str, str],
              ready: Callable[[], bool]) -> Child:
        """Starts a process; `wait_ready` waits until `ready()` says it serves."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            list(command), cwd=REPO, env={**self.base_env, **env}, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent)
        child = Child(name, process, log_path, log, ready)
        self.children.append(child)
        return child

    def wait_ready(self, *children: Child) -> None:
        """Waits for the children (started side by side) to serve; DemoError if one exits
        or takes longer than START_TIMEOUT."""
        deadline = time.monotonic() + START_TIMEOUT
        waiting = list(children)
        while waiting:
            for child in list(waiting):
                if child.ready():
                    waiting.remove(child)
                elif child.process.poll() is not None:
                    raise DemoError(f"{child.name} exited at start (code "
                                    f"{child.process.returncode}); its log, {child.log_path}:"
                                    f"\n{child.tail()}")
            if waiting and time.monotonic() > deadline:
                child = waiting[0]
                raise DemoError(f"{child.name} not ready after {START_TIMEOUT:.0f} s; its log, "
                                f"{child.log_path}:\n{child.tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        while self.children:
            self.children.pop().stop()

    def failed_child(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)


def listening(host: str, port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            return False
    return check


def caller_key(target: str, admin_key: str) -> str:
    """Sets the project's OpenAI key to the fake's; a fresh caller key for the web app (the
    previous demo runs' keys revoked), as a real backend would hold."""
    import icegate

    with icegate.Client(target, admin_key) as admin:
        admin.set_provider_key(PROJECT, "openai", FAKE_PROVIDER_KEY, timeout=10)
        for key in admin.list_all_api_keys(PROJECT, timeout=10):
            if key.display_name == CALLER_KEY_NAME and not key.HasField("revoke_time"):
                admin.revoke_api_key(key.key_id, timeout=10)
        created = admin.create_api_key(PROJECT, display_name=CALLER_KEY_NAME, timeout=10)
    return str(created.secret)


def run(args: argparse.Namespace, demo: Demo) -> None:
    data_dir: Path = args.data_dir.resolve()
    web_host, web_port = args.web
    grpc_port = args.grpc_port or free_port()
    turn_port = args.turn_port or free_port(udp_too=True)
    provider_port = args.provider_port or free_port()
    ensure_free(web_host, web_port, "the demo page (--web)")
    for port, what in ((grpc_port, "icegate (--grpc-port)"), (turn_port, "coturn (--turn-port)"),
                       (provider_port, "the fake provider (--provider-port)")):
        ensure_free("127.0.0.1", port, what)
    (data_dir / "coturn").mkdir(parents=True, exist_ok=True)
    demo.own(data_dir)
    # A fresh store for every run: a session left open when the last demo stopped (its lease
    # lasts an hour) must not count against this one's concurrency limit. The dev secrets
    # stay, so coturn's userdb and the TURN secret do not change between runs.
    for leftover in data_dir.glob(STORE_FILES):
        leftover.unlink()
    target = f"127.0.0.1:{grpc_port}"
    # `make run`'s settings (Makefile: DEV_SETTINGS), the demo's ports and fake provider.
    server_env = {
        "ICEGATE_DATA_DIR": str(data_dir),
        "ICEGATE_COTURN_SQLITE": str(data_dir.resolve() / "coturn" / "turndb"),
        "ICEGATE_LISTEN": target,
        "ICEGATE_TURN_URIS": f"turn:127.0.0.1:{turn_port}?transport=udp,"
                             f"turn:127.0.0.1:{turn_port}?transport=tcp",
        "ICEGATE_STUN_URIS": f"stun:127.0.0.1:{turn_port}",
        "ICEGATE_OPENAI_BASE_URL": f"http://127.0.0.1:{provider_port}",
        "ICEGATE_LOG_FORMAT": "text",
    }

    # Side by side where nothing waits on the other: the fake and the server; then coturn
    # (which reads the userdb the server writes at start) and the web app (on a key the
    # server makes).
    demo.wait_ready(
        demo.start("provider", [sys.executable, str(HERE / "fake_provider.py"),
                                "--listen", f"127.0.0.1:{provider_port}"],
                   {"DEMO_PROVIDER_KEY": FAKE_PROVIDER_KEY},
                   listening("127.0.0.1", provider_port)),
        demo.start("icegate", [str(BIN / "icegate-server")], server_env,
                   listening("127.0.0.1", grpc_port)))
    rendering = ["--coturn-min-port", str(args.relay_ports[0]),
                 "--coturn-max-port", str(args.relay_ports[1])] if args.relay_ports else []
    coturn = demo.start("coturn", ["make", "--no-print-directory", "coturn",
                                   f"DEV_DIR={data_dir}", f"ARGS={' '.join(rendering)}"],
                        server_env, listening("127.0.0.1", turn_port))
    with (data_dir / "dev-secrets.json").open(encoding="utf-8") as secrets_file:
        admin_key = json.load(secrets_file)["api_key"]
    web_env = {"ICEGATE_TARGET": target, "ICEGATE_API_KEY": caller_key(target, admin_key)}
    web = demo.start("web", [sys.executable, str(HERE / "web.py"), "--listen",
                             f"{web_host}:{web_port}"], web_env, listening(web_host, web_port))
    demo.wait_ready(coturn, web)

    shown_host = f"[{web_host}]" if ":" in web_host else web_host
    print(f"""
icegate demo: open http://{shown_host}:{web_port}/ and press Start.
  icegate (gRPC)  {target}   data and logs in {data_dir}/
  coturn          127.0.0.1:{turn_port} (UDP and TCP)
  fake provider   http://127.0.0.1:{provider_port} (a development aid: no model behind it)
Ctrl-C stops them all.""", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make demo", description="a realtime call in your browser, relayed by coturn")
    parser.add_argument("--data-dir", type=Path, default=REPO / ".icegate" / "demo",
                        help="the demo's store, dev secrets and logs (default .icegate/demo)")
    parser.add_argument("--web", type=split_listen, default=("127.0.0.1", 8000),
                        metavar="HOST:PORT", help="the page (default 127.0.0.1:8000)")
    parser.add_argument("--grpc-port", type=int, default=0, help="icegate (default: free)")
    parser.add_argument("--turn-port", type=int, default=0, help="coturn (default: free)")
    parser.add_argument("--provider-port", type=int, default=0, help="the fake (default: free)")
    parser.add_argument("--relay-ports", type=port_range, default=None, metavar="MIN-MAX",
                        help="coturn's relay ports (default: make coturn's)")
    args = parser.parse_args(argv)

    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    demo = Demo(args.data_dir)
    try:
        run(args, demo)
        while (gone := demo.failed_child()) is None:
            time.sleep(0.5)
        print(f"icegate demo: {gone.name} stopped (code {gone.process.returncode}); its log:\n"
              f"{gone.tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nicegate demo: stopping", flush=True)
        return 0
    except DemoError as error:
        print(f"icegate demo: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
