"""A hostile upstream that echoes the provider key everywhere, through the real gRPC server.

For every provider adapter and every kind of answer (200, a 200 whose token is the key, 400,
401, 5xx), the key must appear nowhere the caller or the operator can see: the response, the
error's message, ErrorInfo metadata and details, or any log line of the server. Well-formed
values still pass through unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

import icegate
from fake_upstreams import FakeUpstream
from fake_upstreams.hostile import (
    BENIGN_ERROR_MESSAGE,
    BENIGN_ICE_SERVERS,
    BENIGN_REQUEST_ID,
    BENIGN_SESSION_ID,
    BENIGN_TOKEN,
    HostileUpstream,
)
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer, ServerFactory
from icegate_server.clock import FrozenClock
from icegate_server.observability.logs import QUIET_LIBRARY_LOGGERS

PROVIDER_KEY = "sk-test-HOSTILE-key-0123456789abcdef"
PROJECT = "hostile"
# What each provider is asked for, and the model the answer must name (Orga echoes nothing).
OPTIONS: dict[str, dict[str, str]] = {
    "openai": {"model": "gpt-realtime", "voice": "marin"},
    "openai_beta": {"model": "gpt-4o-realtime-preview", "voice": "marin"},
    "azure": {"model": "my-realtime", "voice": "marin"},
    "azure_legacy": {"model": "my-realtime", "voice": "marin"},
    "orga": {"model": "orga-1", "voice": "alice", "email": "dev@example.test"},
    "gemini": {"model": "gemini-live-2.5-flash-preview", "voice": "Puck"},
}
PROVIDERS = tuple(OPTIONS)
# Pieces of the key that must not surface either: its distinctive middle and its tail.
KEY_PIECES = (PROVIDER_KEY, "HOSTILE-key", "0123456789abcdef")


class LogCapture(logging.Handler):
    """Every log record of the process, formatted as the server would write it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        if record.exc_info:
            self.lines.append(logging.Formatter().formatException(record.exc_info))


@pytest.fixture(scope="module")
def hostile() -> Iterator[tuple[FakeUpstream, HostileUpstream]]:
    responder = HostileUpstream()
    with FakeUpstream(responder) as fake:
        yield fake, responder


@pytest.fixture(scope="module")
def server(hostile, module_server_factory: ServerFactory) -> RunningServer:
    fake, _ = hostile
    url = fake.base_url
    running = module_server_factory(FrozenClock(time.time()), openai_base_url=url,
                                    azure_base_url=url, orga_base_url=url, gemini_base_url=url)
    with icegate.Client(running.target, TEST_ADMIN_KEY) as admin:
        admin.create_project(PROJECT, rate_limit_requests=1_000_000,
                             max_concurrent_sessions=1000)
        for family in ("openai", "azure", "orga", "gemini"):
            admin.set_provider_key(PROJECT, family, PROVIDER_KEY)
    return running


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    handler = LogCapture()
    root = logging.getLogger()
    level = root.level
    # As `configure_logging` leaves them: httpcore's own DEBUG trace quotes raw headers.
    quiet = {name: logging.getLogger(name).level for name in QUIET_LIBRARY_LOGGERS}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for name, quiet_level in quiet.items():
            logging.getLogger(name).setLevel(quiet_level)


def call_both(server: RunningServer, provider: str) -> list[Any]:
    """CreateSession and MintEphemeralToken: each answer, or the typed error raised."""
    outcomes: list[Any] = []
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        for method in (client.create_session, client.mint_ephemeral_token):
            try:
                outcomes.append(method(provider, project_id=PROJECT, timeout=10,
                                       **OPTIONS[provider]))
            except icegate.IcegateError as error:
                outcomes.append(error)
    return outcomes


def visible_text(outcome: Any) -> str:
    """Everything of an answer or an error a caller can read, as one string."""
    if isinstance(outcome, icegate.IcegateError):
        parts = [str(outcome), outcome.message, repr(outcome.metadata), outcome.reason]
        parts += [f"{type(d).__name__}:{d}" for d in outcome.details]
        return "\n".join(parts)
    return f"{outcome}\n{outcome.SerializeToString()!r}"


