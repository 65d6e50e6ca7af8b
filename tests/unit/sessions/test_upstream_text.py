"""The one gate for upstream strings: each shape's bound, charset and secret rule, and free text."""

from __future__ import annotations

import pytest

from icegate_server.sessions.providers.upstream_text import (
    MAX_MESSAGE_CHARS,
    REDACTED,
    UpstreamField,
    upstream_text,
)

KEY = "sk-proj-Abc123SECRETxyz"
SHAPED = [shape for shape in UpstreamField if shape is not UpstreamField.MESSAGE]

# A well-formed value of each shape, which must come back unchanged.
GOOD = {
    UpstreamField.REQUEST_ID: "req_0123abcd-ef.45:6/7+8=",
    UpstreamField.SESSION_ID: "sess_C9xPz0abc",
    UpstreamField.MODEL: "gpt-4o-realtime-preview-2025-06-03",
    UpstreamField.VOICE: "Puck",
    UpstreamField.TOKEN: "ek_68af2b3c4d5e6f",
    UpstreamField.ICE_URL: "turn:turn.example.test:3478?transport=udp",
    UpstreamField.ICE_USERNAME: "1700000000:orga",
    UpstreamField.ICE_CREDENTIAL: "c2VjcmV0+/=",
    UpstreamField.CALL_ID: "rtc_u1_9f8e7d6c5b4a",
}
# The longest value each shape keeps.
LONGEST = {
    UpstreamField.REQUEST_ID: 128, UpstreamField.SESSION_ID: 128, UpstreamField.MODEL: 128,
    UpstreamField.VOICE: 64, UpstreamField.TOKEN: 8192, UpstreamField.ICE_USERNAME: 512,
    UpstreamField.ICE_CREDENTIAL: 512, UpstreamField.CALL_ID: 128,
}


@pytest.mark.parametrize("shape", SHAPED, ids=lambda s: s.name)
def test_a_well_formed_value_passes_unchanged(shape):
    assert upstream_text(GOOD[shape], shape, (KEY,)) == GOOD[shape]


@pytest.mark.parametrize("shape", SHAPED, ids=lambda s: s.name)
@pytest.mark.parametrize("spelling", [KEY, f"x{KEY}y", f"{KEY}.suffix", f"Bearer {KEY}"])
def test_a_value_holding_the_key_is_dropped(shape, spelling):
    assert upstream_text(spelling, shape, (KEY,)) == ""


@pytest.mark.parametrize("shape", SHAPED, ids=lambda s: s.name)
@pytest.mark.parametrize("suffix", ["\n", "\r\nx-evil: 1", "\x00", " ", "\u200b", "é"])
def test_a_value_with_a_character_outside_its_set_is_dropped(shape, suffix):
    assert upstream_text(GOOD[shape] + suffix, shape, ()) == ""


@pytest.mark.parametrize("shape", LONGEST, ids=lambda s: s.name)
def test_length_is_bounded_exactly(shape):
    longest = "a" * LONGEST[shape]
    assert upstream_text(longest, shape, ()) == longest
    assert upstream_text(longest + "a", shape, ()) == ""


@pytest.mark.parametrize("shape", list(UpstreamField), ids=lambda s: s.name)
@pytest.mark.parametrize("value", [None, 7, 1.5, True, ["a"], {"a": "b"}, ""])
def test_anything_but_a_string_counts_as_absent(shape, value):
    assert upstream_text(value, shape, (KEY,)) == ""


@pytest.mark.parametrize("url", ["stun:stun.l.google.com:19302", "stuns:[2001:db8::1]:5349",
                                 "turns:turn.example.test:5349?transport=tcp", "turn:10.0.0.1"])
def test_ice_urls_of_the_rfc_forms_pass(url):
    assert upstream_text(url, UpstreamField.ICE_URL, (KEY,)) == url


@pytest.mark.parametrize("url", ["http://turn.example.test", "turn:host?k=v", "turn:user@host",
                                 "turn:host:3478?transport=udp&x=1", "javascript:alert(1)"])
def test_other_ice_urls_are_dropped(url):
    assert upstream_text(url, UpstreamField.ICE_URL, ()) == ""


def test_a_secret_is_checked_only_when_given():
    # A random token may contain "-sk-" by chance: shaped values are not pattern-searched.
    token = "eyJhbGciOi.eyJ-sk-Abcdefghij.sig"
    assert upstream_text(token, UpstreamField.TOKEN, ("other-key",)) == token
    assert upstream_text(token, UpstreamField.TOKEN, ("sk-Abcdefghij",)) == ""
    assert upstream_text("req_1", UpstreamField.REQUEST_ID, ("",)) == "req_1"


# --- free text -------------------------------------------------------------------------------


def test_a_message_keeps_its_words_and_loses_the_key():
    text = upstream_text(f"Invalid value for 'voice' with key {KEY}.", UpstreamField.MESSAGE,
                         (KEY,))
    assert text == f"Invalid value for 'voice' with key {REDACTED}."


@pytest.mark.parametrize("lookalike", [
    "Bearer abc.def-ghi", "bearer\tabc", "sk-live-0123456789", "sk-tes**********1234",
    "AIzaSyA-0123456789abcdefghijklmnopq",
])
def test_a_message_loses_anything_that_looks_like_a_credential(lookalike):
    text = upstream_text(f"the header was {lookalike} here", UpstreamField.MESSAGE, ())
    assert lookalike not in text
    assert text.startswith("the header was ") and text.endswith(" here")
    assert REDACTED in text


def test_a_word_containing_sk_is_not_taken_for_a_key():
    assert upstream_text("whisk-1234 task-runner", UpstreamField.MESSAGE, ()) == \
        "whisk-1234 task-runner"


def test_a_message_cannot_forge_a_log_line():
    text = upstream_text("bad\nINFO fake line\r\x1b[31m", UpstreamField.MESSAGE, ())
    assert text == "bad INFO fake line  [31m"


def test_a_message_is_cut_after_the_key_is_removed():
    # The key straddling the cut must not leave its head behind.
    text = upstream_text("x" * (MAX_MESSAGE_CHARS - 5) + KEY, UpstreamField.MESSAGE, (KEY,))
    assert KEY[:5] not in text
    assert len(text) == MAX_MESSAGE_CHARS + len("...")


def test_a_huge_message_costs_a_bounded_scan():
    text = upstream_text("y" * 10_000_000 + KEY, UpstreamField.MESSAGE, (KEY,))
    assert text == "y" * MAX_MESSAGE_CHARS + "..."
