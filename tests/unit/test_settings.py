"""Settings: precedence, validation with one clear line, secrets never shown."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import logging
import re
from pathlib import Path

import pytest

from icegate.connection import DEFAULT_TARGET
from icegate_server.settings import (
    MAX_SETTING_TEXT,
    SECRET_SETTINGS,
    SETTINGS,
    ConfigError,
    Settings,
    add_setting_flags,
    env_name,
    flag_name,
    load_settings,
    parse_listen_address,
    read_setting,
)

SECRET_A = "turn-secret-aaaaaaaaaaaa"
SECRET_B = "turn-secret-bbbbbbbbbbbb"
KEY_A = "igk_test_key_aaaaaaaaaaaa"
MASTER_KEY = base64.b64encode(bytes(range(32))).decode()
SHORT_MASTER_KEY = base64.b64encode(b"sixteen-byte-key").decode()
# What `ICEGATE_DEV_SECRETS=false` requires to be configured.
PRODUCTION_SECRETS = {"ICEGATE_TURN_SECRETS": SECRET_A, "ICEGATE_API_KEYS": KEY_A,
                      "ICEGATE_MASTER_KEY": MASTER_KEY}
SETTING_NAMES = [f.name for f in dataclasses.fields(Settings)]


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "icegate.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def config_error(flags=None, environ=None) -> str:
    """The message of the ConfigError loading these sources raises (checked to be one line)."""
    with pytest.raises(ConfigError) as caught:
        load_settings(flags or {}, environ or {})
    message = str(caught.value)
    assert message
    assert "\n" not in message and "\r" not in message
    return message


def test_nothing_configured_gives_the_defaults_and_matches_the_client():
    settings = load_settings({}, {})
    assert settings == Settings()
    # A client started with no target must reach a server started with no --listen.
    assert settings.listen == DEFAULT_TARGET


@pytest.mark.parametrize(
    ("name", "toml_value", "env_value", "flag_value", "toml_parsed", "env_parsed", "flag_parsed"),
    [
        ("listen", '"127.0.0.1:1001"', "127.0.0.1:1002", "127.0.0.1:1003",
         "127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1003"),
        ("turn_ttl_default", "600", "700", "800", 600, 700, 800),
        ("turn_secrets", f'["{SECRET_A}"]', f"{SECRET_B}", f"{SECRET_B},{SECRET_A}",
         (SECRET_A,), (SECRET_B,), (SECRET_B, SECRET_A)),
        ("dev_secrets", "true", "false", "true", True, False, True),
    ],
)
def test_flag_beats_env_beats_toml_beats_default(
    tmp_path, name, toml_value, env_value, flag_value, toml_parsed, env_parsed, flag_parsed
):
    # dev_secrets=false needs real secrets configured; give them at the lowest precedence.
    config = write_toml(tmp_path, f"{name} = {toml_value}\n")
    base_env = {"ICEGATE_CONFIG": config, **PRODUCTION_SECRETS}
    base_env.pop(env_name(name), None)
    env = {**base_env, env_name(name): env_value}

    assert getattr(load_settings({name: flag_value}, env), name) == flag_parsed
    assert getattr(load_settings({name: None}, env), name) == env_parsed
    assert getattr(load_settings({}, base_env), name) == toml_parsed
    assert getattr(load_settings({}, {}), name) == getattr(Settings(), name)


def test_command_line_flags_fall_through_to_the_environment():
    parser = argparse.ArgumentParser()
    add_setting_flags(parser)
    args = parser.parse_args([flag_name("turn_ttl_default"), "120"])
    settings = load_settings(vars(args), {"ICEGATE_TURN_TTL_DEFAULT": "900",
                                          "ICEGATE_TURN_TTL_MIN": "100"})
    assert settings.turn_ttl_default == 120
    assert settings.turn_ttl_min == 100


def test_every_setting_has_a_flag_help_text_and_an_environment_variable():
    parser = argparse.ArgumentParser()
    add_setting_flags(parser)
    helps = {option: action.help for action in parser._actions
             for option in action.option_strings}
    assert list(SETTINGS) == SETTING_NAMES
    for name in SETTING_NAMES:
        assert flag_name(name) in helps
        assert helps[flag_name(name)] and helps[flag_name(name)] == SETTINGS[name].help
        assert env_name(name) == "ICEGATE_" + name.upper()


def test_config_flag_beats_config_environment_variable(tmp_path):
    chosen = tmp_path / "chosen.toml"
    chosen.write_text('turn_realm = "chosen.test"\n', encoding="utf-8")
    ignored = tmp_path / "ignored.toml"
    ignored.write_text('turn_realm = "ignored.test"\n', encoding="utf-8")
    settings = load_settings({"config": str(chosen)}, {"ICEGATE_CONFIG": str(ignored)})
    assert settings.turn_realm == "chosen.test"


def test_lists_are_comma_separated_and_trimmed():
    settings = load_settings({}, {"ICEGATE_STUN_URIS": " stun:a.test:3478 ,, stun:b.test:3478 ,"})
    assert settings.stun_uris == ("stun:a.test:3478", "stun:b.test:3478")


@pytest.mark.parametrize(("raw", "parsed"), [("yes", True), ("ON", True), ("0", False),
                                             ("off", False)])
def test_booleans_accept_the_usual_words(raw, parsed):
    env = {"ICEGATE_DEV_SECRETS": raw, **PRODUCTION_SECRETS}
    assert load_settings({}, env).dev_secrets is parsed


BAD_ENV_VALUES = [
    ("listen", "no-port-here"),
    ("listen", "127.0.0.1:65536"),
    ("listen", "127.0.0.1:"),
    ("listen", ":50051"),
    ("listen", "::1"),
    ("listen", "127.0.0.1:http"),
    ("store", "postgres://db.test/icegate"),
    ("turn_secrets", "too-short-15chr"),
    ("turn_uris", "http://turn.test:3478"),
    ("turn_uris", "stun:turn.test:3478"),
    ("stun_uris", "turn:stun.test:3478"),
    ("turn_realm", "two words"),
    ("turn_realm", ""),
    ("turn_ttl_default", "an hour"),
    ("turn_ttl_default", "59"),
    ("turn_ttl_default", "86401"),
    ("turn_ttl_default", "1.5"),
    ("turn_ttl_min", "0"),
    ("turn_ttl_min", "-5"),
    ("turn_ttl_max", "30"),
    ("api_keys", "short-key"),
    ("dev_secrets", "maybe"),
    ("shutdown_grace", "-1"),
    ("shutdown_grace", "soon"),
    ("shutdown_grace", "nan"),
    ("shutdown_grace", "inf"),
    ("log_level", "LOUD"),
    ("log_format", "xml"),
    ("metrics_listen", "9100"),
    ("metrics_listen", "127.0.0.1:metrics"),
    ("metrics_listen", "127.0.0.1:50051"),  # the gRPC listen address (the default)
    ("http_listen", "8080"),
    ("http_listen", "127.0.0.1:http"),
    ("http_listen", "127.0.0.1:50051"),  # the gRPC listen address (the default)
    ("webhook_listen", "8443"),
    ("webhook_listen", "127.0.0.1:https"),
    ("webhook_listen", "127.0.0.1:50051"),  # the gRPC listen address (the default)
    ("http_read_timeout", "0"),
    ("http_read_timeout", "301"),
    ("http_read_timeout", "slow"),
    ("store_timeout", "0"),
    ("store_timeout", "61"),
    ("store_timeout", "fast"),
    ("store_linger", "-0.001"),
    ("store_linger", "0.5"),
    ("store_linger", "nan"),
    ("store_linger", "2ms"),
    ("rate_limit_fail_open", "sometimes"),
    ("master_key", "not base64 at all!"),
    ("master_key", SHORT_MASTER_KEY),
    ("master_key_file", "/nonexistent/icegate/master.key"),
    ("session_lease_seconds", "0"),
    ("session_lease_seconds", "604801"),
    ("upstream_connect_timeout", "0"),
    ("upstream_read_timeout", "601"),
    ("openai_base_url", "ftp://api.openai.test"),
    ("azure_base_url", "resource.openai.azure.test"),
    ("orga_base_url", "https://api.orga.test/with space"),
    ("gemini_base_url", "file:///etc/passwd"),
    ("coturn_redis", "http://not-redis"),
    ("turn_rotate_interval", "5"),
    ("coturn_sqlite", "/nonexistent-dir/turndb"),
    ("coturn_tls_cert", "relative/fullchain.pem"),
    ("coturn_tls_cert", "/etc/coturn/full chain.pem"),
    ("coturn_tls_key", '/etc/coturn/"privkey".pem'),
    ("coturn_user_quota", "-1"),
    ("coturn_total_quota", "many"),
    ("coturn_max_bps", "1000000000001"),
    ("coturn_statsdb", "http://not-redis"),
    ("coturn_statsdb", "redis://host/0 with space"),
    ("coturn_stats_resync", "0"),
    ("coturn_stats_resync", "nan"),
    ("coturn_cli", "127.0.0.1"),
    ("coturn_cli", "127.0.0.1:5766\nx"),
    ("coturn_cli_password", "short"),
    ("coturn_cli_password", "with a space"),
    ("workers", "0"),
    ("workers", "65"),
    ("workers", "two"),
    ("tls_cert", "/nonexistent/icegate/cert.pem"),
    ("tls_key", "/nonexistent/icegate/key.pem"),
    ("tls_client_ca", "/nonexistent/icegate/ca.pem"),
    ("tls_client_projects", "spiffe://corp/web"),
    ("tls_client_projects", "=acme"),
    ("tls_client_projects", "web=acme"),
]


def test_every_setting_has_a_bad_value_case():
    # data_dir takes any path; every other setting has values it must refuse.
    assert {name for name, _ in BAD_ENV_VALUES} == set(SETTING_NAMES) - {"data_dir"}


@pytest.mark.parametrize(("name", "value"), BAD_ENV_VALUES)
def test_bad_environment_value_is_one_line_naming_the_variable(name, value):
    message = config_error(environ={env_name(name): value})
    assert env_name(name) in message


@pytest.mark.parametrize(("name", "value"), BAD_ENV_VALUES)
def test_bad_flag_value_is_one_line_naming_the_setting(name, value):
    message = config_error(flags={name: value})
    assert flag_name(name) in message or env_name(name) in message


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_every_setting_refuses_a_wrong_toml_type_with_one_line(tmp_path, name):
    # A TOML table fits no setting: it must be a ConfigError, never a TypeError traceback.
    config = write_toml(tmp_path, f"[{name}]\nnested = 1\n")
    message = config_error(environ={"ICEGATE_CONFIG": config})
    assert name in message


@pytest.mark.parametrize(
    ("name", "environ"),
    [
        ("turn_secrets", {"ICEGATE_TURN_SECRETS": "short-secret-1"}),
        ("turn_secrets", {"ICEGATE_TURN_SECRETS": f"{SECRET_A},short-secret-2"}),
        ("turn_secrets", {"ICEGATE_TURN_SECRETS": f"{SECRET_A},{SECRET_A}"}),
        ("api_keys", {"ICEGATE_API_KEYS": "short-key-3"}),
        ("api_keys", {"ICEGATE_API_KEYS": f"{KEY_A},short-key-4"}),
        ("master_key", {"ICEGATE_MASTER_KEY": SHORT_MASTER_KEY}),
        ("master_key", {"ICEGATE_MASTER_KEY": f"{MASTER_KEY},{SHORT_MASTER_KEY}"}),
        ("master_key", {"ICEGATE_MASTER_KEY": MASTER_KEY[:-2] + "!!"}),
    ],
)
def test_bad_secret_is_named_but_never_shown(name, environ):
    message = config_error(environ=environ)
    assert env_name(name) in message
    for value in environ[env_name(name)].split(","):
        assert value not in message


def test_bad_secret_in_toml_is_never_shown(tmp_path):
    config = write_toml(tmp_path, 'turn_secrets = ["short-secret-5"]\n')
    message = config_error(environ={"ICEGATE_CONFIG": config})
    assert "turn_secrets" in message.lower()
    assert "short-secret-5" not in message


@pytest.mark.parametrize("missing", ["turn_secrets", "api_keys", "master_key"])
def test_secrets_are_required_without_dev_secrets(missing):
    environ = {"ICEGATE_DEV_SECRETS": "false", **PRODUCTION_SECRETS}
    del environ[env_name(missing)]
    assert env_name(missing) in config_error(environ=environ)


def test_master_key_and_master_key_file_exclude_each_other(tmp_path):
    key_file = tmp_path / "master.key"
    key_file.write_text(MASTER_KEY + "\n", encoding="utf-8")
    message = config_error(environ={"ICEGATE_MASTER_KEY": MASTER_KEY,
                                    "ICEGATE_MASTER_KEY_FILE": str(key_file)})
    assert "ICEGATE_MASTER_KEY" in message
    assert MASTER_KEY not in message
    assert load_settings({}, {"ICEGATE_MASTER_KEY_FILE": str(key_file)}).master_key_file == str(
        key_file)


def test_unknown_toml_key_is_named(tmp_path):
    config = write_toml(tmp_path, 'listen = "127.0.0.1:1"\nturn_secret = "typo-for-secrets"\n')
    message = config_error(environ={"ICEGATE_CONFIG": config})
    assert "turn_secret" in message
    assert config in message


def test_missing_config_file_names_the_config_setting(tmp_path):
    missing = str(tmp_path / "absent.toml")
    message = config_error(flags={"config": missing})
    assert "ICEGATE_CONFIG" in message
    assert missing in message


def test_unreadable_config_file_names_the_config_setting(tmp_path):
    message = config_error(environ={"ICEGATE_CONFIG": str(tmp_path)})  # a directory
    assert "ICEGATE_CONFIG" in message


def test_invalid_toml_names_the_config_setting(tmp_path):
    config = write_toml(tmp_path, 'listen = "127.0.0.1:1\nturn_realm = = x\n')
    message = config_error(environ={"ICEGATE_CONFIG": config})
    assert "ICEGATE_CONFIG" in message


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:50051", "127.0.0.1", 50051),
        ("localhost:0", "localhost", 0),
        ("0.0.0.0:65535", "0.0.0.0", 65535),  # noqa: S104 - parsed, never bound
        ("[::1]:50051", "[::1]", 50051),
        ("[::]:443", "[::]", 443),
    ],
)
def test_listen_address_is_split_into_host_and_port(listen, host, port):
    assert parse_listen_address(listen) == (host, port)
    assert load_settings({}, {"ICEGATE_LISTEN": listen}).listen == listen


@pytest.mark.parametrize("listen", ["::1", "::1:50051", "fe80::1:50051", "host:-1", "host"])
def test_ambiguous_or_malformed_listen_address_is_refused(listen):
    with pytest.raises(ValueError):
        parse_listen_address(listen)


def test_several_workers_need_a_fixed_port():
    message = config_error(environ={"ICEGATE_WORKERS": "2", "ICEGATE_LISTEN": "127.0.0.1:0"})
    assert "ICEGATE_WORKERS" in message and "fixed port" in message


def test_ttl_bounds_may_coincide():
    environ = {"ICEGATE_TURN_TTL_MIN": "300", "ICEGATE_TURN_TTL_MAX": "300",
               "ICEGATE_TURN_TTL_DEFAULT": "300"}
    settings = load_settings({}, environ)
    assert (settings.turn_ttl_min, settings.turn_ttl_default, settings.turn_ttl_max) == (
        300, 300, 300)


def test_ttl_default_must_lie_within_the_configured_bounds():
    environ = {"ICEGATE_TURN_TTL_MIN": "600", "ICEGATE_TURN_TTL_MAX": "1200"}
    message = config_error(environ={**environ, "ICEGATE_TURN_TTL_DEFAULT": "1201"})
    assert "ICEGATE_TURN_TTL_DEFAULT" in message
    message = config_error(environ={**environ, "ICEGATE_TURN_TTL_DEFAULT": "599"})
    assert "ICEGATE_TURN_TTL_DEFAULT" in message
    # The default of 3600 is outside these bounds: the operator must say what they mean.
    assert "ICEGATE_TURN_TTL_DEFAULT" in config_error(environ=environ)


def test_ttl_max_below_min_names_the_max():
    message = config_error(environ={"ICEGATE_TURN_TTL_MIN": "600",
                                    "ICEGATE_TURN_TTL_MAX": "300",
                                    "ICEGATE_TURN_TTL_DEFAULT": "450"})
    assert "ICEGATE_TURN_TTL_MAX" in message


def test_repr_hides_turn_secrets_and_api_keys():
    settings = load_settings({}, {"ICEGATE_TURN_SECRETS": f"{SECRET_A},{SECRET_B}",
                                  "ICEGATE_API_KEYS": KEY_A, "ICEGATE_MASTER_KEY": MASTER_KEY})
    for shown in (repr(settings), str(settings), f"{settings}"):
        assert SECRET_A not in shown
        assert SECRET_B not in shown
        assert KEY_A not in shown
        assert MASTER_KEY not in shown
    # What is not secret stays readable in logs.
    assert settings.turn_realm in repr(settings)


@pytest.mark.parametrize("data_dir", ["state", "/srv/icegate/state"])
def test_store_defaults_to_sqlite_under_the_data_dir(data_dir):
    settings = load_settings({}, {"ICEGATE_DATA_DIR": data_dir})
    assert settings.store_url.startswith("sqlite:///")
    assert Path(settings.store_url.removeprefix("sqlite:///")).parent == Path(data_dir)


def test_configured_store_is_used_as_given():
    settings = load_settings({}, {"ICEGATE_STORE": "redis://127.0.0.1:6379/2"})
    assert settings.store_url == "redis://127.0.0.1:6379/2"


# -- Every setting, from the table: defaults, secrets, hostile spellings --------------------

# A valid spelling of each setting whose default is empty (the others spell their default).
EXAMPLES = {
    "store": "redis://127.0.0.1:6379/0",
    "turn_secrets": f"{SECRET_A},{SECRET_B}",
    "api_keys": KEY_A,
    "master_key": MASTER_KEY,
    "master_key_file": "/etc/icegate/master.key",
    "coturn_redis": "redis://:password@127.0.0.1:6379/0",
    "coturn_sqlite": str(Path(__file__).parent / "turndb"),
    "coturn_tls_cert": "/etc/icegate-coturn/tls/fullchain.pem",
    "coturn_tls_key": "/etc/icegate-coturn/tls/privkey.pem",
    "coturn_statsdb": "redis://:password@127.0.0.1:6379/2",
    "coturn_cli": "127.0.0.1:5766",
    "coturn_cli_password": "cli-password-0123",
    "openai_base_url": "https://api.openai.test",
    "azure_base_url": "https://resource.openai.azure.test",
    "orga_base_url": "https://api.orga.test",
    "gemini_base_url": "https://gemini.test",
    "metrics_listen": "127.0.0.1:9464",
    "http_listen": "127.0.0.1:8080",
    "webhook_listen": "0.0.0.0:8443",
    "tls_cert": "/etc/icegate/cert.pem",
    "tls_key": "/etc/icegate/key.pem",
    "tls_client_ca": "/etc/icegate/ca.pem",
    "tls_client_projects": "dns:web.internal=acme,uri:spiffe://corp/ops=*",
}


def spelled(value: object) -> str:
    """A value as the environment spells it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join("=".join(item) if isinstance(item, tuple) else item for item in value)
    return str(value)


