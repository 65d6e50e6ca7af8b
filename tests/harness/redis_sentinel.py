"""A real Sentinel-managed Redis for integration tests: a primary, a replica and three
`redis-sentinel` processes (Debian's redis-sentinel package), all on free loopback ports.

The sentinels run with short timings (`down-after-milliseconds`, `failover-timeout`), so a
primary that stops answering is replaced by its replica within a few seconds. `start()`
returns once every sentinel monitors the primary, knows the replica and the two other
sentinels (a failover needs a quorum and a majority to elect a leader), so a test can fail
the primary over at once. `url` is the `redis+sentinel://` URL icegate is given.

Each process runs in a temporary directory of its own and is stopped (and the directory
removed) by `stop()` or when the context manager exits.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from harness.ports import LOOPBACK, free_tcp_port
from harness.redis_server import RedisReplyError, RedisServer, RespValue, _read_reply

MASTER_NAME = "icegate"
QUORUM = 2


def command(port: int, *args: str | int, password: str | None = None,
            timeout: float = 2.0) -> RespValue:
    """One command to the Redis or sentinel on `port`, over a fresh connection (after AUTH
    with `password` when given)."""
    commands = [("AUTH", password), args] if password else [args]
    request = b""
    for words in commands:
        parts = [str(a).encode() for a in words]
        request += b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p)
                                                       for p in parts)
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(request)
        reader = sock.makefile("rb")
        if password:
            _read_reply(reader)
        return _read_reply(reader)


def _fields(reply: RespValue) -> dict[str, str]:
    """A flat [name, value, ...] reply (SENTINEL MASTER, a replica's entry) as a dict."""
    assert isinstance(reply, list)
    items = [item.decode() if isinstance(item, bytes) else str(item) for item in reply]
    return dict(zip(items[::2], items[1::2], strict=True))


@dataclass(frozen=True)
class TlsFiles:
    """A TLS port and the PEM files of the process that listens on it."""

    port: int
    cert: str
    key: str
    ca: str


class SentinelProcess:
    """One `redis-sentinel` watching the master `MASTER_NAME`."""

    def __init__(self, port: int, myid: str, primary_port: int, *, down_after_ms: int,
                 failover_timeout_ms: int, known: Sequence[str] = (),
                 password: str | None = None, tls: TlsFiles | None = None,
                 binary: str = "redis-sentinel") -> None:
        self.port = port
        """The plain port the harness asks on."""
        self.public_port = tls.port if tls else port
        """The port clients and the other sentinels use (TLS with `tls`)."""
        self.password = password
        self.directory = Path(tempfile.mkdtemp(prefix="icegate-sentinel-"))
        # Sentinel rewrites its configuration file as it learns (replicas, peers, epochs).
        config = self.directory / "sentinel.conf"
        config.write_text("\n".join([
            f"port {self.port}",
            f"bind {LOOPBACK}",
            "protected-mode no",
            "daemonize no",
            'logfile ""',
            f"dir {self.directory}",
            f"sentinel monitor {MASTER_NAME} {LOOPBACK} {primary_port} {QUORUM}",
            f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}",
            f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
            f"sentinel myid {myid}",
            # The peers and the replica, known from the start: found by themselves, they
            # take Sentinel's hello period (2 s) to appear.
            *known,
            # Clients must AUTH; the sentinels use the same password with each other.
            *([f"requirepass {password}"] if password else []),
            # TLS to clients, and from this sentinel to the servers and the other sentinels.
            *([f"tls-port {tls.port}", f"tls-cert-file {tls.cert}", f"tls-key-file {tls.key}",
               f"tls-ca-cert-file {tls.ca}", "tls-auth-clients no", "tls-replication yes"]
              if tls else []),
            "",
        ]))
        self._log: IO[bytes] = (self.directory / "sentinel.log").open("ab")
        self._process = subprocess.Popen([binary, str(config)], stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=subprocess.STDOUT,
                                         cwd=self.directory)

    def command(self, *args: str | int) -> RespValue:
        return command(self.port, *args, password=self.password)

    def master(self) -> dict[str, str]:
        """What this sentinel knows of the master (`SENTINEL MASTER`)."""
        return _fields(self.command("SENTINEL", "MASTER", MASTER_NAME))

    def master_port(self) -> int | None:
        """The port this sentinel names as the master's, or None while it cannot answer."""
        with contextlib.suppress(OSError, RedisReplyError, ConnectionError):
            reply = self.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
            if isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], bytes):
                return int(reply[1])
        return None

    @property
    def log(self) -> str:
        path = self.directory / "sentinel.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class SentinelGroup:
    """A primary, a replica of it and `sentinels` sentinels watching them.

    Args:
        down_after_ms: How long the primary may not answer before a sentinel thinks it down.
        failover_timeout_ms: Sentinel's failover-timeout (also the pause between two
            failovers of the same master).
        startup_timeout: Seconds `start()` may take.
        user: A (username, password) Redis user the servers accept besides the open default
            user (which the harness and replication use), for a URL that authenticates.
        sentinel_password: The sentinels' `requirepass`.
        tls: (CA, certificate, key) PEM files: every server and sentinel also listens with
            TLS, replicates and talks to its peers over it, and `url` is `rediss+sentinel`
            (the harness itself keeps to the plain ports).
    """

    def __init__(self, *, sentinels: int = 3, down_after_ms: int = 400,
                 failover_timeout_ms: int = 2000, startup_timeout: float = 20.0,
                 user: tuple[str, str] | None = None,
                 sentinel_password: str | None = None,
                 tls: tuple[str, str, str] | None = None) -> None:
        self.sentinel_count = sentinels
        self.tls = tls
        self._public_ports: dict[int, int] = {}
        """Each server's port, by the port its clients use (its TLS one with `tls`)."""
        self.user = user
        self.sentinel_password = sentinel_password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.startup_timeout = startup_timeout
        self.servers: list[RedisServer] = []
        """The primary first, then the replica (as started; a failover swaps their roles)."""
        self.sentinels: list[SentinelProcess] = []

    def start(self) -> SentinelGroup:
        try:
            primary = RedisServer().start()
            self.servers.append(primary)
            replica = RedisServer().start()
            self.servers.append(replica)
            for server in self.servers:
                # A full sync at once, not after the default 5 s wait for more replicas
                # (either may be the master after a failover).
                server.command("CONFIG", "SET", "repl-diskless-sync-delay", "0")
                self._public_ports[server.port] = server.port
                if self.tls is not None:
                    files = self._tls_files()
                    server.command("CONFIG", "SET", "tls-cert-file", files.cert,
                                   "tls-key-file", files.key, "tls-ca-cert-file", files.ca,
                                   "tls-auth-clients", "no", "tls-replication", "yes",
                                   "tls-port", files.port)
                    self._public_ports[server.port] = files.port
                if self.user is not None:
                    server.command("ACL", "SETUSER", self.user[0], "on", f">{self.user[1]}",
                                   "~*", "&*", "+@all")
            replica.command("REPLICAOF", primary.host, self.public_port(primary))
            self._wait("the replica to sync", lambda: self._link_up(replica))
            peers = [(free_tcp_port(), self._tls_files() if self.tls else None,
                      secrets.token_hex(20)) for _ in range(self.sentinel_count)]
            for port, tls, myid in peers:
                known = [f"sentinel known-replica {MASTER_NAME} {LOOPBACK} "
                         f"{self.public_port(replica)}",
                         *(f"sentinel known-sentinel {MASTER_NAME} {LOOPBACK} "
                           f"{t.port if t else p} {i}" for p, t, i in peers if p != port)]
                self.sentinels.append(SentinelProcess(
                    port, myid, self.public_port(primary), down_after_ms=self.down_after_ms,
                    failover_timeout_ms=self.failover_timeout_ms, known=known,
                    password=self.sentinel_password, tls=tls))
            self._wait("every sentinel to know the replica and its peers", self._settled)
        except BaseException:
            self.stop()
            raise
        return self

    def _tls_files(self) -> TlsFiles:
        assert self.tls is not None
        ca, cert, key = self.tls
        return TlsFiles(free_tcp_port(), cert, key, ca)

    def public_port(self, server: RedisServer) -> int:
        """The port the replica, the sentinels and icegate reach `server` on."""
        return self._public_ports[server.port]

    def _link_up(self, replica: RedisServer) -> bool:
        """Whether `replica` is in sync with the master, as the master sees it: after a full
        sync the master streams writes only once the replica is online (diskless sync)."""
        info = replica.command("INFO", "replication")
        if not (isinstance(info, bytes) and b"master_link_status:up" in info):
            return False
        master = next(server for server in self.servers if server is not replica)
        info = master.command("INFO", "replication")
        online = f"port={self.public_port(replica)},state=online".encode()
        return isinstance(info, bytes) and online in info

    def _settled(self) -> bool:
        """Whether every sentinel has spoken to the replica (it could promote it) and to
        its peers (they can vote)."""
        for sentinel in self.sentinels:
            replicas = sentinel.command("SENTINEL", "REPLICAS", MASTER_NAME)
            peers = sentinel.command("SENTINEL", "SENTINELS", MASTER_NAME)
            assert isinstance(replicas, list) and isinstance(peers, list)
            if len(replicas) < len(self.servers) - 1 or len(peers) < self.sentinel_count - 1:
                return False
            for replica in map(_fields, replicas):
                if replica["flags"] != "slave" or replica.get("master-link-status") != "ok":
                    return False
            if any(_fields(peer)["flags"] != "sentinel" for peer in peers):
                return False
        return True

    def _wait(self, what: str, done: object, timeout: float | None = None) -> None:
        assert callable(done)
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, RedisReplyError, ConnectionError):
                if done():
                    return
            time.sleep(0.05)
        logs = "\n".join(s.log[-2000:] for s in self.sentinels)
        raise RuntimeError(f"timed out waiting for {what}:\n{logs}")

    # -- what the tests use ------------------------------------------------------------

    @property
    def url(self) -> str:
        """`redis+sentinel://` with every sentinel, naming the master."""
        hosts = ",".join(f"{LOOPBACK}:{sentinel.public_port}" for sentinel in self.sentinels)
        if self.tls is not None:
            return f"rediss+sentinel://{hosts}/{MASTER_NAME}?ssl_ca_certs={self.tls[0]}"
        return f"redis+sentinel://{hosts}/{MASTER_NAME}"

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            port = sentinel.master_port()
            if port is not None:
                return port
        return None

    @property
    def master(self) -> RedisServer:
        """The server the sentinels name as the master now."""
        port = self.master_port()
        return next(server for server in self.servers if self.public_port(server) == port)

    @property
    def replica(self) -> RedisServer:
        """The server that is not the master now."""
        port = self.master_port()
        return next(server for server in self.servers if self.public_port(server) != port)

    def wait_for_failover(self, away_from: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Waits until every sentinel names another server than `away_from` as the master
        and that server says it is one; returns it."""
        def moved() -> bool:
            ports = {sentinel.master_port() for sentinel in self.sentinels}
            if len(ports) != 1 or self.public_port(away_from) in ports or None in ports:
                return False
            info = self.master.command("INFO", "replication", timeout=0.5)
            return isinstance(info, bytes) and b"role:master" in info

        self._wait(f"a failover away from port {away_from.port}", moved, timeout)
        return self.master

    def cut_off_replica(self) -> None:
        """Breaks the replica's link to the master and keeps it broken (each reconnection
        fails at AUTH), as a partition between them would: the master goes on acknowledging
        writes the replica never gets. `kill_master` ends it."""
        replica = self.replica
        replica.command("CONFIG", "SET", "masterauth", "a-password-the-master-refuses")
        replica.command("CLIENT", "KILL", "TYPE", "master")
        master = self.master
        self._wait("the replica's link to go down",
                   lambda: f"port={self.public_port(replica)},".encode()
                   not in master.command("INFO", "replication"))  # type: ignore[operator]

    def kill_master(self) -> RedisServer:
        """SIGKILLs the master (what it had not sent its replica is lost); the replica may
        then reconnect to whichever master the sentinels pick. Returns the killed server."""
        master, replica = self.master, self.replica
        master.kill()
        replica.command("CONFIG", "SET", "masterauth", "")
        return master

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop()
        self.sentinels.clear()
        self.servers.clear()
        self._public_ports.clear()

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
