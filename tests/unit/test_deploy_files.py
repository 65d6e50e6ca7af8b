"""The deploy/ files: Docker cannot run here, so check what can be checked without it.

The example settings load and document every setting (a new setting without an entry fails
here); compose.yaml is YAML naming the services and wiring the store, the env file and the
rendered coturn config; the systemd units parse; the Dockerfile runs commands that exist.
"""

from __future__ import annotations

import base64
import configparser
import dataclasses
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from icegate_server.cli import _parser as server_parser
from icegate_server.settings import ConfigError, Settings, env_name, load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SETTING_NAMES = {f.name for f in dataclasses.fields(Settings)}
CLIENT_VARIABLES = {"ICEGATE_TLS_CA", "ICEGATE_TLS_SERVER_NAME"}
"""Read by the `icegate` command (the container's health check), not by the server."""
PLACEHOLDER_SECRETS = {
    "ICEGATE_TURN_SECRETS": "placeholder-turn-secret-0001",
    "ICEGATE_API_KEYS": "placeholder-admin-key-0001",
    "ICEGATE_MASTER_KEY": base64.b64encode(b"p" * 32).decode(),
}


def env_file_lines(path: Path) -> tuple[dict[str, str], set[str]]:
    """The active KEY=value pairs, and every ICEGATE_* name mentioned (active or commented)."""
    active, mentioned = {}, set()
    for line in path.read_text().splitlines():
        match = re.match(r"^(#\s*)?(ICEGATE_[A-Z0-9_]+)=(.*)$", line.strip())
        if match:
            mentioned.add(match.group(2))
            if not match.group(1):
                active[match.group(2)] = match.group(3)
    return active, mentioned


def test_example_toml_loads_with_placeholder_secrets():
    settings = load_settings({"config": str(DEPLOY / "icegate.example.toml")},
                             PLACEHOLDER_SECRETS)
    assert settings.dev_secrets is False
    assert settings.workers == 2
    assert settings.store.startswith("redis://")


def test_example_toml_documents_every_setting():
    text = (DEPLOY / "icegate.example.toml").read_text()
    documented = set(re.findall(r"^#? ?([a-z_]+) = ", text, flags=re.MULTILINE))
    assert documented == SETTING_NAMES, (
        f"undocumented: {sorted(SETTING_NAMES - documented)}; "
        f"unknown: {sorted(documented - SETTING_NAMES)}")


def test_example_env_names_every_setting():
    _, mentioned = env_file_lines(DEPLOY / "icegate.env.example")
    assert mentioned == {env_name(name) for name in SETTING_NAMES} | CLIENT_VARIABLES


def test_example_env_refuses_to_start_until_its_secrets_are_filled_in():
    active, _ = env_file_lines(DEPLOY / "icegate.env.example")
    with pytest.raises(ConfigError, match="ICEGATE_TURN_SECRETS"):
        load_settings({}, active)
    settings = load_settings({}, {**active, **PLACEHOLDER_SECRETS})
    assert settings.workers == 2 and settings.store.startswith("redis://")


def test_compose_wires_icegate_coturn_and_redis():
    services = compose_services()
    assert {"icegate", "coturn", "redis", "coturn-config"} == set(services)
    icegate = services["icegate"]
    assert icegate["environment"]["ICEGATE_STORE"].endswith("@127.0.0.1:6380/0")
    assert icegate["env_file"] == ["icegate.env"]
    assert "redis" in icegate["depends_on"]
    assert (DEPLOY / icegate["build"]["context"] / icegate["build"]["dockerfile"]).is_file()

    # coturn runs the file that `icegate-server coturn-config` writes, from the same env file
    # and the same coturn-side settings as icegate.
    render = services["coturn-config"]
    assert render["env_file"] == ["icegate.env"]
    assert render["environment"] == {key: value for key, value in icegate["environment"].items()
                                     if key.startswith(("ICEGATE_COTURN_", "ICEGATE_STORE"))}
    command = render["command"]
    assert command[:2] == ["icegate-server", "coturn-config"]
    rendered = command[command.index("--output") + 1]
    coturn = services["coturn"]
    assert coturn["command"][coturn["command"].index("-c") + 1] == rendered
    assert coturn["depends_on"]["coturn-config"]["condition"] == "service_completed_successfully"
    shared = {v.split(":")[0] for v in render["volumes"]} & {
        v.split(":")[0] for v in coturn["volumes"]}
    assert shared, "coturn must mount the volume the config is rendered into"


