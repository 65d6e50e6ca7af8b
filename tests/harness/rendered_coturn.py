"""coturn started with the config `icegate-server coturn-config` renders, as an operator runs it.

`tests/harness/coturn.py` renders the template itself, with loopback peers allowed, so its
tests can relay on loopback. The deploy tests instead render through icegate's own command
(the production rendering unless told otherwise) and start coturn on that file untouched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from harness.turn_client import wait_until_answering

ICEGATE_SERVER = Path(sys.executable).parent / "icegate-server"


def run_coturn_config_command(environment: Mapping[str, str], output: Path,
                              *options: str) -> subprocess.CompletedProcess[str]:
    """Runs `icegate-server coturn-config --output OUTPUT OPTIONS...` with only `environment`
    for ICEGATE_* settings (none inherited from the test process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICEGATE_")}
    env.update(environment)
    return subprocess.run([str(ICEGATE_SERVER), "coturn-config", "--output", str(output),
                           *options], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


class RenderedCoturn:
    """`turnserver -c CONFIG` (or `argv`, e.g. under setpriv), answering on host:port."""

    def __init__(self, config: Path, host: str, port: int, *,
                 argv: Sequence[str] | None = None) -> None:
        self.config, self.host, self.port = config, host, port
        self.argv = list(argv) if argv is not None else ["turnserver", "-c", str(config)]
        self.log_path = config.with_suffix(".log")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> RenderedCoturn:
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_answering(self.host, self.port)
        except TimeoutError:
            self.stop()
            raise AssertionError(f"coturn did not answer on {self.host}:{self.port}:\n"
                                 f"{self.log}") from None
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        self._process = None

    def __enter__(self) -> RenderedCoturn:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
