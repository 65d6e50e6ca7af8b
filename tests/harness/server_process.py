"""`icegate-server` as a separate process: for replicas, restarts and signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from harness.icegate_server import TEST_ADMIN_KEY, TEST_MASTER_KEY, TEST_TURN_SECRET

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """One `icegate-server` process on a free loopback port."""

    def __init__(self, workdir: Path, **settings: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ICEGATE_")}
        self.env.update({
            "ICEGATE_LISTEN": f"127.0.0.1:{self.port}",
            "ICEGATE_TURN_SECRETS": TEST_TURN_SECRET,
            "ICEGATE_API_KEYS": TEST_ADMIN_KEY,
            "ICEGATE_MASTER_KEY": TEST_MASTER_KEY,
            "ICEGATE_DEV_SECRETS": "false",
            "ICEGATE_SHUTDOWN_GRACE": "5",
        })
        self.env.update({f"ICEGATE_{k.upper()}": v for k, v in settings.items()})
        self.process: subprocess.Popen[bytes] | None = None
        self.new_session = False  # True: its own process group, as a terminal's job is
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        self.log = (self.workdir / f"server-{self.port}.log").open("ab")
        self.process = subprocess.Popen([str(BIN / "icegate-server")], cwd=self.workdir,
                                        env=self.env, stdout=self.log, stderr=self.log,
                                        start_new_session=self.new_session)
        # Every port it was given: grpc accepts connections on the gRPC port from the moment
        # the server is created, before the HTTP listener (started first) listens.
        ports = [self.port]
        http_listen = self.env.get("ICEGATE_HTTP_LISTEN", "")
        if http_listen and not http_listen.endswith(":0"):
            ports.append(int(http_listen.rpartition(":")[2]))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"icegate-server exited: {self.read_log()}")
            try:
                for port in ports:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        pass
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"icegate-server did not listen within {timeout} s")

    def read_log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.workdir.glob("server-*.log"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            self.log.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