def test_compose_publishes_nothing_beyond_loopback():
    """icegate and coturn share the host's network (coturn's CLI stays on loopback); the only
    published port is Redis, on the host's loopback."""
    services = compose_services()
    assert services["icegate"]["network_mode"] == services["coturn"]["network_mode"] == "host"
    assert "ports" not in services["icegate"] and "ports" not in services["coturn"]
    assert services["coturn-config"]["network_mode"] == "none"
    for service in services.values():
        for published in service.get("ports", []):
            assert published.startswith("127.0.0.1:"), published
    # Metrics on the host's loopback, worker 2 on the next port: both reachable there.
    assert services["icegate"]["environment"]["ICEGATE_METRICS_LISTEN"] == "127.0.0.1:9464"
    active, _ = env_file_lines(DEPLOY / "icegate.env.example")
    assert active["ICEGATE_LISTEN"].startswith("127.0.0.1:")


def test_compose_wires_the_stats_redis_and_the_cli_password():
    services = compose_services()
    environment = services["icegate"]["environment"]
    password = COMPOSE_VARIABLES["REDIS_PASSWORD"]
    assert environment["ICEGATE_COTURN_STATSDB"] == f"redis://:{password}@127.0.0.1:6380/2"
    assert environment["ICEGATE_COTURN_CLI"] == "127.0.0.1:5766"
    assert environment["ICEGATE_COTURN_CLI_PASSWORD"] == COMPOSE_VARIABLES["COTURN_CLI_PASSWORD"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    with pytest.raises(AssertionError, match="COTURN_CLI_PASSWORD unset"):
        interpolate(compose["services"], {k: v for k, v in COMPOSE_VARIABLES.items()
                                          if k != "COTURN_CLI_PASSWORD"})


def test_compose_containers_hold_no_capability_but_coturns_443():
    services = compose_services()
    for name in ("icegate", "coturn-config"):
        assert services[name]["cap_drop"] == ["ALL"] and "cap_add" not in services[name]
        assert services[name]["read_only"] is True
        assert "no-new-privileges:true" in services[name]["security_opt"]
    assert services["coturn"]["cap_drop"] == ["ALL"]
    assert services["coturn"]["cap_add"] == ["NET_BIND_SERVICE"]


def test_compose_coturn_config_command_is_accepted_by_icegate_server():
    command = yaml.safe_load((DEPLOY / "compose.yaml").read_text()
                             )["services"]["coturn-config"]["command"]
    args = [re.sub(r"\$\{[^}]*\}", "192.0.2.10", arg) for arg in command[1:]]
    parsed = server_parser().parse_args(args)
    assert parsed.command == "coturn-config"
    assert parsed.coturn_listening_ip == parsed.coturn_relay_ip == "192.0.2.10"


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(path.read_text())
    return unit


def test_icegate_unit_is_hardened_and_outlasts_the_shutdown_grace():
    unit = read_unit(DEPLOY / "systemd" / "icegate.service")
    service = unit["Service"]
    assert service["EnvironmentFile"] == "/etc/icegate/icegate.env"
    assert service["DynamicUser"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == "icegate"
    assert service["Restart"] == "on-failure" and service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # SIGTERM to the supervisor, which forwards it
    stop_seconds = int(service["TimeoutStopSec"].removesuffix("s"))
    assert stop_seconds > Settings().shutdown_grace + 10
    executable, *args = shlex.split(service["ExecStart"])
    assert executable.endswith("/icegate-server")
    server_parser().parse_args(args)
    assert unit["Install"]["WantedBy"] == "multi-user.target"


COTURN_CONF = "/etc/icegate-coturn/turnserver.conf"
# Debian's coturn.service (coturn 4.6.1), which the drop-in extends.
DEBIAN_COTURN_UNIT = """\
[Unit]
Description=coTURN STUN/TURN Server
After=network.target

[Service]
User=turnserver
Group=turnserver
Type=notify
ExecStart=/usr/bin/turnserver -c /etc/turnserver.conf --pidfile=
Restart=on-failure
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""


def drop_in_words(key: str) -> list[str]:
    unit = read_unit(DEPLOY / "systemd" / "coturn.service.d" / "icegate.conf")
    return shlex.split(unit["Service"][key].replace("\\\n", " ").replace("\\", " "))


def test_coturn_drop_in_runs_the_rendered_config_whose_deny_list_it_leaves_alone():
    words = drop_in_words("ExecStart")
    # configparser keeps the last of the repeated keys: the reset line comes first in the file.
    assert "ExecStart=\n" in (DEPLOY / "systemd" / "coturn.service.d" / "icegate.conf"
                              ).read_text()
    assert words[:3] == ["/usr/bin/turnserver", "-c", COTURN_CONF]
    # The deny-list lives in the rendered config (tests/integration/test_coturn_deny_list.py).
    assert not [word for word in words if "peer" in word]


def test_coturn_drop_in_fails_closed_without_a_readable_config():
    service = read_unit(DEPLOY / "systemd" / "coturn.service.d" / "icegate.conf")["Service"]
    # ExecStartPre runs as User=: `test -r` answers for turnserver, not for root.
    assert service["User"] == service["Group"] == "turnserver"
    assert drop_in_words("ExecStartPre") == ["/usr/bin/test", "-r", COTURN_CONF]
    # ConditionPathIsReadable= would skip the unit silently, and runs as root.
    assert "Condition" not in (DEPLOY / "systemd" / "coturn.service.d" / "icegate.conf"
                               ).read_text().split("[Unit]", 1)[1]
    # Even without its file, coturn asks for credentials (401) instead of relaying for anyone.
    assert "--use-auth-secret" in drop_in_words("ExecStart")


def test_install_docs_follow_the_layout_the_install_test_uses():
    """tests/integration/test_coturn_install.py runs exactly these steps into a temp root."""
    icegate_unit = (DEPLOY / "systemd" / "icegate.service").read_text()
    assert "#   install -d -m 0750 /etc/icegate\n" in icegate_unit
    assert "#   install -m 0600 deploy/icegate.env.example /etc/icegate/icegate.env" in icegate_unit
    drop_in = (DEPLOY / "systemd" / "coturn.service.d" / "icegate.conf").read_text()
    assert "#   deploy/systemd/install-coturn-config <public interface IP>" in drop_in
    script = (DEPLOY / "systemd" / "install-coturn-config").read_text()
    assert "conf_dir=$root" + str(Path(COTURN_CONF).parent) + "\n" in script
    assert "install -d -m 0750 -o root -g turnserver \"$conf_dir\"" in script
    assert "chmod 0640 \"$tmp\"" in script
    readme = (DEPLOY.parent / "README.md").read_text()
    assert "deploy/systemd/install-coturn-config" in readme
    assert "/etc/icegate/turnserver.conf" not in readme + drop_in + icegate_unit


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/container/Dockerfile, continuation lines joined."""
    text = (DEPLOY / "container" / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def healthcheck_argv() -> list[str]:
    healthcheck = re.search(r"CMD (\[.*\])", dict(dockerfile_instructions())["HEALTHCHECK"])
    assert healthcheck is not None
    argv: list[str] = yaml.safe_load(healthcheck.group(1))
    return argv


def test_dockerfile_commands_exist():
    instructions = dict(dockerfile_instructions())
    assert instructions["FROM"] == "python:3.11-slim"
    assert instructions["USER"].split(":")[0] != "root"
    assert set(instructions["EXPOSE"].split()) == {"50051", "9464"}
    # The HEALTHCHECK and CMD name the console scripts pyproject.toml installs.
    scripts = (DEPLOY.parent / "pyproject.toml").read_text()
    shell, flag, script = healthcheck_argv()
    assert (shell, flag) == ("sh", "-c")  # python:3.11-slim has /bin/sh
    health_argv = shlex.split(script.removeprefix("exec "))
    cmd_argv = yaml.safe_load(instructions["CMD"])
    for argv in (health_argv, cmd_argv):
        assert re.search(rf"^{re.escape(argv[0])} = ", scripts, flags=re.MULTILINE), argv
    assert health_argv[-1] == "health"  # run for real in tests/integration/test_deploy_health
    assert cmd_argv == ["icegate-server"]


def test_dockerfile_copies_what_the_build_needs():
    copied = {src for kind, args in dockerfile_instructions() if kind == "COPY"
              for src in args.split()[:-1]}
    root = DEPLOY.parent
    for source in copied:
        assert (root / source).exists(), source
    assert "deploy/coturn" in copied  # the wheel force-includes the coturn template


def test_compose_coturn_config_command_renders_its_addresses(tmp_path, monkeypatch, capsys):
    from icegate_server.cli import main

    command = yaml.safe_load((DEPLOY / "compose.yaml").read_text()
                             )["services"]["coturn-config"]["command"]
    args = [re.sub(r"\$\{[^}]*\}", "192.0.2.10", arg) for arg in command[1:]]
    output = tmp_path / "turnserver.conf"
    monkeypatch.delenv("ICEGATE_COTURN_REDIS", raising=False)
    args[args.index("--output") + 1] = str(output)
    for name, value in {**PLACEHOLDER_SECRETS, "ICEGATE_DEV_SECRETS": "false",
                        "ICEGATE_DATA_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    assert main(args) == 0
    lines = output.read_text().splitlines()
    assert "listening-ip=192.0.2.10" in lines and "relay-ip=192.0.2.10" in lines
    assert "min-port=49160" in lines and "max-port=49999" in lines
    assert "static-auth-secret=placeholder-turn-secret-0001" in lines


COMPOSE_VARIABLES = {"TURN_IP": "192.0.2.10", "REDIS_PASSWORD": "c0ffee0123456789abcdef",
                     "COTURN_CLI_PASSWORD": "cl1pa55word0123456789"}


def interpolate(value: object, variables: dict[str, str]) -> object:
    """compose's `${NAME}`, `${NAME:?message}` and `${NAME:-default}` substitution."""
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name, operator, rest = match.group(1), match.group(2) or "", match.group(3) or ""
        if name in variables:
            return variables[name]
        assert operator == ":-", f"compose would stop: {name} unset ({rest})"
        return rest

    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:\?|:-)([^}]*))?\}", replace, value)


