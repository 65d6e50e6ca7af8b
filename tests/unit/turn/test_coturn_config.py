"""`icegate-server coturn-config`: coturn's settings follow icegate's, never drift."""

from __future__ import annotations

import dataclasses

import pytest

from icegate_server.settings import Settings
from icegate_server.turn.coturn_config import render_coturn_config

SIGNING = "signing-secret-0123456789"
PREVIOUS = "previous-secret-0123456789"
OLDEST = "oldest-secret-0123456789"


def conf_lines(text: str) -> list[str]:
    """The directives of a turnserver.conf, without comments and blank lines."""
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def directive_values(text: str, name: str) -> list[str]:
    return [line.partition("=")[2] for line in conf_lines(text) if line.partition("=")[0] == name]


@pytest.fixture
def settings(tmp_path):
    return Settings(
        data_dir=tmp_path / ".icegate",
        turn_secrets=(SIGNING, PREVIOUS, OLDEST),
        turn_uris=("turn:turn.example.test:3479?transport=udp",
                   "turn:turn.example.test:3479?transport=tcp",
                   "turns:turn.example.test:5349"),
        turn_realm="realm.example.test",
    )


def test_secrets_realm_and_rest_mode(settings):
    text = render_coturn_config(settings)
    assert directive_values(text, "static-auth-secret") == [SIGNING, PREVIOUS, OLDEST]
    assert directive_values(text, "realm") == ["realm.example.test"]
    assert "use-auth-secret" in conf_lines(text)
    assert "${" not in text
    # coturn leaks memory with per-username labels, and every REST username is new.
    assert not any(line.startswith("prometheus-username-labels") for line in conf_lines(text))


def test_listening_port_comes_from_the_first_turn_uri(settings):
    assert directive_values(render_coturn_config(settings), "listening-port") == ["3479"]


def test_turns_uris_do_not_choose_the_plain_port(settings):
    settings = dataclasses.replace(settings, turn_uris=("turns:turn.example.test:5349",
                                                        "turn:turn.example.test:3480"))
    assert directive_values(render_coturn_config(settings), "listening-port") == ["3480"]


@pytest.mark.parametrize(
    "turn_uris",
    [
        ("turn:turn.example.test?transport=udp", "turn:turn.example.test:3481?transport=tcp"),
        ("turns:turn.example.test:5349",),
    ],
)
def test_no_port_on_the_first_turn_uri_means_the_standard_port(settings, turn_uris):
    # Browsers reach a port-less turn: URI on 3478, so coturn must listen there.
    settings = dataclasses.replace(settings, turn_uris=turn_uris)
    assert directive_values(render_coturn_config(settings), "listening-port") == ["3478"]


def test_ipv6_turn_uri_port(settings):
    settings = dataclasses.replace(settings, turn_uris=("turn:[2001:db8::1]:3482",))
    assert directive_values(render_coturn_config(settings), "listening-port") == ["3482"]


def test_rendering_options_reach_the_file(settings):
    text = render_coturn_config(settings, listening_ip="10.0.0.5", relay_ip="10.0.0.6",
                                min_port=50000, max_port=50100)
    assert directive_values(text, "listening-ip") == ["10.0.0.5"]
    assert directive_values(text, "relay-ip") == ["10.0.0.6"]
    assert directive_values(text, "min-port") == ["50000"]
    assert directive_values(text, "max-port") == ["50100"]


def test_state_lives_under_the_data_dir(settings):
    text = render_coturn_config(settings)
    state_dir = str(settings.data_dir.resolve() / "coturn")
    assert directive_values(text, "userdb") == [f"{state_dir}/turndb"]
    assert directive_values(text, "pidfile") == [f"{state_dir}/turnserver.pid"]


def test_no_secrets_gives_no_secret_lines(settings):
    text = render_coturn_config(dataclasses.replace(settings, turn_secrets=()))
    assert directive_values(text, "static-auth-secret") == []
    assert "${" not in text
