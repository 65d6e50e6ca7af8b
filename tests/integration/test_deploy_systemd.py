"""The systemd units as systemd itself reads them: `systemd-analyze verify` (syntax, ordering,
executables) and `systemd-analyze security --offline` (the exposure score), with Debian's
systemd (scripts/install-system-packages installs it).

Thresholds: each unit's score as committed plus 0.2, on systemd's 0-10 scale (1.6 for coturn
with the drop-in, 1.3 for icegate with both drop-ins; 2.0 would still read "OK"). Losing any
protection worth more than that fails here: the syscall filter (+1.4 for coturn), the
capability bounding set (+1.6), the address-family restriction (+0.4). The protections worth
less are pinned one by one in `test_units_keep_each_protection`.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.pytest_plugin import require_binaries

SYSTEMD = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
COTURN_THRESHOLD = 1.8
ICEGATE_THRESHOLD = 1.5
# Debian 12's coturn.service (coturn 4.6.1), which the drop-in extends.
DEBIAN_COTURN_UNIT = """\
[Unit]
Description=coTURN STUN/TURN Server
Documentation=man:coturn(1) man:turnadmin(1) man:turnserver(1)
After=network.target

[Service]
User=turnserver
Group=turnserver
Type=notify
ExecStart=/usr/bin/turnserver -c /etc/turnserver.conf --pidfile=
Restart=on-failure
InaccessibleDirectories=/home
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units as installed: Debian's coturn.service with our drop-in, icegate.service with
    both of its drop-ins, icegate's ExecStart pointing at this checkout's icegate-server."""
    require_binaries("systemd-analyze")
    (tmp_path / "coturn.service").write_text(DEBIAN_COTURN_UNIT)
    for name in ("coturn.service.d", "icegate.service.d"):
        shutil.copytree(SYSTEMD / name, tmp_path / name)
    icegate = (SYSTEMD / "icegate.service").read_text()
    (tmp_path / "icegate.service").write_text(icegate.replace(
        "ExecStart=/opt/icegate/bin/icegate-server",
        f"ExecStart={Path(sys.executable).parent / 'icegate-server'}"))
    return tmp_path


def analyze(unit_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args],
                          env={"SYSTEMD_UNIT_PATH": f"{unit_dir}:", "PATH": "/usr/bin:/bin",
                               "SYSTEMD_COLORS": "0"},
                          capture_output=True, text=True, timeout=120, check=False)


def exposure(unit_dir: Path, unit: str) -> float:
    result = analyze(unit_dir, "security", "--offline=true", unit)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    return float(match.group(1))


def problems(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines()
            # coturn need not be installed where the units are checked.
            if line.strip() and "/usr/bin/turnserver" not in line]


def test_units_pass_systemd_analyze_verify(unit_dir):
    result = analyze(unit_dir, "verify", str(unit_dir / "coturn.service"),
                     str(unit_dir / "icegate.service"))
    assert not problems(result), problems(result)
    # The drop-ins are read: a broken line in one is reported.
    (unit_dir / "icegate.service.d" / "broken.conf").write_text(
        "[Service]\nExecStartPre=/nonexistent/check\n")
    broken = analyze(unit_dir, "verify", str(unit_dir / "icegate.service"))
    assert "/nonexistent/check" in broken.stdout + broken.stderr


def test_coturn_drop_in_brings_debians_unit_under_the_threshold(unit_dir):
    assert exposure(unit_dir, "coturn.service") <= COTURN_THRESHOLD
    result = analyze(unit_dir, "security", "--offline=true",
                     f"--threshold={int(COTURN_THRESHOLD * 10)}", "coturn.service")
    assert result.returncode == 0, result.stdout[-1500:]
    # Debian's unit alone: what the operator had before the drop-in.
    shutil.rmtree(unit_dir / "coturn.service.d")
    assert exposure(unit_dir, "coturn.service") >= 8.0


def test_icegate_unit_is_under_the_threshold_with_and_without_its_drop_ins(unit_dir):
    assert exposure(unit_dir, "icegate.service") <= ICEGATE_THRESHOLD
    shutil.rmtree(unit_dir / "icegate.service.d")
    assert exposure(unit_dir, "icegate.service") <= ICEGATE_THRESHOLD


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(path.read_text())
    return unit


def all_values(path: Path, section: str, key: str) -> list[str]:
    """Every value of a repeated key (configparser keeps the last one only)."""
    text = path.read_text().split(f"[{section}]", 1)[1].split("\n[", 1)[0]
    return [line.split("=", 1)[1].strip() for line in text.splitlines()
            if line.startswith(f"{key}=")]


def test_units_keep_each_protection():
    coturn = read_unit(SYSTEMD / "coturn.service.d" / "icegate.conf")["Service"]
    icegate = read_unit(SYSTEMD / "icegate.service")["Service"]
    for service in (coturn, icegate):
        for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                           ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                           ("PrivateDevices", "yes"), ("RestrictSUIDSGID", "yes"),
                           ("LockPersonality", "yes"), ("SystemCallArchitectures", "native"),
                           ("UMask", "0077")):
            assert service.get(key) == value, key
    # 443 for TURN over TLS, and nothing else: a bounding set of exactly that capability.
    assert coturn["AmbientCapabilities"] == coturn["CapabilityBoundingSet"] == \
        "CAP_NET_BIND_SERVICE"
    assert int(coturn["LimitNOFILE"]) >= 65536
    assert all_values(SYSTEMD / "coturn.service.d" / "icegate.conf", "Service",
                      "SystemCallFilter") == ["@system-service", "~@privileged"]
    assert icegate["CapabilityBoundingSet"] == "" and icegate["DynamicUser"] == "yes"


def test_icegate_unit_documents_a_file_its_install_creates_and_honours_workers():
    text = (SYSTEMD / "icegate.service").read_text()
    unit = read_unit(SYSTEMD / "icegate.service")
    documentation = unit["Unit"]["Documentation"]
    assert documentation.startswith("file://")
    installed = documentation.removeprefix("file://")
    steps = [line.removeprefix("#   ") for line in text.splitlines() if line.startswith("#   ")]
    (source,) = [shlex.split(step)[-2] for step in steps
                 if step.startswith("install ") and step.endswith(" " + installed)]
    assert (SYSTEMD.parents[1] / source).is_file()
    # The worker count comes from ICEGATE_WORKERS in the env file, never from ExecStart.
    assert "--workers" not in unit["Service"]["ExecStart"]
    # Redis is pulled in as well as ordered before (Wants= without failing when absent).
    assert "redis-server.service" in unit["Unit"]["Wants"].split()
    assert "redis-server.service" in unit["Unit"]["After"].split()


def test_tls_drop_in_hands_the_key_over_as_a_credential():
    drop_in = SYSTEMD / "icegate.service.d" / "tls.conf"
    assert all_values(drop_in, "Service", "LoadCredential") == [
        "tls-cert:/etc/icegate/tls/server.crt", "tls-key:/etc/icegate/tls/server.key"]
    assert all_values(drop_in, "Service", "Environment") == [
        "ICEGATE_TLS_CERT=%d/tls-cert", "ICEGATE_TLS_KEY=%d/tls-key"]


def test_coturn_sqlite_drop_in_opens_the_userdb_directory_the_script_makes():
    service = read_unit(SYSTEMD / "icegate.service.d" / "coturn-sqlite.conf")["Service"]
    script = (SYSTEMD / "install-coturn-config").read_text()
    assert service["SupplementaryGroups"] == "turnserver"
    assert service["ReadWritePaths"] == "/var/lib/coturn/icegate"
    assert "/var/lib/coturn/icegate" in script
