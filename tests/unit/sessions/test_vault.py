"""The vault keeps provider keys sealed, bound to their owner, and rotatable."""

from __future__ import annotations

import base64
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from icegate_server.errors import IcegateError
from icegate_server.sessions.vault import (
    MasterKeyring,
    Vault,
    VaultError,
    generate_master_key,
    last4,
    load_master_keys,
)

OLD_KEY = bytes(range(32))
NEW_KEY = bytes(range(100, 132))
PLAINTEXT = "sk-proj-Secret1234567890abcd"

# Layout of a v1 blob: version(2) key id(8) nonce(12) ciphertext tag(16).
REGIONS = {
    "version": 0,
    "key id": 5,
    "nonce": 2 + 8 + 3,
    "ciphertext": 2 + 8 + 12 + 2,
    "tag": -3,
}


def vault_with(*keys: bytes) -> Vault:
    return Vault(MasterKeyring(keys))


def forbidden_fragments(*keys: bytes) -> list[str]:
    """Text forms of secrets that must never show up in a message or log line."""
    fragments = [PLAINTEXT, PLAINTEXT[:12]]
    for key in keys:
        fragments += [key.hex(), base64.b64encode(key).decode(), repr(key)]
    return fragments


@pytest.fixture(autouse=True)
def _capture_vault_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG, logger="icegate_server.sessions.vault")
    yield
    for record in caplog.records:
        line = record.getMessage()
        for fragment in forbidden_fragments(OLD_KEY, NEW_KEY):
            assert fragment not in line


def assert_clean(error: BaseException, *keys: bytes) -> None:
    text = str(error) + repr(error)
    for fragment in forbidden_fragments(*keys):
        assert fragment not in text


def test_round_trip() -> None:
    vault = vault_with(NEW_KEY)
    sealed = vault.seal("proj_a", "openai", PLAINTEXT)

    assert PLAINTEXT.encode() not in sealed
    assert sealed.startswith(b"v1")
    assert vault.open("proj_a", "openai", sealed) == PLAINTEXT


def test_every_seal_uses_a_fresh_nonce_from_the_injected_source() -> None:
    counter = itertools.count()
    vault = Vault(MasterKeyring([NEW_KEY]),
                  random_bytes=lambda n: next(counter).to_bytes(n, "big"))

    first = vault.seal("proj_a", "openai", PLAINTEXT)
    second = vault.seal("proj_a", "openai", PLAINTEXT)

    assert first[10:22] == (0).to_bytes(12, "big")
    assert second[10:22] == (1).to_bytes(12, "big")
    assert first != second


@given(st.text())
def test_round_trip_of_any_text(plaintext: str) -> None:
    vault = vault_with(NEW_KEY)
    assert vault.open("p", "gemini", vault.seal("p", "gemini", plaintext)) == plaintext


def test_vault_error_is_an_icegate_error() -> None:
    assert issubclass(VaultError, IcegateError)


def test_wrong_master_key_fails_cleanly() -> None:
    sealed = vault_with(OLD_KEY).seal("proj_a", "openai", PLAINTEXT)

    with pytest.raises(VaultError, match="not configured in ICEGATE_MASTER_KEY") as caught:
        vault_with(NEW_KEY).open("proj_a", "openai", sealed)

    assert_clean(caught.value, OLD_KEY, NEW_KEY)
    assert caught.value.__cause__ is None


@pytest.mark.parametrize("region", REGIONS)
def test_tampering_with_any_region_fails(region: str) -> None:
    vault = vault_with(NEW_KEY)
    sealed = bytearray(vault.seal("proj_a", "openai", PLAINTEXT))
    sealed[REGIONS[region]] ^= 0x01

    with pytest.raises(VaultError) as caught:
        vault.open("proj_a", "openai", bytes(sealed))

    assert_clean(caught.value, NEW_KEY)


def test_truncated_and_unknown_version_fail_cleanly() -> None:
    vault = vault_with(NEW_KEY)
    sealed = vault.seal("proj_a", "openai", PLAINTEXT)

    for blob in (b"", sealed[:20], sealed[:-17], b"v2" + sealed[2:]):
        with pytest.raises(VaultError):
            vault.open("proj_a", "openai", blob)
    with pytest.raises(VaultError, match="unknown format version"):
        vault.needs_reseal(b"v9" + sealed[2:])


@pytest.mark.parametrize(
    ("project", "provider"),
    [("proj_b", "openai"), ("proj_a", "gemini"), ("proj_", "aopenai"), ("", "proj_aopenai")],
)
def test_sealed_key_opens_only_for_its_own_project_and_provider(
    project: str, provider: str,
) -> None:
    vault = vault_with(NEW_KEY)
    sealed = vault.seal("proj_a", "openai", PLAINTEXT)

    with pytest.raises(VaultError, match="another project or provider") as caught:
        vault.open(project, provider, sealed)

    assert_clean(caught.value, NEW_KEY)


