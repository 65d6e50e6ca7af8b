"""Bad options are refused before any byte goes upstream."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from fake_upstreams import FakeUpstream
from fake_upstreams.harness import CASES_BY_KIND, ProviderCase, mint
from icegate_server.errors import InvalidFieldError
from icegate_server.sessions.providers import (
    ProviderKind,
    ProviderRuntime,
    ProviderSettings,
    SessionOptions,
    build_providers,
)

K = ProviderKind
ALL = tuple(K)
OPENAI_GA = (K.OPENAI, K.AZURE)
OPENAI_BETA = (K.OPENAI_BETA, K.AZURE_LEGACY)
OPENAI_ALL = OPENAI_GA + OPENAI_BETA

# (kinds, field the error must name, bad options relative to the case's own)
BAD: list[tuple[tuple[ProviderKind, ...], str, dict[str, object]]] = [
    (ALL, "model", {"model": "gpt realtime; drop"}),
    (ALL, "model", {"model": "x" * 200}),
    ((K.AZURE, K.AZURE_LEGACY), "model", {"model": ""}),
    (OPENAI_ALL, "voice", {"voice": "Puck"}),
    ((K.GEMINI,), "voice", {"voice": "alloy"}),
    ((K.ORGA,), "voice", {"voice": "bad\nvoice"}),
    (OPENAI_ALL, "speed", {"speed": 0.2}),
    (OPENAI_ALL, "speed", {"speed": 1.6}),
    (OPENAI_ALL, "speed", {"speed": float("nan")}),
    ((K.GEMINI, K.ORGA), "speed", {"speed": 1.0}),
    ((*OPENAI_GA, K.ORGA), "temperature", {"temperature": 0.8}),
    (OPENAI_BETA, "temperature", {"temperature": 0.5}),
    (OPENAI_BETA, "temperature", {"temperature": 1.3}),
    ((K.GEMINI,), "temperature", {"temperature": 2.1}),
    (OPENAI_GA, "token_ttl", {"token_ttl_seconds": 9}),
    (OPENAI_GA, "token_ttl", {"token_ttl_seconds": 7201}),
    ((*OPENAI_BETA, K.ORGA), "token_ttl", {"token_ttl_seconds": 600}),
    ((K.GEMINI,), "token_ttl", {"token_ttl_seconds": 20 * 3600}),
    (ALL, "instructions", {"instructions": "é" * (16 * 1024 + 1)}),
    ((K.ORGA,), "instructions", {"instructions": "Be nice."}),
    ((*OPENAI_GA, K.GEMINI), "modalities", {"modalities": ("audio", "text")}),
    (OPENAI_BETA, "modalities", {"modalities": ("audio",)}),
    ((*ALL[:4], K.GEMINI), "modalities", {"modalities": ("video",)}),
    ((K.ORGA,), "modalities", {"modalities": ("audio",)}),
    ((K.ORGA,), "email", {"email": "not-an-address"}),
    ((*OPENAI_ALL, K.GEMINI), "email", {"email": "ada@example.com"}),
]
CASES = [
    pytest.param(kind, field, bad, id=f"{kind.value}-{field}-{i}")
    for i, (kinds, field, bad) in enumerate(BAD)
    for kind in kinds
]


@pytest.mark.parametrize(("kind", "field", "bad"), CASES)
def test_bad_option_names_the_field_and_sends_nothing(
    kind: ProviderKind, field: str, bad: dict[str, object]
) -> None:
    case: ProviderCase = CASES_BY_KIND[kind]
    options = dataclasses.replace(case.options, **bad)  # type: ignore[arg-type]
    with FakeUpstream(case.emulation()) as fake:
        with pytest.raises(InvalidFieldError) as caught:
            mint(case, fake.base_url, options)
        assert fake.requests == []
    assert [v.field for v in caught.value.violations] == [field]


@pytest.mark.parametrize("kind", ALL)
def test_validate_alone_needs_no_network(kind: ProviderKind) -> None:
    # A client whose every request fails proves validate() never touches the network.
    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"validate sent {request.url}")

    http = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    providers = build_providers(ProviderSettings(), ProviderRuntime(http))
    providers[kind].validate(CASES_BY_KIND[kind].options)
    with pytest.raises(InvalidFieldError):
        providers[kind].validate(SessionOptions(model="bad model"))


@pytest.mark.parametrize("kind", [K.OPENAI, K.GEMINI])
def test_edges_of_ranges_are_accepted(kind: ProviderKind) -> None:
    case = CASES_BY_KIND[kind]
    ttl = 7200 if kind is K.OPENAI else 20 * 3600 - 1
    speed = 1.5 if kind is K.OPENAI else None
    with FakeUpstream(case.emulation()) as fake:
        mint(case, fake.base_url, SessionOptions(token_ttl_seconds=ttl, speed=speed))
        assert len(fake.requests) == 1
