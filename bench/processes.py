"""Child processes of the benchmark: started on free loopback ports, always stopped, measured.

Every server runs in its own session (process group), so stopping it reaches its children
too (`--workers`, uvicorn's reloader-free worker, py-spy); nothing is ever killed by name.
Memory is read from /proc: the sum of VmRSS over a process and all its descendants, sampled
while the load runs, and the per-process high-water marks (VmHWM).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on the loopback nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float,
                  log: Path) -> None:
    """Waits until something accepts connections on `port`, or fails with the child's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited ({process.returncode}):\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{process.args!r} did not listen on {port} within {timeout} s")


class ManagedProcess:
    """One server process in its own process group, listening on `port` once started."""

    def __init__(self, name: str, argv: Sequence[str], *, port: int, log_dir: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 startup_timeout: float = 30.0, http_port: int | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.http_port = http_port
        """icegate's HTTP listener (Connect), waited for too; None for the others."""
        self.log_path = log_dir / f"{name}-{port}.log"
        self.env = dict(env if env is not None else os.environ)
        self.cwd = cwd
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(self.port, self.process, self.startup_timeout, self.log_path)
            if self.http_port is not None:
                wait_for_port(self.http_port, self.process, self.startup_timeout,
                              self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the group, then SIGKILL to whatever is left after `timeout`."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        # Children of the leader (workers) may outlive it for a moment.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        self.process = None

    def __enter__(self) -> ManagedProcess:
        return self if self.process is not None else self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# -- memory ----------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                kids.extend(int(k) for k in text.split())
    return kids


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, as they are now."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def _status_kib(pid: int, field: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def tree_rss_mib(pid: int) -> float:
    """The resident memory of `pid` and its descendants now, MiB."""
    return sum(_status_kib(p, "VmRSS") for p in process_tree(pid)) / 1024


def tree_hwm_mib(pid: int) -> float:
    """The sum of each process's peak resident memory (VmHWM), MiB: an upper bound."""
    return sum(_status_kib(p, "VmHWM") for p in process_tree(pid)) / 1024


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its live descendants (all threads), seconds."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{member}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _CLOCK_TICKS


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / _CLOCK_TICKS, sum(fields) / _CLOCK_TICKS


def wait_for_quiet(max_busy_cores: float, max_wait: float, window: float = 1.0) -> float:
    """Waits (at most `max_wait` s) until the machine's CPU use over `window` seconds is below
    `max_busy_cores`, with nothing of ours under load; returns the last busy figure, cores."""
    deadline = time.monotonic() + max_wait
    cpus = os.cpu_count() or 1
    while True:
        busy, total = machine_busy_seconds()
        time.sleep(window)
        busy_now, total_now = machine_busy_seconds()
        cores = (busy_now - busy) / max(total_now - total, 1e-9) * cpus
        if cores <= max_busy_cores or time.monotonic() >= deadline:
            return cores


class RssSampler:
    """Samples the tree RSS of some processes every `interval` seconds in a thread, and
    measures the CPU they used (in cores) and what the whole machine used meanwhile."""

    def __init__(self, pids: Sequence[int], interval: float = 0.2, *,
                 helpers: Sequence[int] = ()) -> None:
        self._pids = list(pids)
        self._helpers = list(helpers)
        """Processes of the benchmark itself (fake upstreams): neither measured nor foreign."""
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.peak_mib = 0.0
        self.cpu_cores = 0.0
        """CPU seconds the sampled processes used per second of wall time."""
        self.machine_busy = 0.0
        """The fraction of all the machine's CPUs that was busy (this load and anything else)."""
        self.foreign_cores = 0.0
        """CPU used meanwhile by anything but the sampled processes and this process's
        reaped children (h2load): other work on the machine, in cores."""
        self._start = (0.0, 0.0, (0.0, 0.0), 0.0)
        self.started_at = 0.0

    def _sample(self) -> None:
        total = sum(tree_rss_mib(pid) for pid in self._pids)
        self.peak_mib = max(self.peak_mib, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def _cpu(self) -> float:
        return sum(tree_cpu_seconds(pid) for pid in self._pids)

    def _own_cpu(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        helpers = sum(tree_cpu_seconds(pid) for pid in self._helpers)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + helpers

    def __enter__(self) -> RssSampler:
        self._sample()
        self.started_at = time.monotonic()
        self._start = (self.started_at, self._cpu(), machine_busy_seconds(), self._own_cpu())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        started, cpu, (busy, total), own = self._start
        wall = max(time.monotonic() - started, 1e-9)
        self.cpu_cores = (self._cpu() - cpu) / wall
        busy_now, total_now = machine_busy_seconds()
        self.machine_busy = (busy_now - busy) / max(total_now - total, 1e-9)
        cpus = os.cpu_count() or 1
        self.foreign_cores = max(0.0, self.machine_busy * cpus - self.cpu_cores
                                 - (self._own_cpu() - own) / wall)
