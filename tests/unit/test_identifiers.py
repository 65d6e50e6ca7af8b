"""Every identifier rule, and every setting with a shape, fed its look-alikes.

`re.match` with a `$`-anchored pattern accepts `acme\\n` (`$` matches before a trailing
newline), which made a second, look-alike project. Each rule here gets a trailing newline, a
leading and a trailing space, a NUL, a non-ASCII look-alike, and every length at and around
its bounds; the last test keeps `re.match` and `$`-anchored patterns out of the code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from icegate_server.errors import InvalidFieldError
from icegate_server.projects.records import (
    MAX_URL,
    Project,
    validate_key_id,
    validate_project,
    validate_project_id,
)
from icegate_server.sessions.provider_keys import validate_family
from icegate_server.sessions.realtime import _check_session_id
from icegate_server.settings import (
    REALM_PATTERN,
    STUN_URI_PATTERN,
    TURN_URI_PATTERN,
    ConfigError,
    load_settings,
    parse_listen_address,
)
from icegate_server.turn.credentials import validate_user_id

ROOT = Path(__file__).resolve().parents[2]
CYRILLIC_A = "\u0430"  # looks like a Latin a


def look_alikes(name: str, valid: str) -> list[str]:
    """A valid value's look-alikes, each of which a rule must refuse."""
    spelled = [valid + "\n", valid + " ", " " + valid, valid + "\x00", "\x00" + valid,
               valid + "\r\n"]
    # User ids alone are free text (see test_user_ids_may_be_any_printable_text).
    return spelled if name == "user_id" else [*spelled, valid.replace("a", CYRILLIC_A, 1)]


def validate_upgrade_url(url: str) -> None:
    validate_project(Project("acme", upgrade_url=url), turn_ttl_min=60, turn_ttl_max=86400)


def listen_rule(value: str) -> None:
    parse_listen_address(value)


def pattern_rule(pattern: re.Pattern[str]) -> Callable[[str], None]:
    def rule(value: str) -> None:
        if not pattern.fullmatch(value):
            raise ValueError(value)

    return rule


# (rule, the error it raises, a valid value holding an "a", then (value, accepted) cases for
# the bounds).
RULES: dict[str, tuple[Callable[[str], None], type[Exception], str,
                       list[tuple[str, bool]]]] = {
    "project_id": (validate_project_id, InvalidFieldError, "acme", [
        ("", False), ("a", True), ("a" * 62, True), ("a" * 63, True), ("a" * 64, False),
        ("1acme", False), ("-acme", False), ("Acme", False)]),
    "key_id": (validate_key_id, InvalidFieldError, "a1b2c3d4e5f6", [
        ("", False), ("k", True), ("k" * 63, True), ("k" * 64, True), ("k" * 65, False),
        ("key.id", False)]),
    "session_id": (_check_session_id, InvalidFieldError, "ses_aAAAAAAAAAAAAAAAAAAAAA", [
        ("ses_AAA", False), ("ses_AAAA", True), ("ses_" + "A" * 59, True),
        ("ses_" + "A" * 60, True), ("ses_" + "A" * 61, False), ("SES_AAAA", False),
        ("ses_AA/A", False)]),
    "user_id": (validate_user_id, InvalidFieldError, "alice@example.com", [
        ("", False), ("u" * 255, True), ("u" * 256, True), ("u" * 257, False),
        # The bound is in bytes of UTF-8: 128 two-byte letters fit, one more byte does not.
        ("\u00e9" * 128, True), ("\u00e9" * 128 + "u", False),
        ("alice:1", False), ("ali\u200bce", False), ("alice\u00a0", False),
        ("al ice", True)]),
    "provider": (validate_family, InvalidFieldError, "orga", [
        ("openai", True), ("azure", True), ("gemini", True), ("OPENAI", False),
        ("openai_beta", False), ("", False)]),
    "listen": (listen_rule, ValueError, "localhost:50051", [
        ("127.0.0.1:0", True), ("127.0.0.1:65535", True), ("127.0.0.1:65536", False),
        ("127.0.0.1:123456", False), ("127.0.0.1:5005\uff11", False),  # fullwidth 1
        ("[::1]:50051", True), ("::1:50051", False), ("[fe80::1%eth0]:50051", True),
        ("h" * 253 + ":1", True), ("h" * 254 + ":1", False), (":50051", False),
        ("127.0.0.1:", False)]),
    "turn_uri": (pattern_rule(TURN_URI_PATTERN), ValueError,
                 "turn:turn.example.test:3478?transport=udp", [
        ("turns:turn.example.test:5349", True), ("turn:[::1]:3478?transport=tcp", True),
        ("turn:127.0.0.1", True), ("turn:127.0.0.1:3478?transport=sctp", False),
        ("http://turn.example.test", False), ("turn:", False),
        ("turn:" + "h" * 253, True), ("turn:" + "h" * 254, False)]),
    "stun_uri": (pattern_rule(STUN_URI_PATTERN), ValueError, "stun:stun.example.test:3478", [
        ("stuns:stun.example.test:5349", True), ("stun:[::1]", True),
        ("stun:a.test:3478?transport=udp", False), ("stun:", False)]),
    "turn_realm": (pattern_rule(REALM_PATTERN), ValueError, "realm.example.test", [
        ("r", True), ("r" * 254, True), ("r" * 255, True), ("r" * 256, False), ("", False),
        ("-realm", False), ("my realm", False)]),
    "upgrade_url": (validate_upgrade_url, InvalidFieldError, "https://example.test/a", [
        ("https://" + "u" * (MAX_URL - 9), True), ("https://" + "u" * (MAX_URL - 8), True),
        ("https://" + "u" * (MAX_URL - 7), False), ("ftp://example.test", False),
        ("https://exa mple.test", False)]),
}


