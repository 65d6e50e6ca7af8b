"""The documented systemd install of coturn, done for real into a temporary root.

The steps are the ones deploy/systemd/icegate.service and coturn.service.d/icegate.conf tell
the operator to run (tests/unit/test_deploy_files.py pins that the docs name them), with
DESTDIR pointing at a temporary root: the same directories, owners and modes. coturn then
runs as its own user, `turnserver`, with the drop-in's own ExecStartPre and ExecStart
command lines, as systemd would run them (User=turnserver applies to both).

Before the fix (config in /etc/icegate, 0750 root:root) coturn could not read its file, ran
on defaults and granted a relay to a client with no credentials at all;
`test_an_unreadable_config_no_longer_makes_an_open_relay` keeps that layout and shows both
guards.
"""

from __future__ import annotations

import configparser
import grp
import os
import pwd
import shlex
import shutil
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import icegate
from harness.coturn import _stun_binding_answered, unauthenticated_allocate
from harness.icegate_server import (
    TEST_ADMIN_KEY,
    TEST_MASTER_KEY,
    TEST_TURN_SECRET,
    RunningServer,
    server_settings,
)
from harness.ports import free_tcp_udp_port, reserve_relay_range
from harness.pytest_plugin import require_binaries
from harness.turn_client import TurnClient
from icegate_server.clock import FrozenClock

pytestmark = pytest.mark.coturn

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "deploy" / "systemd"
DROP_IN = SYSTEMD / "coturn.service.d" / "icegate.conf"
INSTALLED_CONF = "/etc/icegate-coturn/turnserver.conf"
REALM = "icegate.test"


def require_root_and_turnserver_user() -> None:
    """Skips (fails on CI) unless this runs as root on a machine with coturn's user."""
    require_binaries("turnserver", "turnutils_uclient", "setpriv")
    problem = ""
    if os.geteuid() != 0:
        problem = "the coturn install test must run as root (it chowns to turnserver)"
    else:
        try:
            pwd.getpwnam("turnserver")
        except KeyError:
            problem = "no turnserver user (Debian's coturn package creates it)"
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)


