"""Development secrets: generated once, kept private, used only where nothing is configured."""

from __future__ import annotations

import base64
import dataclasses
import json
import stat

from icegate_server.dev_secrets import (
    DEV_SECRETS_FILE,
    apply_dev_secrets,
    dialable,
    load_or_create,
    record_listening,
)
from icegate_server.sessions.vault import load_master_keys
from icegate_server.settings import Settings

CONFIGURED_SECRET = "configured-turn-secret-0123"
CONFIGURED_KEY = "igk_configured_key_0123456789"
CONFIGURED_MASTER_KEY = base64.b64encode(bytes(range(32))).decode()


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_creates_a_private_secrets_file(tmp_path):
    data_dir = tmp_path / ".icegate"
    settings = Settings(data_dir=data_dir)

    applied, path, created = apply_dev_secrets(settings)

    assert created
    assert path == data_dir / DEV_SECRETS_FILE
    assert mode(path) == 0o600
    assert mode(data_dir) == 0o700
    stored = json.loads(path.read_text(encoding="utf-8"))
    assert applied.turn_secrets == (stored["turn_secret"],)
    assert applied.api_keys == (stored["api_key"],)
    assert applied.master_key == stored["master_key"]
    # Acceptable to the server's own validation (16+ characters; a 32-byte master key).
    assert len(stored["turn_secret"]) >= 16 and len(stored["api_key"]) >= 16
    load_master_keys(applied.master_key, None)
    assert not list(data_dir.glob("*.tmp"))


def test_restart_keeps_the_same_secrets(tmp_path):
    settings = Settings(data_dir=tmp_path / ".icegate")
    first, path, created_first = apply_dev_secrets(settings)
    second, second_path, created_second = apply_dev_secrets(settings)
    assert created_first and not created_second
    assert second_path == path
    assert (second.turn_secrets, second.api_keys, second.master_key) == (
        first.turn_secrets, first.api_keys, first.master_key)
    assert mode(path) == 0o600


def test_secrets_differ_between_data_dirs(tmp_path):
    first, _, _ = load_or_create(tmp_path / "one")
    second, _, _ = load_or_create(tmp_path / "two")
    assert first["turn_secret"] != second["turn_secret"]
    assert first["api_key"] != second["api_key"]
    assert first["master_key"] != second["master_key"]


def test_a_missing_entry_is_added_and_the_kept_one_stays(tmp_path):
    data_dir = tmp_path / ".icegate"
    data_dir.mkdir(mode=0o700)
    (data_dir / DEV_SECRETS_FILE).write_text(json.dumps({"turn_secret": CONFIGURED_SECRET}),
                                             encoding="utf-8")
    stored, path, created = load_or_create(data_dir)
    assert created
    assert stored["turn_secret"] == CONFIGURED_SECRET
    assert stored["api_key"] and stored["master_key"]
    assert json.loads(path.read_text(encoding="utf-8")) == stored
    assert mode(path) == 0o600


def stored_secrets(path) -> dict[str, str]:
    return json.loads(path.read_text(encoding="utf-8"))


def test_only_empty_settings_are_filled(tmp_path):
    settings = Settings(data_dir=tmp_path / ".icegate", turn_secrets=(CONFIGURED_SECRET,))
    applied, path, _ = apply_dev_secrets(settings)
    assert applied.turn_secrets == (CONFIGURED_SECRET,)
    assert applied.api_keys == (stored_secrets(path)["api_key"],)

    settings = Settings(data_dir=tmp_path / ".icegate", api_keys=(CONFIGURED_KEY,))
    applied, path, _ = apply_dev_secrets(settings)
    assert applied.api_keys == (CONFIGURED_KEY,)
    assert applied.turn_secrets == (stored_secrets(path)["turn_secret"],)

    settings = Settings(data_dir=tmp_path / ".icegate", master_key=CONFIGURED_MASTER_KEY)
    applied, path, _ = apply_dev_secrets(settings)
    assert applied.master_key == CONFIGURED_MASTER_KEY
    assert applied.api_keys == (stored_secrets(path)["api_key"],)


def test_a_master_key_file_counts_as_configured(tmp_path):
    settings = Settings(data_dir=tmp_path / ".icegate", master_key_file=str(tmp_path / "mk"))
    applied, _, _ = apply_dev_secrets(settings)
    assert applied.master_key == ""
    assert applied.master_key_file == str(tmp_path / "mk")


def test_fully_configured_settings_are_left_alone_and_nothing_is_written(tmp_path):
    settings = Settings(data_dir=tmp_path / ".icegate", turn_secrets=(CONFIGURED_SECRET,),
                        api_keys=(CONFIGURED_KEY,), master_key=CONFIGURED_MASTER_KEY)
    applied, path, created = apply_dev_secrets(settings)
    assert applied == settings
    assert path is None and not created
    assert not (tmp_path / ".icegate").exists()


def test_dev_secrets_off_creates_nothing(tmp_path):
    settings = Settings(data_dir=tmp_path / ".icegate", dev_secrets=False)
    applied, path, created = apply_dev_secrets(settings)
    assert applied == settings
    assert applied.turn_secrets == () and applied.api_keys == () and applied.master_key == ""
    assert path is None and not created
    assert not (tmp_path / ".icegate").exists()


def test_other_settings_survive_the_fill(tmp_path):
    settings = Settings(data_dir=tmp_path / ".icegate", turn_realm="realm.test",
                        turn_ttl_default=120)
    applied, _, _ = apply_dev_secrets(settings)
    changed = {f.name for f in dataclasses.fields(Settings)
               if getattr(applied, f.name) != getattr(settings, f.name)}
    assert changed == {"turn_secrets", "api_keys", "master_key"}


def test_recording_where_it_listens_keeps_the_secrets_private(tmp_path):
    stored, path, _ = load_or_create(tmp_path / ".icegate")
    record_listening(path, "127.0.0.1:50123", "http://127.0.0.1:8123")
    record_listening(path, "127.0.0.1:50124", None)  # a restart without the HTTP listener

    after = json.loads(path.read_text(encoding="utf-8"))
    assert after == {**stored, "grpc_target": "127.0.0.1:50124"}  # no stale http_url
    assert mode(path) == 0o600
    assert not list(path.parent.glob("*.tmp"))


def test_a_wildcard_listen_address_is_dialed_on_loopback():
    hosts = ("0.0.0.0", "", "[::]", "127.0.0.2", "[::1]", "box")  # noqa: S104 - no binding
    assert [dialable(host) for host in hosts] \
        == ["127.0.0.1", "127.0.0.1", "[::1]", "127.0.0.2", "[::1]", "box"]
