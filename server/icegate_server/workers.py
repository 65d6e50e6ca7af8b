"""`icegate-server --workers N`: N server processes sharing the ports (gRPC and, when set, HTTP)
and one Redis store, under one supervisor (grpc's `examples/python/multiprocessing`, with
signals and exit codes).

SQLite serves one process (`store/sqlite.py`): the command line refuses `--workers N` on it
(`refuse_sqlite_workers`), so every worker here talks to the same Redis, and every limit holds
across them as across replicas.

The supervisor (the process the operator started) claims the port, then starts the workers
and watches them:

1. It probes the listen addresses (gRPC, and HTTP when set) with a bind WITHOUT SO_REUSEPORT,
   which fails while anything listens there (another icegate-server with one worker or with
   many, or any other program), so the workers never share a port silently with another
   server. The probes are closed before the workers bind (they could not bind beside them).
2. It starts N workers with the "spawn" start method: each is a fresh interpreter that builds
   its own grpc.aio server (SO_REUSEPORT on), uvloop event loop and store connection. Not
   "fork": gRPC's C core is not fork-safe once initialised. Each worker creates the `default`
   project if it is missing, atomically in the store, as replicas do.

Signals and exit codes, kept simple and predictable:
- SIGTERM or SIGINT to the supervisor is forwarded to every worker as SIGTERM. Each worker turns
  NOT_SERVING, lets in-flight calls finish within ICEGATE_SHUTDOWN_GRACE and exits 0; the
  supervisor exits 0 when every worker did. Workers ignore SIGINT, so a Ctrl-C that the terminal
  sends to the whole process group reaches them once, through the supervisor.
- A worker that exits while no stop was asked for (a crash, a failed bind, a kill) makes the
  supervisor stop the others the same way and exit 1. It does not restart workers: the service
  manager (systemd `Restart=on-failure`, a container restart policy) restarts the whole group.
- Workers that have not exited `grace + 10` seconds after the stop are killed; exit 1.
- A worker whose supervisor disappears (SIGKILL) stops itself gracefully within a second.

All workers change health state together, since they are told to stop together and a dead
worker takes the group down: a health check answered by any worker answers for the service.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from icegate_server.observability.logs import Safe, configure_logging, stop_logging
from icegate_server.settings import ConfigError, Settings, parse_listen_address

log = logging.getLogger(__name__)

STOP_MARGIN_SECONDS = 10.0
"""How long past the shutdown grace workers get to close their store and exit."""

_POLL_SECONDS = 0.2


def refuse_sqlite_workers(settings: Settings) -> None:
    """Stops a start with more than one worker on a SQLite store, which one process owns.

    Raises:
        ConfigError: `settings.workers` is above 1 and the store is SQLite (the message names
            ICEGATE_STORE, in one line).
    """
    if settings.workers > 1 and settings.store_url.startswith("sqlite:"):
        raise ConfigError(
            "invalid setting ICEGATE_STORE: a SQLite store serves one process, not "
            f"{settings.workers} workers (ICEGATE_WORKERS); use Redis (ICEGATE_STORE="
            "redis://...) for more than one process")


def probe_listen_address(listen: str) -> None:
    """Binds each address of `listen` without SO_REUSEPORT, and closes it again.

    Raises:
        OSError: Another server listens on the address (the message names it, in one line).
    """
    host, port = parse_listen_address(listen)
    host = host.removeprefix("[").removesuffix("]")
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as probe:
            # SO_REUSEADDR as gRPC sets it: connections in TIME_WAIT from an earlier run do
            # not count, a listening socket still does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise OSError(f"cannot listen on {listen}: address in use "
                                  "(another server is listening there)") from None
                # Anything else (an IPv6 address on a host without IPv6...) is for the
                # workers' own bind to report, as a single server would.


class _Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers: list[multiprocessing.process.BaseProcess] = []
        self.stop_deadline: float | None = None
        self.failed = False

    def request_stop(self, signum: int, _frame: FrameType | None = None) -> None:
        if self.stop_deadline is None:
            log.info("%s: stopping %d workers (grace %.1f s)", signal.Signals(signum).name,
                     len(self.workers), self.settings.shutdown_grace)
            self.stop_deadline = (time.monotonic() + self.settings.shutdown_grace
                                  + STOP_MARGIN_SECONDS)
        for worker in self.workers:
            _terminate(worker)

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> int:
        context = multiprocessing.get_context("spawn")
        # Children inherit the signal mask: SIGINT stays blocked in a worker until it has set
        # it to SIG_IGN, so a Ctrl-C during start-up cannot kill one half-started.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for index in range(1, self.settings.workers + 1):
                if self.stop_deadline is not None:
                    break
                worker = context.Process(target=_worker_main, name=f"worker-{index}",
                                         args=(self.settings, index, os.getpid()))
                worker.start()
                self.workers.append(worker)
                if self.stop_deadline is not None:
                    _terminate(worker)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        if not self.workers:
            return 0
        log.info("supervising %d workers on %s: pids %s", len(self.workers),
                 Safe(self.settings.listen), Safe(" ".join(str(w.pid) for w in self.workers)))
        return self._watch()

    def _watch(self) -> int:
        running = list(self.workers)
        while running:
            multiprocessing.connection.wait([w.sentinel for w in running], _POLL_SECONDS)
            for worker in [w for w in running if w.exitcode is not None]:
                running.remove(worker)
                worker.join()
                if self.stop_deadline is None:
                    log.error("%s (pid %s) exited with code %s; stopping the others",
                              worker.name, worker.pid, worker.exitcode)
                    self.failed = True
                    self.request_stop(signal.SIGTERM)
                elif worker.exitcode not in (0, -signal.SIGTERM):
                    # -SIGTERM: stopped before its server had started, which is clean too.
                    log.error("%s (pid %s) exited with code %s while stopping",
                              worker.name, worker.pid, worker.exitcode)
                    self.failed = True
            if self.stop_deadline is not None and time.monotonic() > self.stop_deadline:
                for worker in running:
                    log.error("%s (pid %s) did not stop in time; killing it", worker.name,
                              worker.pid)
                    worker.kill()
                    worker.join()
                self.failed = True
                running.clear()
        log.info("all workers stopped")
        return 1 if self.failed else 0


def _terminate(worker: multiprocessing.process.BaseProcess) -> None:
    if worker.exitcode is None and worker.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGTERM)


def supervise_workers(settings: Settings,
                      on_ports_free: Callable[[], None] = lambda: None) -> int:
    """Runs `settings.workers` server processes on one port until SIGTERM/SIGINT.

    `on_ports_free` is called once the listen addresses are found free, before the workers
    start on them (the dev server records them there).

    Returns:
        The exit status: 0 when every worker stopped cleanly after a stop request, else 1.

    Raises:
        OSError: The listen address is taken (the message names it, in one line).
    """
    supervisor = _Supervisor(settings)
    # From here a stop request is honoured without a traceback: no worker is started after it.
    supervisor.install_signal_handlers()
    probe_listen_address(settings.listen)
    if settings.http_listen:
        probe_listen_address(settings.http_listen)
    on_ports_free()
    return supervisor.run()


def _watch_supervisor(supervisor_pid: int) -> None:
    # A worker re-parented to init (or a subreaper) has lost its supervisor: stop gracefully
    # rather than serve on, unsupervised, on a port no new server can take.
    while os.getppid() == supervisor_pid:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker `index`'s settings (from 1): metrics on ICEGATE_METRICS_LISTEN's port + index - 1.

    Each worker counts its own calls, so each serves its own /metrics; Prometheus scrapes
    them all (sum across the workers' ports, as across replicas).
    """
    if not settings.metrics_listen:
        return settings
    host, port = parse_listen_address(settings.metrics_listen)
    return dataclasses.replace(settings, metrics_listen=f"{host}:{port + index - 1}")


def _worker_main(settings: Settings, index: int, supervisor_pid: int) -> None:
    """A worker process: one grpc.aio server (and HTTP listener) on the shared ports, stopped
    by SIGTERM only."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    settings = worker_settings(settings, index)
    configure_logging(settings.log_format, settings.log_level)
    threading.Thread(target=_watch_supervisor, args=(supervisor_pid,), daemon=True,
                     name="icegate-supervisor-watch").start()
    from icegate_server.server import run_server

    try:
        status = run_server(settings, stop_signals=(signal.SIGTERM,))
    finally:
        stop_logging()  # the writer thread batches lines: write out the last ones
    sys.exit(status)