def compose_services() -> dict[str, dict]:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services: dict[str, dict] = interpolate(compose["services"], COMPOSE_VARIABLES)  # type: ignore[assignment]
    return services


def test_compose_stops_without_its_redis_password():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    with pytest.raises(AssertionError, match="REDIS_PASSWORD unset"):
        interpolate(compose["services"], {"TURN_IP": "192.0.2.10",
                                          "COTURN_CLI_PASSWORD": "x" * 20})


def test_compose_gives_coturn_a_path_to_the_secrets_icegate_rotates():
    """coturn (host networking) reaches the Redis icegate writes the secrets into."""
    services = compose_services()
    redis, icegate, render, coturn = (services[name] for name in
                                      ("redis", "icegate", "coturn-config", "coturn"))
    password = COMPOSE_VARIABLES["REDIS_PASSWORD"]
    command = redis["command"]
    assert command[command.index("--requirepass") + 1] == password
    assert command[command.index("--timeout") + 1] == "0"  # coturn's connection never idles out

    # Redis is published on the host's loopback only.
    (published,) = redis["ports"]
    host_ip, host_port, container_port = published.split(":")
    assert host_ip == "127.0.0.1" and container_port == "6379"

    # icegate writes the secrets, and coturn reads them, through the published loopback port
    # (both on the host's network), in db 1; icegate's store is db 0, coturn's stats db 2.
    from urllib.parse import urlsplit

    written = urlsplit(icegate["environment"]["ICEGATE_COTURN_REDIS"])
    assert (written.hostname, written.port, written.password) == (
        "127.0.0.1", int(host_port), password)
    read = urlsplit(render["environment"]["ICEGATE_COTURN_REDIS"])
    assert read == written and read.path == "/1"
    assert urlsplit(icegate["environment"]["ICEGATE_STORE"]).path == "/0"
    # coturn asks for credentials even if its config went missing.
    assert "--use-auth-secret" in coturn["command"]
    assert coturn["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_renders_coturn_reading_the_secrets_from_that_redis(tmp_path, monkeypatch):
    from icegate_server.cli import main

    services = compose_services()
    render = services["coturn-config"]
    active, _ = env_file_lines(DEPLOY / "icegate.env.example")
    output = tmp_path / "turnserver.conf"
    args = list(render["command"][1:])
    args[args.index("--output") + 1] = str(output)
    for name in list(os.environ):
        if name.startswith("ICEGATE_"):
            monkeypatch.delenv(name)
    for name, value in {**active, **PLACEHOLDER_SECRETS, **render["environment"],
                        "ICEGATE_DATA_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    assert main(args) == 0
    lines = output.read_text().splitlines()
    password = COMPOSE_VARIABLES["REDIS_PASSWORD"]
    assert (f'redis-userdb="ip=127.0.0.1 dbname=1 port=6380 password={password} '
            'connect_timeout=30"') in lines
    assert not [line for line in lines if line.startswith("static-auth-secret")]
    # The env example's turns: URI on 443 gets TLS there with the certificate it names, and
    # the production peer policy.
    assert "tls-listening-port=443" in lines and "no-tls" not in lines
    assert "cert=/etc/icegate-coturn/tls/fullchain.pem" in lines
    assert "allow-loopback-peers" not in lines
    assert "denied-peer-ip=127.0.0.0-127.255.255.255" in lines
    assert "cli-ip=127.0.0.1" in lines and "cli-port=5766" in lines
    assert f"cli-password={COMPOSE_VARIABLES['COTURN_CLI_PASSWORD']}" in lines
    assert (f'redis-statsdb="ip=127.0.0.1 dbname=2 port=6380 password={password} '
            'connect_timeout=30"') in lines


@pytest.mark.parametrize("service", ["icegate", "coturn-config"])
def test_compose_rotation_settings_come_with_a_userdb(service):
    """The env file may turn on automatic rotation: compose always gives icegate a userdb."""
    services = compose_services()
    active, _ = env_file_lines(DEPLOY / "icegate.env.example")
    environment = {**active, **PLACEHOLDER_SECRETS, **services[service]["environment"]}
    settings = load_settings({}, {**environment, "ICEGATE_TURN_ROTATE_INTERVAL": "86400"})
    assert settings.turn_rotate_interval == 86400 and settings.coturn_redis
    without = {k: v for k, v in environment.items() if k != "ICEGATE_COTURN_REDIS"}
    with pytest.raises(ConfigError, match="ICEGATE_TURN_ROTATE_INTERVAL"):
        load_settings({}, {**without, "ICEGATE_TURN_ROTATE_INTERVAL": "86400"})
