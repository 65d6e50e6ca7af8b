"""A real, throw-away `redis-server` on a free loopback port, for integration tests.

The server runs in its own temporary directory, never touches the system Redis and is
stopped (and its directory removed) by `stop()` or when the context manager exits.

Persistence, for tests that restart Redis under the service:

* `appendonly=True` (with `appendfsync always`): every write is on disk before Redis
  answers, so data survives `restart()` and even `kill()` followed by `start()`.
* `appendonly=False` (the default, fastest): no snapshots are taken while running
  (`--save ""`), but a graceful `stop()`/`restart()` asks for `SHUTDOWN SAVE`, so the data
  survives a restart through `dump.rdb`; it does not survive `kill()`.

Readiness is checked with a PING over a raw socket, so the harness does not depend on
redis-py; `command()` speaks enough RESP for tests to set up and inspect data.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from harness.ports import LOOPBACK, free_tcp_port

RespValue = bytes | int | list["RespValue"] | None


class RedisReplyError(Exception):
    """Redis answered a command with an error reply (`-ERR ...`)."""


class RedisServer:
    """One `redis-server` process on a free loopback port.

    Args:
        appendonly: keep an append-only file fsynced on every write (survives SIGKILL).
        binary: the redis-server executable to run.
        startup_timeout: seconds to wait for the first successful PING.
    """

    def __init__(self, *, appendonly: bool = False, binary: str = "redis-server",
                 startup_timeout: float = 10.0) -> None:
        self.appendonly = appendonly
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.host = LOOPBACK
        self.port = 0
        self.directory: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._paused = False

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> RedisServer:
        """Starts Redis (on the same port and data directory as before, after a restart)."""
        if self._process is not None:
            raise RuntimeError("redis-server is already running")
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="icegate-redis-"))
        # The first start picks a port; a restart keeps it so URLs handed out stay valid.
        keep_port = self.port != 0
        for _ in range(1 if keep_port else 3):
            if not keep_port:
                self.port = free_tcp_port()
            self._spawn()
            if self._wait_ready():
                return self
            self._terminate_process(signal.SIGKILL)
        raise RuntimeError(f"redis-server did not become ready on port {self.port}:\n{self.log}")

    def _spawn(self) -> None:
        assert self.directory is not None
        args = [
            self.binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--dbfilename", "dump.rdb",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
        ]
        self._log = (self.directory / "redis.log").open("ab")
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.directory,
        )
        self._paused = False

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            # PING answers -LOADING while an AOF/RDB is read back, so only +PONG counts.
            with contextlib.suppress(OSError, RedisReplyError):
                if self.command("PING", timeout=0.5) == b"PONG":
                    return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Shuts Redis down gracefully (saving its data) and removes its directory."""
        self._shutdown_gracefully()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
        self.port = 0

    def restart(self) -> None:
        """Stops Redis gracefully and starts it again on the same port with the same data."""
        self._shutdown_gracefully()
        self.start()

    def kill(self) -> None:
        """SIGKILLs Redis: a crash. Data survives a later `start()` only with appendonly."""
        self._terminate_process(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOPs Redis: connections stay open but nothing is answered until `resume()`."""
        if self._process is None:
            raise RuntimeError("redis-server is not running")
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONTs a paused Redis."""
        if self._process is None:
            raise RuntimeError("redis-server is not running")
        self._process.send_signal(signal.SIGCONT)
        self._paused = False

    def _shutdown_gracefully(self) -> None:
        if self._process is None:
            return
        if self._paused:
            self.resume()
        if self._process.poll() is None:
            # SHUTDOWN closes the connection instead of answering when it succeeds.
            with contextlib.suppress(OSError, RedisReplyError):
                self.command("SHUTDOWN", "SAVE", timeout=5.0)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._terminate_process(signal.SIGKILL)
        self._release_process()

    def _terminate_process(self, sig: signal.Signals) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(sig)
            if self._paused and sig != signal.SIGKILL:
                self._process.send_signal(signal.SIGCONT)
            self._process.wait(timeout=10)
        self._release_process()

    def _release_process(self) -> None:
        self._process = None
        self._paused = False
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- inspection --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The `redis://` URL of database 0."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is alive (a paused server counts as running)."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id, while running."""
        return self._process.pid if self._process is not None else None

    @property
    def log(self) -> str:
        """Everything redis-server has logged so far."""
        if self.directory is None:
            return ""
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def command(self, *args: str | bytes | int, timeout: float = 5.0) -> RespValue:
        """Sends one command over a fresh connection and returns the decoded reply.

        Simple strings and bulk strings come back as bytes, integers as int, arrays as
        lists, nil as None.

        Raises:
            RedisReplyError: Redis answered with an error.
            OSError: the connection failed or timed out.
        """
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        request = b"*%d\r\n" % len(parts) + b"".join(
            b"$%d\r\n%s\r\n" % (len(p), p) for p in parts
        )
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(request)
            reader = sock.makefile("rb")
            return _read_reply(reader)


def _read_reply(reader: IO[bytes]) -> RespValue:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed before a complete reply")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body
    if kind == b"-":
        raise RedisReplyError(body.decode(errors="replace"))
    if kind == b":":
        return int(body)
    if kind == b"$":
        length = int(body)
        if length < 0:
            return None
        data = reader.read(length + 2)
        return data[:-2]
    if kind == b"*":
        count = int(body)
        if count < 0:
            return None
        return [_read_reply(reader) for _ in range(count)]
    raise ConnectionError(f"unexpected RESP reply type {kind!r}")