def test_rotation_reseals_under_the_new_key() -> None:
    sealed_old = vault_with(OLD_KEY).seal("proj_a", "openai", PLAINTEXT)
    rotating = vault_with(NEW_KEY, OLD_KEY)

    assert rotating.open("proj_a", "openai", sealed_old) == PLAINTEXT
    assert rotating.needs_reseal(sealed_old)

    resealed = rotating.reseal("proj_a", "openai", sealed_old)

    assert not rotating.needs_reseal(resealed)
    assert vault_with(NEW_KEY).open("proj_a", "openai", resealed) == PLAINTEXT
    with pytest.raises(VaultError):
        vault_with(OLD_KEY).open("proj_a", "openai", resealed)


def test_keyring_rejects_bad_keys_without_showing_them() -> None:
    with pytest.raises(ValueError, match="at least one"):
        MasterKeyring([])
    with pytest.raises(ValueError, match="31 bytes") as short:
        MasterKeyring([NEW_KEY[:31]])
    with pytest.raises(ValueError, match="twice") as twice:
        MasterKeyring([NEW_KEY, NEW_KEY])
    assert_clean(short.value, NEW_KEY)
    assert_clean(twice.value, NEW_KEY)
    assert NEW_KEY.hex() not in repr(MasterKeyring([NEW_KEY]))


def encoded(*keys: bytes) -> str:
    return ",".join(base64.b64encode(key).decode() for key in keys)


def test_load_master_keys_from_the_setting_first_key_seals() -> None:
    keyring = load_master_keys(encoded(NEW_KEY, OLD_KEY), None)
    sealed_old = vault_with(OLD_KEY).seal("p", "openai", PLAINTEXT)

    vault = Vault(keyring)
    assert vault.needs_reseal(sealed_old)
    assert vault.open("p", "openai", sealed_old) == PLAINTEXT
    assert not vault.needs_reseal(vault.seal("p", "openai", PLAINTEXT))


def test_load_master_keys_from_a_file_one_per_line(tmp_path: Path) -> None:
    key_file = tmp_path / "master.keys"
    key_file.write_text(f"# newest first\n{encoded(NEW_KEY)}\n{encoded(OLD_KEY)}\n")

    keyring = load_master_keys(None, str(key_file))

    assert keyring.key_ids == MasterKeyring([NEW_KEY, OLD_KEY]).key_ids


@pytest.mark.parametrize(
    "value",
    [
        "not base64 at all!",
        base64.b64encode(NEW_KEY[:16]).decode(),
        base64.b64encode(NEW_KEY).decode()[:-2],
        encoded(NEW_KEY) + ",%%%" + encoded(OLD_KEY)[4:],
        encoded(NEW_KEY, NEW_KEY),
    ],
    ids=["garbage", "16 bytes", "truncated", "second bad", "duplicate"],
)
def test_bad_master_key_setting_names_the_setting_not_the_value(value: str) -> None:
    with pytest.raises(ValueError, match="ICEGATE_MASTER_KEY") as caught:
        load_master_keys(value, None)

    message = str(caught.value)
    for part in value.split(","):
        if len(part) >= 8:
            assert part not in message
    assert_clean(caught.value, NEW_KEY, OLD_KEY)


def test_bad_master_key_file_names_the_file_setting(tmp_path: Path) -> None:
    key_file = tmp_path / "master.keys"
    key_file.write_text(base64.b64encode(NEW_KEY[:20]).decode())

    with pytest.raises(ValueError, match="ICEGATE_MASTER_KEY_FILE") as caught:
        load_master_keys(None, str(key_file))
    assert base64.b64encode(NEW_KEY[:20]).decode() not in str(caught.value)

    with pytest.raises(ValueError, match="ICEGATE_MASTER_KEY_FILE: cannot read"):
        load_master_keys(None, str(tmp_path / "missing"))


def test_master_key_must_be_set_once() -> None:
    with pytest.raises(ValueError, match="not set"):
        load_master_keys(None, None)
    with pytest.raises(ValueError, match="not both"):
        load_master_keys(encoded(NEW_KEY), "/some/file")


def test_generated_master_key_loads() -> None:
    generated = generate_master_key()

    assert len(base64.b64decode(generated)) == 32
    assert generated != generate_master_key()
    vault = Vault(load_master_keys(generated, None))
    assert vault.open("p", "openai", vault.seal("p", "openai", "k")) == "k"


def test_last4_shows_only_the_end_of_a_key() -> None:
    assert last4(PLAINTEXT) == "…abcd"
    assert last4("short-key") == "…"