def drop_in_command(key: str) -> list[str]:
    """The words of the drop-in's `key` line (the last one: ExecStart= resets come first)."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(DROP_IN.read_text())
    return shlex.split(unit["Service"][key].replace("\\\n", " ").replace("\\", " "))


def as_turnserver(argv: Sequence[str]) -> list[str]:
    """argv run as the unit runs it: User=turnserver, Group=turnserver, its groups."""
    return ["setpriv", "--reuid=turnserver", "--regid=turnserver", "--init-groups", *argv]


def rerooted(argv: Sequence[str], root: Path) -> list[str]:
    return [str(root) + word if word == INSTALLED_CONF else word for word in argv]


@pytest.fixture
def install_root() -> Iterator[Path]:
    """An empty root directory that the turnserver user may traverse (pytest's tmp is 0700)."""
    require_root_and_turnserver_user()
    root = Path(tempfile.mkdtemp(prefix="icegate-root-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def install_as_documented(root: Path, env: dict[str, str], relay: tuple[int, int], *,
                         check: bool = True) -> Path:
    """icegate.service's /etc/icegate steps, then deploy/systemd/install-coturn-config."""
    etc_icegate = root / "etc" / "icegate"
    (root / "etc").mkdir(mode=0o755, exist_ok=True)
    # `install -d -m 0750 /etc/icegate`, `install -m 0600 icegate.env /etc/icegate/icegate.env`
    subprocess.run(["install", "-d", "-m", "0750", str(etc_icegate)], check=True)
    env_file = root / "icegate.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
    subprocess.run(["install", "-m", "0600", str(env_file),
                    str(etc_icegate / "icegate.env")], check=True)
    script_env = {"PATH": os.environ["PATH"], "DESTDIR": str(root),
                  "ICEGATE_SERVER": str(Path(sys.executable).parent / "icegate-server")}
    subprocess.run([str(SYSTEMD / "install-coturn-config"), "127.0.0.1", str(relay[0]),
                    str(relay[1])], env=script_env, check=check, timeout=60)
    return root / INSTALLED_CONF.lstrip("/")


def owner_mode(path: Path) -> tuple[str, str, str]:
    info = path.stat()
    return (pwd.getpwuid(info.st_uid).pw_name, grp.getgrgid(info.st_gid).gr_name,
            oct(stat.S_IMODE(info.st_mode)))


def start_coturn(argv: Sequence[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(as_turnserver(argv), stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(100):
        if process.poll() is not None:
            raise AssertionError(f"coturn exited {process.returncode}:\n{log.read_text()}")
        if _stun_binding_answered("127.0.0.1", port, timeout=0.1):
            return process
    process.kill()
    raise AssertionError(f"coturn never answered STUN on {port}:\n{log.read_text()}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def test_documented_install_gives_coturn_a_config_it_reads_and_enforces(install_root,
                                                                        tmp_path):
    port = free_tcp_udp_port()
    relay = reserve_relay_range()
    env = {"ICEGATE_TURN_SECRETS": TEST_TURN_SECRET, "ICEGATE_API_KEYS": TEST_ADMIN_KEY,
           "ICEGATE_MASTER_KEY": TEST_MASTER_KEY, "ICEGATE_DEV_SECRETS": "false",
           "ICEGATE_TURN_REALM": REALM,
           "ICEGATE_TURN_URIS": f"turn:127.0.0.1:{port}?transport=udp"}
    try:
        conf = install_as_documented(install_root, env, (relay.min_port, relay.max_port))
        assert owner_mode(install_root / "etc" / "icegate") == ("root", "root", "0o750")
        assert owner_mode(install_root / "etc" / "icegate" / "icegate.env") == (
            "root", "root", "0o600")
        assert owner_mode(conf.parent) == ("root", "turnserver", "0o750")
        assert owner_mode(conf) == ("root", "turnserver", "0o640")
        assert f"realm={REALM}" in conf.read_text().splitlines()

        # The unit's guard, as the unit runs it: passes on the installed file.
        guard = rerooted(drop_in_command("ExecStartPre"), install_root)
        assert subprocess.run(as_turnserver(guard), check=False).returncode == 0

        # The unit's own ExecStart, every word of it, as turnserver.
        exec_start = rerooted(drop_in_command("ExecStart"), install_root)
        coturn = start_coturn(exec_start, port, tmp_path / "coturn.log")
        try:
            settings = server_settings(tmp_path / "icegate", turn_realm=REALM,
                                       turn_uris=(env["ICEGATE_TURN_URIS"],))
            with RunningServer(settings, FrozenClock(time.time())) as server, \
                    icegate.Client(server.target, TEST_ADMIN_KEY) as client:
                issued = client.issue_turn_credentials("alice", ttl=600)
            with TurnClient("127.0.0.1", port) as turn:
                assert turn.allocate(issued.username, issued.password).code == 0
                # The installed config carries the deny-list: nothing on this host (icegate,
                # Redis, coturn's CLI) or its private networks is reachable through the relay.
                assert turn.create_permission("127.0.0.1") == 403
                assert turn.create_permission("10.1.2.3") == 403
            assert unauthenticated_allocate("127.0.0.1", port) == 401
            with TurnClient("127.0.0.1", port) as turn:
                assert turn.allocate(issued.username, "A" + issued.password[1:]).code == 401
        finally:
            stop(coturn)

        # The guard refuses a config turnserver cannot read, and a missing one.
        conf.chmod(0o600)
        assert subprocess.run(as_turnserver(guard), check=False).returncode != 0
        conf.unlink()
        assert subprocess.run(as_turnserver(guard), check=False).returncode != 0
    finally:
        relay.release()


def test_an_unreadable_config_no_longer_makes_an_open_relay(install_root, tmp_path):
    """The old layout: the config in /etc/icegate (0750 root:root), closed to turnserver."""
    etc_icegate = install_root / "etc" / "icegate"
    etc_icegate.mkdir(parents=True, mode=0o750)
    conf = etc_icegate / "turnserver.conf"
    conf.write_text(f"use-auth-secret\nstatic-auth-secret={TEST_TURN_SECRET}\nrealm={REALM}\n")
    os.chown(conf, 0, grp.getgrnam("turnserver").gr_gid)
    conf.chmod(0o640)

    guard = [drop_in_command("ExecStartPre")[0], "-r", str(conf)]
    assert drop_in_command("ExecStartPre")[1:] == ["-r", INSTALLED_CONF]
    assert subprocess.run(as_turnserver(guard), check=False).returncode != 0

    # Without the file coturn picks its own addresses and ports: pin them to loopback.
    relay = reserve_relay_range()

    def pinned(port: int) -> list[str]:
        return ["--listening-ip=127.0.0.1", f"--listening-port={port}",
                "--relay-ip=127.0.0.1", f"--min-port={relay.min_port}",
                f"--max-port={relay.max_port}", "--log-file=stdout", "--no-cli"]

    try:
        # Before: coturn as Debian's unit ran it (`-c FILE --pidfile=`) grants anyone a relay.
        port = free_tcp_udp_port()
        before = start_coturn(["turnserver", "-c", str(conf), "--pidfile=", *pinned(port)],
                              port, tmp_path / "before.log")
        try:
            assert "Cannot find config file" in (tmp_path / "before.log").read_text()
            assert unauthenticated_allocate("127.0.0.1", port) == 0
        finally:
            stop(before)

        # After: had the guard been bypassed, the drop-in's ExecStart still asks for
        # credentials (and knows no secret to accept).
        port = free_tcp_udp_port()
        exec_start = [str(conf) if word == INSTALLED_CONF else word
                      for word in drop_in_command("ExecStart")]
        after = start_coturn([*exec_start, *pinned(port)], port, tmp_path / "after.log")
        try:
            assert "Cannot find config file" in (tmp_path / "after.log").read_text()
            assert unauthenticated_allocate("127.0.0.1", port) == 401
        finally:
            stop(after)
    finally:
        relay.release()


def test_sqlite_userdb_is_shared_by_coturn_and_icegates_dynamic_user(install_root, tmp_path):
    """ICEGATE_COTURN_SQLITE under /var/lib/coturn: the script makes it writable for group
    turnserver, and icegate, a transient user in that group (icegate.service.d/
    coturn-sqlite.conf), keeps the secrets there; coturn accepts what it wrote."""
    port = free_tcp_udp_port()
    relay = reserve_relay_range()
    userdb = "/var/lib/coturn/icegate/turndb"
    env = {"ICEGATE_TURN_SECRETS": TEST_TURN_SECRET, "ICEGATE_API_KEYS": TEST_ADMIN_KEY,
           "ICEGATE_MASTER_KEY": TEST_MASTER_KEY, "ICEGATE_DEV_SECRETS": "false",
           "ICEGATE_TURN_REALM": REALM, "ICEGATE_COTURN_SQLITE": userdb,
           "ICEGATE_TURN_URIS": f"turn:127.0.0.1:{port}?transport=udp"}
    try:
        conf = install_as_documented(install_root, env, (relay.min_port, relay.max_port))
        installed_userdb = install_root / userdb.lstrip("/")
        assert f"userdb={installed_userdb}" in conf.read_text().splitlines()
        assert owner_mode(installed_userdb) == ("turnserver", "turnserver", "0o660")
        assert owner_mode(installed_userdb.parent) == ("turnserver", "turnserver", "0o2770")

        # As systemd runs icegate: a uid of its own, group turnserver as a supplementary one.
        fresh = "fresh-secret-after-rotation-0123"
        assert write_as_icegates_dynamic_user(installed_userdb, REALM, fresh) == 0

        coturn = start_coturn(rerooted(drop_in_command("ExecStart"), install_root), port,
                              tmp_path / "coturn.log")
        try:
            from harness.coturn import rest_credential

            username, password = rest_credential(fresh, "alice", int(time.time()) + 600)
            with TurnClient("127.0.0.1", port) as turn:
                assert turn.allocate(username, password).code == 0
            # The static secret is gone from the userdb icegate rewrote: refused.
            username, password = rest_credential(TEST_TURN_SECRET, "alice",
                                                 int(time.time()) + 600)
            with TurnClient("127.0.0.1", port) as turn:
                assert turn.allocate(username, password).code == 401
        finally:
            stop(coturn)
    finally:
        relay.release()


def write_as_icegates_dynamic_user(userdb: Path, realm: str, secret: str) -> int:
    """icegate's own userdb writer, run in a child with the identity systemd gives icegate
    with coturn-sqlite.conf: a transient uid, group turnserver as a supplementary group.

    A forked child rather than a new interpreter: this interpreter may live where another
    uid cannot read it (a venv under /root). Returns the child's exit status (0: written).
    """
    from icegate_server.turn.coturn_userdb import CoturnSqliteSecrets

    turnserver_gid = grp.getgrnam("turnserver").gr_gid
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.setgroups([turnserver_gid])
            os.setgid(61999)
            os.setuid(61999)
            CoturnSqliteSecrets(str(userdb), realm)._replace({secret})
            status = 0
        finally:
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status)


def test_turns_install_serves_tls_with_a_certificate_turnserver_reads(install_root, tmp_path):
    """TURN over TLS as documented: coturn's certificate in /etc/icegate-coturn/tls (0640
    root:turnserver), named in icegate.env; coturn, as turnserver on the unit's command line,
    allocates over TLS. An unreadable key stops the install before a config is written."""
    from harness.pki import TestCA

    port, tls_port = free_tcp_udp_port(), free_tcp_udp_port()
    relay = reserve_relay_range()
    ca = TestCA(tmp_path / "pki")
    issued_cert = ca.issue("turn", "turn.icegate.test", dns=("turn.icegate.test",), server=True)
    tls_dir = install_root / "etc" / "icegate-coturn-tls"
    tls_dir.mkdir(parents=True)
    os.chown(tls_dir, 0, grp.getgrnam("turnserver").gr_gid)
    tls_dir.chmod(0o750)
    cert, key = tls_dir / "fullchain.pem", tls_dir / "privkey.pem"
    shutil.copy(issued_cert.cert, cert)
    shutil.copy(issued_cert.key, key)
    for path in (cert, key):
        os.chown(path, 0, grp.getgrnam("turnserver").gr_gid)
        path.chmod(0o640)
    env = {"ICEGATE_TURN_SECRETS": TEST_TURN_SECRET, "ICEGATE_API_KEYS": TEST_ADMIN_KEY,
           "ICEGATE_MASTER_KEY": TEST_MASTER_KEY, "ICEGATE_DEV_SECRETS": "false",
           "ICEGATE_TURN_REALM": REALM,
           "ICEGATE_TURN_URIS": f"turn:127.0.0.1:{port}?transport=udp,"
                                f"turns:turn.icegate.test:{tls_port}?transport=tcp",
           "ICEGATE_COTURN_TLS_CERT": str(cert), "ICEGATE_COTURN_TLS_KEY": str(key)}
    try:
        key.chmod(0o600)  # root's alone: turnserver could not read it
        conf = install_as_documented(install_root, env, (relay.min_port, relay.max_port),
                                     check=False)
        assert not conf.exists()
        key.chmod(0o640)
        (install_root / "etc" / "icegate" / "icegate.env").unlink()
        conf = install_as_documented(install_root, env, (relay.min_port, relay.max_port))
        assert f"tls-listening-port={tls_port}" in conf.read_text().splitlines()

        coturn = start_coturn(rerooted(drop_in_command("ExecStart"), install_root), port,
                              tmp_path / "coturn.log")
        try:
            from harness.coturn import rest_credential

            context = ssl.create_default_context(cafile=ca.cert)
            username, password = rest_credential(TEST_TURN_SECRET, "alice",
                                                 int(time.time()) + 600)
            with TurnClient("127.0.0.1", tls_port, tls_context=context,
                            server_name="turn.icegate.test") as turn:
                assert turn.allocate(username, password).code == 0
                assert turn.create_permission("127.0.0.1") == 403
        finally:
            stop(coturn)
    finally:
        relay.release()