def cases() -> list[object]:
    out: list[object] = []
    for name, (_, _, valid, bounds) in RULES.items():
        out.append(pytest.param(name, valid, True, id=f"{name}-valid"))
        for index, value in enumerate(look_alikes(name, valid)):
            out.append(pytest.param(name, value, False, id=f"{name}-look-alike-{index}"))
        for index, (value, accepted) in enumerate(bounds):
            out.append(pytest.param(name, value, accepted, id=f"{name}-bound-{index}"))
    return out


@pytest.mark.parametrize(("rule_name", "value", "accepted"), cases())
def test_each_rule_accepts_its_shape_and_refuses_look_alikes(rule_name, value, accepted):
    rule, error, _, _ = RULES[rule_name]
    if accepted:
        rule(value)
    else:
        with pytest.raises(error):
            rule(value)


def test_user_ids_may_be_any_printable_text():
    # A user id is the caller's own label, bound into its own project's TURN usernames: a
    # non-ASCII name is a different user there, not a look-alike of another project's.
    validate_user_id(f"{CYRILLIC_A}lice")
    validate_user_id("\u6771\u4eac")


@pytest.mark.parametrize(("env", "value"), [
    ("ICEGATE_LISTEN", "127.0.0.1:50\x0051"),
    ("ICEGATE_TURN_URIS", "turn:a.test:3478\x00"),
    ("ICEGATE_STUN_URIS", f"stun:{CYRILLIC_A}.test"),
    ("ICEGATE_TURN_REALM", f"re{CYRILLIC_A}lm"),
    ("ICEGATE_OPENAI_BASE_URL", "https://api.openai.com\x00"),
    ("ICEGATE_COTURN_REDIS", "redis://127.0.0.1:6379/0\x00"),
    ("ICEGATE_STORE", "sqlite:///tmp/x\x00.sqlite3"),
])
def test_settings_with_a_shape_refuse_look_alikes_at_start(env, value, tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {"ICEGATE_DATA_DIR": str(tmp_path), env: value})
    assert env in str(caught.value)


def test_no_identifier_is_matched_by_prefix():
    # `re.match`/`.match(` accept a prefix, and a `$` anchor accepts a trailing newline:
    # identifier rules use `fullmatch` on unanchored patterns.
    sources = [path for package in (ROOT / "server", ROOT / "client" / "icegate")
               for path in package.rglob("*.py") if "/icegate/v1/" not in path.as_posix()]
    assert len(sources) > 20
    offenders = []
    for path in sources:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\.match\(|\$\"\)|\$'\)|\$\"\s*$", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