def valid_spelling(name: str) -> str:
    default = getattr(Settings(), name)
    if name in EXAMPLES:
        return EXAMPLES[name]
    assert default not in ("", ()), f"{name}: add a valid spelling to EXAMPLES"
    return spelled(default)


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_every_default_and_example_passes_its_own_check(name):
    default = getattr(Settings(), name)
    assert read_setting(name, spelled(default)) == default
    assert read_setting(name, valid_spelling(name)) is not None


def hostile_spellings(valid: str) -> dict[str, str]:
    return {"leading NUL": "\x00" + valid, "inner NUL": valid + "\x00" + valid,
            "trailing NUL": valid + "\x00", "inner line break": valid + "\n" + valid,
            "escape": valid + "\x1b[2J", "oversized": valid + "x" * MAX_SETTING_TEXT}


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_every_setting_refuses_hostile_spellings_with_one_line(name):
    valid = valid_spelling(name)
    for what, raw in hostile_spellings(valid).items():
        with pytest.raises(ConfigError) as caught:
            read_setting(name, raw, env_name(name))
        message = str(caught.value)
        assert env_name(name) in message, what
        assert "\n" not in message and "\r" not in message, what
        if name in SECRET_SETTINGS:
            assert not any(part in message for part in valid.split(",")), what


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_every_setting_trims_a_trailing_newline(name):
    # `$(cat file)` and env files leave line ends: trimmed, never carried into the value.
    valid = valid_spelling(name)
    for ending in ("\n", "\r\n", " "):
        assert read_setting(name, valid + ending) == read_setting(name, valid)


@pytest.mark.parametrize("name", sorted(SECRET_SETTINGS))
def test_secret_settings_never_appear_when_settings_are_shown_or_logged(name, caplog):
    marker = "marker-of-a-secret-0123456789"
    value = (marker,) if isinstance(getattr(Settings(), name), tuple) else marker
    settings = dataclasses.replace(Settings(), **{name: value})
    logging.getLogger("icegate_server.test").warning("settings: %s %r", settings, settings)
    formatter = logging.Formatter("%(message)s")
    logged = [formatter.format(record) for record in caplog.records]
    for shown in (repr(settings), str(settings), f"{settings}", str(settings.redacted()),
                  *logged):
        assert marker not in shown
        assert re.search(rf"\b{name}'?(=|: )'<[0-9]+ hidden>'", shown)
    assert settings.turn_realm in repr(settings)


def test_the_secret_settings_are_the_secrets_and_urls_with_passwords():
    assert {"turn_secrets", "api_keys", "master_key", "store", "coturn_redis", "coturn_statsdb",
            "coturn_cli_password"} == SECRET_SETTINGS
