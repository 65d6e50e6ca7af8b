"""ICEGATE_TURN_ROTATE_INTERVAL without a coturn database icegate keeps stops the server.

Without ICEGATE_COTURN_REDIS or ICEGATE_COTURN_SQLITE coturn never learns a rotated secret:
the first automatic rotation would make it refuse every new credential, silently. Each
spelling of the setting (flag, environment, TOML) is refused with one line naming it and
the two settings that would make it work.
"""

from __future__ import annotations

import pytest

from icegate_server.cli import main as server_main
from icegate_server.settings import ConfigError, load_settings

MESSAGE = ("invalid setting ICEGATE_TURN_ROTATE_INTERVAL: needs ICEGATE_COTURN_REDIS or "
           "ICEGATE_COTURN_SQLITE, so that coturn follows the rotations")


def spellings(tmp_path, name: str, value: str) -> list[tuple[dict[str, str], dict[str, str]]]:
    """(flags, environ) pairs that each set the setting `name` one way."""
    toml = tmp_path / f"{name}.toml"
    toml.write_text(f"{name} = {value if value.isdigit() else repr(value)}\n")
    return [({name: value}, {}),
            ({}, {"ICEGATE_" + name.upper(): value}),
            ({"config": str(toml)}, {})]


@pytest.mark.parametrize("spelling", range(3), ids=["flag", "env", "toml"])
def test_rotation_interval_without_a_coturn_database_is_refused(tmp_path, spelling):
    flags, environ = spellings(tmp_path, "turn_rotate_interval", "3600")[spelling]
    with pytest.raises(ConfigError) as raised:
        load_settings(flags, environ)
    assert str(raised.value) == MESSAGE
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("spelling", range(3), ids=["flag", "env", "toml"])
@pytest.mark.parametrize("database", ["coturn_redis", "coturn_sqlite"])
def test_rotation_interval_with_a_coturn_database_is_accepted(tmp_path, spelling, database):
    value = "redis://127.0.0.1:6379/0" if database == "coturn_redis" else str(
        tmp_path / "turndb")
    db_flags, db_environ = spellings(tmp_path, database, value)[spelling]
    interval = {"ICEGATE_TURN_ROTATE_INTERVAL": "3600"}
    settings = load_settings(db_flags, {**db_environ, **interval})
    assert settings.turn_rotate_interval == 3600


def test_no_rotation_interval_needs_no_coturn_database():
    assert load_settings({}, {"ICEGATE_TURN_ROTATE_INTERVAL": "0"}).turn_rotate_interval == 0
    assert load_settings({}, {}).coturn_redis == ""


def test_empty_coturn_database_settings_do_not_count(tmp_path):
    with pytest.raises(ConfigError, match="ICEGATE_TURN_ROTATE_INTERVAL"):
        load_settings({}, {"ICEGATE_TURN_ROTATE_INTERVAL": "3600", "ICEGATE_COTURN_REDIS": " ",
                           "ICEGATE_COTURN_SQLITE": ""})


def test_the_server_stops_at_start_with_that_one_line(tmp_path, monkeypatch, capsys):
    for name in ("ICEGATE_COTURN_REDIS", "ICEGATE_COTURN_SQLITE", "ICEGATE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ICEGATE_TURN_ROTATE_INTERVAL", "86400")
    monkeypatch.setenv("ICEGATE_DATA_DIR", str(tmp_path))
    assert server_main([]) == 2
    assert capsys.readouterr().err == f"icegate-server: {MESSAGE}\n"
    assert not (tmp_path / "icegate.sqlite3").exists()  # nothing started


def test_the_coturn_database_flags_reach_the_server(tmp_path, monkeypatch, capsys):
    """`--coturn-sqlite` on the command line counts (its `coturn_` prefix once had it dropped
    with coturn-config's rendering options): the rendered config reads the secrets from it."""
    for name in ("ICEGATE_COTURN_REDIS", "ICEGATE_COTURN_SQLITE", "ICEGATE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ICEGATE_DATA_DIR", str(tmp_path))
    turndb = tmp_path / "turndb"
    output = tmp_path / "turnserver.conf"
    assert server_main(["coturn-config", "--output", str(output), "--turn-rotate-interval",
                        "3600", "--coturn-sqlite", str(turndb),
                        "--coturn-listening-ip", "127.0.0.1"]) == 0, capsys.readouterr().err
    assert f"userdb={turndb}" in output.read_text()
