"""A real coturn (`turnserver`) on free loopback ports, and a real TURN client to test it.

`Coturn` renders deploy/coturn/turnserver.conf.template (the same template `make coturn`
uses) into a temporary directory, starts `turnserver -c <file>`, and waits until a STUN
Binding request on its UDP port is answered. `allocate()` runs `turnutils_uclient`, which
performs a real authenticated TURN Allocate with the credentials given: exit code 0 means
coturn accepted them, 255 ("Cannot complete Allocation") means it refused them.

Secrets come either from `static-auth-secret=` lines (the `secrets` argument; changing them
needs `restart()`), or from Redis (`redis_port`): coturn then reads the shared secrets of
realm R from the Redis set `turn/realm/R/secret` (see `redis_secret_key`).

How coturn 4.6.1 treats secrets kept in Redis (seen here; the Redis test in
tests/integration/test_harness.py pins the first two points):
- No caching: the set is read again when a request authenticates. A secret added with SADD
  is accepted by the very next Allocate, and one removed with SREM is refused by the very
  next Allocate, with no restart or signal.
- Static secrets, if also configured, are accepted in addition to the Redis ones.
- Redis down: every Allocate is refused (exit 255) at once; when Redis is back coturn
  reconnects by itself and the next Allocate succeeds.
- Not checked here: per coturn.md, expiry (and so the secret) is only checked when an
  allocation authenticates, so removing a secret does not end allocations already made.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from harness.ports import LOOPBACK, RelayPortRange, free_tcp_udp_port, reserve_relay_range

REPO_ROOT = Path(__file__).resolve().parents[2]
TURNSERVER_CONF_TEMPLATE = REPO_ROOT / "deploy" / "coturn" / "turnserver.conf.template"
DEFAULT_REALM = "icegate.test"

_STUN_MAGIC_COOKIE = 0x2112A442
_STUN_BINDING_REQUEST = 0x0001
_STUN_BINDING_SUCCESS = 0x0101
_TURN_ALLOCATE_REQUEST = 0x0003
_TURN_ALLOCATE_SUCCESS = 0x0103
_TURN_ALLOCATE_ERROR = 0x0113
_STUN_ATTR_ERROR_CODE = 0x0009
_TURN_ATTR_REQUESTED_TRANSPORT = 0x0019
_UDP_PROTOCOL = 17


def redis_secret_key(realm: str) -> str:
    """The Redis set coturn reads the REST shared secrets of `realm` from."""
    return f"turn/realm/{realm}/secret"


def rest_credential(secret: str, user_id: str, expiry: int) -> tuple[str, str]:
    """A TURN REST credential computed independently of icegate, as coturn checks it.

    Returns:
        `(username, password)`: username `"<expiry>:<user_id>"`, password
        base64(HMAC-SHA1(secret, username)).
    """
    username = f"{expiry}:{user_id}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def render_turnserver_config(
    *,
    listening_ip: str,
    listening_port: int,
    relay_ip: str,
    min_port: int,
    max_port: int,
    realm: str,
    secrets: Sequence[str],
    state_dir: Path,
    redis_userdb: str | None = None,
    sqlite_userdb: Path | None = None,
    template: Path = TURNSERVER_CONF_TEMPLATE,
) -> str:
    """Fills in the coturn config template.

    Args:
        secrets: shared secrets for `static-auth-secret=` lines, newest first; may be empty
            when the secrets live in Redis.
        redis_userdb: a coturn Redis connection string (`ip=... port=... dbname=0`) to read
            secrets from Redis instead of using the SQLite user database in `state_dir`.
        sqlite_userdb: coturn's SQLite user database file (its `turn_secret` table holds the
            secrets), instead of `state_dir/turndb`.
    """
    for secret in secrets:
        # A newline would let a "secret" inject configuration lines.
        if not secret or "\n" in secret or "\r" in secret:
            raise ValueError("a TURN secret must be a non-empty single line")
    user_database = (
        f'redis-userdb="{redis_userdb}"' if redis_userdb is not None
        else f"userdb={sqlite_userdb or state_dir / 'turndb'}"
    )
    return string.Template(template.read_text()).substitute(
        listening_ip=listening_ip,
        listening_port=listening_port,
        relay_ip=relay_ip,
        min_port=min_port,
        max_port=max_port,
        realm=realm,
        static_auth_secrets="\n".join(f"static-auth-secret={s}" for s in secrets),
        user_database=user_database,
        state_dir=state_dir,
        # The harness's coturn relays between loopback peers (turnutils_uclient -y), plainly;
        # tests/integration/test_coturn_deny_list.py and test_coturn_tls.py run the production
        # rendering (`icegate-server coturn-config`) instead.
        tls="no-tls",
        external_ip="",
        statistics="",
        admin_cli="no-cli",
        peer_access="allow-loopback-peers",
        limits="",
    )


@dataclass(frozen=True)
class AllocationResult:
    """What `turnutils_uclient` reported for one Allocate attempt.

    Attributes:
        ok: coturn accepted the credential and relayed traffic (exit code 0).
        exit_code: the client's exit code (255 when the allocation was refused, -1 when the
            client had to be killed after the timeout).
        output: the client's combined stdout and stderr.
    """

    ok: bool
    exit_code: int
    output: str


class Coturn:
    """One `turnserver` process on free loopback ports.

    Args:
        secrets: REST shared secrets, newest first (`static-auth-secret=` lines).
        realm: the TURN realm.
        redis_port: read secrets from the Redis on this loopback port as well.
        sqlite_userdb: read secrets from this SQLite userdb file as well (the table
            `turn_secret`, which icegate's ICEGATE_COTURN_SQLITE writes).
        binary: the turnserver executable.
        client_binary: the turnutils_uclient executable.
        startup_timeout: seconds to wait until coturn answers STUN.
    """

    def __init__(
        self,
        secrets: Sequence[str] = (),
        *,
        realm: str = DEFAULT_REALM,
        redis_port: int | None = None,
        sqlite_userdb: Path | None = None,
        binary: str = "turnserver",
        client_binary: str = "turnutils_uclient",
        startup_timeout: float = 10.0,
    ) -> None:
        if not secrets and redis_port is None and sqlite_userdb is None:
            raise ValueError("coturn needs static secrets, a database to read them from, "
                             "or both")
        self.secrets = tuple(secrets)
        self.realm = realm
        self.redis_port = redis_port
        self.sqlite_userdb = sqlite_userdb
        self.binary = binary
        self.client_binary = client_binary
        self.startup_timeout = startup_timeout
        self.host = LOOPBACK
        self.port = 0
        self.relay_range: RelayPortRange | None = None
        self.directory: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._last_log = ""

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Coturn:
        """Starts coturn and returns once it answers a STUN Binding request.

        Raises:
            RuntimeError: coturn exited or stayed silent; the message carries its log.
        """
        if self._process is not None:
            raise RuntimeError("turnserver is already running")
        self.directory = Path(tempfile.mkdtemp(prefix="icegate-coturn-"))
        if self.relay_range is None:
            self.relay_range = reserve_relay_range(self.host)
        # Another process can take the port between our probe and coturn's bind; a fresh
        # port on the next try is the cure.
        for _ in range(3):
            self.port = free_tcp_udp_port(self.host)
            self._spawn()
            if self._wait_ready():
                return self
            self._last_log = self.log
            self._kill_process()
        log = self._last_log
        self.stop()
        raise RuntimeError(f"turnserver did not answer STUN on port {self.port}:\n{log}")

    def _spawn(self) -> None:
        assert self.directory is not None and self.relay_range is not None
        redis_userdb = None
        if self.redis_port is not None:
            redis_userdb = f"ip={LOOPBACK} dbname=0 port={self.redis_port} connect_timeout=5"
        config = render_turnserver_config(
            listening_ip=self.host,
            listening_port=self.port,
            relay_ip=self.host,
            min_port=self.relay_range.min_port,
            max_port=self.relay_range.max_port,
            realm=self.realm,
            secrets=self.secrets,
            state_dir=self.directory,
            redis_userdb=redis_userdb,
            sqlite_userdb=self.sqlite_userdb,
        )
        config = self._adjust_config(config)
        config_path = self.directory / "turnserver.conf"
        config_path.write_text(config)
        self._log = (self.directory / "turnserver.log").open("wb")
        self._process = subprocess.Popen(
            [self.binary, "-c", str(config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.directory,
            # Its own process group, so a Ctrl-C aimed at pytest does not hit coturn first.
            start_new_session=True,
        )

    def _adjust_config(self, config: str) -> str:
        """The rendered config as this coturn runs it (subclasses add lines)."""
        return config

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            if _stun_binding_answered(self.host, self.port, timeout=0.1):
                return True
        return False

    def stop(self) -> None:
        """Stops coturn, frees its relay ports and removes its directory."""
        if self._process is not None:
            self._last_log = self.log
        self._kill_process()
        if self.relay_range is not None:
            self.relay_range.release()
            self.relay_range = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def restart(self, secrets: Sequence[str] | None = None) -> None:
        """Restarts coturn, with a new list of static secrets when `secrets` is given.

        The listening port may change; read `port` again after a restart.
        """
        self.stop()
        if secrets is not None:
            self.secrets = tuple(secrets)
        self.start()

    def _kill_process(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.send_signal(signal.SIGTERM)
                try:
                    self._process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(timeout=5)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Coturn:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- use -----------------------------------------------------------------------------

    @property
    def log(self) -> str:
        """coturn's log so far (or, once stopped, as it was when it stopped)."""
        if self.directory is None:
            return self._last_log
        path = self.directory / "turnserver.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def turn_uri(self) -> str:
        """The `turn:` URI of this server (UDP)."""
        return f"turn:{self.host}:{self.port}?transport=udp"

    def allocate(self, username: str, password: str, *, timeout: float = 10.0) -> AllocationResult:
        """Runs a real TURN Allocate (and relays one message) with these credentials."""
        if self._process is None:
            raise RuntimeError("turnserver is not running")
        return allocate(self.host, self.port, username, password, timeout=timeout,
                        client_binary=self.client_binary)

    def allocate_each(self, credentials: Sequence[tuple[str, str]], *,
                      timeout: float = 10.0) -> list[AllocationResult]:
        """`allocate` for each (username, password), all at once (each client runs for
        seconds; a refused one longer), the results in the same order."""
        with ThreadPoolExecutor(max(len(credentials), 1)) as pool:
            return list(pool.map(lambda pair: self.allocate(*pair, timeout=timeout),
                                 credentials))


def allocate(host: str, port: int, username: str, password: str, *, timeout: float = 10.0,
             client_binary: str = "turnutils_uclient") -> AllocationResult:
    """Runs `turnutils_uclient`: a real TURN Allocate on host:port that relays one message.

    Works with any coturn listening on loopback with loopback peers allowed, not only one
    `Coturn` started.
    """
    args = [
        client_binary, "-p", str(port), "-n", "1", "-m", "1", "-l", "100", "-y",
        "-u", username, "-w", password, "-e", host, host,
    ]
    try:
        completed = subprocess.run(
            args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = _decode(exc.stdout) + _decode(exc.stderr)
        return AllocationResult(ok=False, exit_code=-1, output=output + "\n(timed out)")
    output = _decode(completed.stdout) + _decode(completed.stderr)
    return AllocationResult(ok=completed.returncode == 0, exit_code=completed.returncode,
                            output=output)


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def _stun_binding_answered(host: str, port: int, timeout: float) -> bool:
    """Whether a STUN server on host:port (UDP) answers a Binding request."""
    transaction_id = os.urandom(12)
    request = (
        _STUN_BINDING_REQUEST.to_bytes(2, "big") + (0).to_bytes(2, "big")
        + _STUN_MAGIC_COOKIE.to_bytes(4, "big") + transaction_id
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(request, (host, port))
            reply, _ = sock.recvfrom(2048)
        except OSError:
            # A timeout or an ICMP port-unreachable (ConnectionRefusedError): not up yet.
            time.sleep(0.02)
            return False
    return (
        len(reply) >= 20
        and int.from_bytes(reply[0:2], "big") == _STUN_BINDING_SUCCESS
        and reply[8:20] == transaction_id
    )


def unauthenticated_allocate(host: str, port: int, *, timeout: float = 2.0,
                             attempts: int = 5) -> int:
    """Sends a TURN Allocate with no credentials at all, as an anonymous client would.

    Returns:
        0 when coturn granted a relay (an open relay), else the STUN error code it answered
        (401 Unauthorized when it asks for credentials, as a coturn with auth does).

    Raises:
        TimeoutError: nothing answered on host:port (UDP).
    """
    transaction_id = os.urandom(12)
    attribute = (_TURN_ATTR_REQUESTED_TRANSPORT.to_bytes(2, "big") + (4).to_bytes(2, "big")
                 + bytes([_UDP_PROTOCOL, 0, 0, 0]))
    request = (_TURN_ALLOCATE_REQUEST.to_bytes(2, "big") + len(attribute).to_bytes(2, "big")
               + _STUN_MAGIC_COOKIE.to_bytes(4, "big") + transaction_id + attribute)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout / attempts)
        for _ in range(attempts):  # UDP: a lost request is sent again
            try:
                sock.sendto(request, (host, port))
                reply, _ = sock.recvfrom(2048)
            except OSError:
                continue
            if len(reply) >= 20 and reply[8:20] == transaction_id:
                break
        else:
            raise TimeoutError(f"no answer to a TURN Allocate on {host}:{port}")
    kind = int.from_bytes(reply[0:2], "big")
    if kind == _TURN_ALLOCATE_SUCCESS:
        return 0
    if kind != _TURN_ALLOCATE_ERROR:
        raise ValueError(f"unexpected STUN message type {kind:#06x}")
    offset = 20
    while offset + 4 <= len(reply):
        attr_type = int.from_bytes(reply[offset:offset + 2], "big")
        length = int.from_bytes(reply[offset + 2:offset + 4], "big")
        value = reply[offset + 4:offset + 4 + length]
        if attr_type == _STUN_ATTR_ERROR_CODE and len(value) >= 4:
            return (value[2] & 0x7) * 100 + value[3]
        offset += 4 + (length + 3) // 4 * 4
    raise ValueError("Allocate error answer without an ERROR-CODE")