def assert_no_key(text: str, where: str) -> None:
    for piece in KEY_PIECES:
        assert piece not in text, f"{piece!r} reached {where}:\n{text[:2000]}"


MODES = [("echo", 200), ("token_is_key", 200), ("error", 400), ("error", 401),
         ("error", 503)]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("mode", "status"), MODES,
                         ids=["200-echo", "200-token-is-key", "400", "401", "503"])
def test_the_key_reaches_neither_caller_nor_log(server, hostile, logs, provider, mode, status):
    fake, responder = hostile
    responder.mode, responder.status = mode, status
    sent_before = len(fake.requests)

    outcomes = call_both(server, provider)

    assert len(fake.requests) > sent_before  # the upstream was really asked
    for outcome in outcomes:
        assert_no_key(visible_text(outcome), f"the caller ({provider}, {mode} {status})")
        if mode == "echo":
            # Everything hostile is dropped or replaced, but the good token still comes back.
            assert not isinstance(outcome, icegate.IcegateError), outcome
            assert outcome.ephemeral_token.value.startswith(("ek_hostile_", "auth_tokens/"))
            assert outcome.model == OPTIONS[provider]["model"]
            assert outcome.upstream_request_id == ""
        elif mode == "token_is_key":
            assert isinstance(outcome, icegate.UpstreamUnavailableError), outcome
        elif status == 401:
            assert isinstance(outcome, icegate.UpstreamAuthFailedError), outcome
        elif status == 400:
            # Gemini's body names no API_KEY_INVALID reason here: a plain rejection.
            assert isinstance(outcome, icegate.UpstreamRejectedError), outcome
        else:
            assert isinstance(outcome, icegate.UpstreamUnavailableError), outcome
    if provider == "orga" and mode == "echo":
        ice = [(list(s.urls), s.username, s.credential) for s in outcomes[0].provider_ice_servers]
        assert ice == [([s["urls"]] if isinstance(s["urls"], str) else s["urls"],
                        s.get("username", ""), s.get("credential", ""))
                       for s in BENIGN_ICE_SERVERS]
    # The server logs a call after answering it: stop waiting once the RPC lines are there.
    deadline = time.monotonic() + 5
    while sum("rpc" in line for line in list(logs.lines)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_no_key("\n".join(logs.lines), f"the server log ({provider}, {mode} {status})")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_well_formed_upstream_values_pass_through_unchanged(server, hostile, provider):
    _, responder = hostile
    responder.mode, responder.status = "benign", 200
    created, minted = call_both(server, provider)
    for answer in (created, minted):
        assert answer.ephemeral_token.value == (
            f"auth_tokens/{BENIGN_TOKEN}" if provider == "gemini" else BENIGN_TOKEN)
        assert answer.upstream_request_id == BENIGN_REQUEST_ID
        assert answer.model == OPTIONS[provider]["model"]
        assert answer.voice == OPTIONS[provider]["voice"]
        if provider in ("openai", "openai_beta", "azure", "azure_legacy"):
            assert answer.upstream_session_id == BENIGN_SESSION_ID
    if provider == "orga":
        assert [list(s.urls) for s in created.provider_ice_servers] == [
            ["stun:stun.orga-ai.test:3478"],
            ["turn:turn.orga-ai.test:3478?transport=udp", "turns:turn.orga-ai.test:5349"]]
        assert created.provider_ice_servers[1].credential == "turn-pass+/="


@pytest.mark.parametrize("provider", PROVIDERS)
def test_well_formed_error_values_pass_through_unchanged(server, hostile, provider):
    _, responder = hostile
    responder.mode, responder.status = "benign", 400
    for error in call_both(server, provider):
        assert isinstance(error, icegate.UpstreamRejectedError), error
        assert error.metadata["upstream_request_id"] == BENIGN_REQUEST_ID
        assert BENIGN_ERROR_MESSAGE in error.message
