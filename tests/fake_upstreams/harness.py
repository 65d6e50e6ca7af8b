"""Runs provider adapters against the fakes: one `ProviderCase` per provider kind."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from fake_upstreams.azure import AzureEmulation, azure_error
from fake_upstreams.gemini import AUTH_TOKENS_PATH, GeminiEmulation, gemini_error
from fake_upstreams.openai import OpenAIEmulation, openai_error
from fake_upstreams.orga import SECRETS_PATH, OrgaEmulation, orga_error
from fake_upstreams.server import CannedResponse, Responder
from icegate_server.clock import Clock, SystemClock
from icegate_server.sessions.providers import (
    MintedToken,
    ProviderKind,
    ProviderRuntime,
    ProviderSettings,
    SessionOptions,
    build_providers,
    make_http_client,
)

API_KEY = "sk-test-SECRET-1234"
AZURE_DEPLOYMENT = "my-realtime"

# Building a client loads the CA bundle (~20 ms); sharing one TLS context keeps the suite fast.
# The fakes speak plain HTTP, so it is never used for a handshake.
_TLS_CONTEXT = ssl.create_default_context()

ErrorBuilder = Callable[[int, str, dict[str, str]], CannedResponse]

_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                  404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 422: "INVALID_ARGUMENT",
                  429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


@dataclass(frozen=True)
class ProviderCase:
    """How to fake and drive one provider kind."""

    kind: ProviderKind
    settings_field: str
    mint_path: str
    options: SessionOptions
    emulation: Callable[[], Responder]
    error: ErrorBuilder
    quota_error: CannedResponse | None = None
    request_id_header: str = "x-request-id"

    def __str__(self) -> str:
        return self.kind.value


CASES = (
    ProviderCase(
        ProviderKind.OPENAI, "openai_base_url", "/v1/realtime/client_secrets",
        SessionOptions(model="gpt-realtime", voice="marin"),
        lambda: OpenAIEmulation(API_KEY),
        lambda status, message, headers: openai_error(status, message, headers=headers),
        openai_error(429, "You exceeded your current quota.", type="insufficient_quota",
                     code="insufficient_quota"),
    ),
    ProviderCase(
        ProviderKind.OPENAI_BETA, "openai_base_url", "/v1/realtime/sessions",
        SessionOptions(model="gpt-4o-realtime-preview", voice="verse"),
        lambda: OpenAIEmulation(API_KEY),
        lambda status, message, headers: openai_error(status, message, headers=headers),
        openai_error(429, "You exceeded your current quota.", type="insufficient_quota",
                     code="insufficient_quota"),
    ),
    ProviderCase(
        ProviderKind.AZURE, "azure_base_url", "/openai/v1/realtime/client_secrets",
        SessionOptions(model=AZURE_DEPLOYMENT, voice="alloy"),
        lambda: AzureEmulation(API_KEY, frozenset({AZURE_DEPLOYMENT})),
        lambda status, message, headers: azure_error(status, str(status), message,
                                                     headers=headers),
        azure_error(429, "insufficient_quota", "Your subscription is out of quota."),
        "apim-request-id",
    ),
    ProviderCase(
        ProviderKind.AZURE_LEGACY, "azure_base_url", "/openai/realtimeapi/sessions",
        SessionOptions(model=AZURE_DEPLOYMENT, voice="alloy"),
        lambda: AzureEmulation(API_KEY, frozenset({AZURE_DEPLOYMENT})),
        lambda status, message, headers: azure_error(status, str(status), message,
                                                     headers=headers),
        azure_error(429, "insufficient_quota", "Your subscription is out of quota."),
        "apim-request-id",
    ),
    ProviderCase(
        ProviderKind.ORGA, "orga_base_url", SECRETS_PATH,
        SessionOptions(model="orga-1", voice="alice", email="dev@example.test"),
        lambda: OrgaEmulation(API_KEY),
        lambda status, message, headers: _with_headers(orga_error(status, message), headers),
    ),
    ProviderCase(
        ProviderKind.GEMINI, "gemini_base_url", AUTH_TOKENS_PATH,
        SessionOptions(model="gemini-live-2.5-flash-preview", voice="Puck"),
        lambda: GeminiEmulation(API_KEY),
        lambda status, message, headers: gemini_error(
            status, message, _GOOGLE_STATUS.get(status, "UNKNOWN"),
            headers={"x-request-id": f"goog-{status}", **headers}),
    ),
)
CASES_BY_KIND = {case.kind: case for case in CASES}


def _with_headers(response: CannedResponse, headers: dict[str, str]) -> CannedResponse:
    return CannedResponse(response.status, response.json_body,
                          headers={**response.headers, **headers})


@dataclass
class RecordingSleep:
    """An injected sleep that records each wait and returns at once."""

    delays: list[float] = field(default_factory=list)

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


async def mint_async(
    case: ProviderCase,
    base_url: str | None,
    options: SessionOptions | None = None,
    *,
    api_key: str = API_KEY,
    timeout: float | None = 5.0,
    sleep: RecordingSleep | None = None,
    clock: Clock | None = None,
) -> MintedToken:
    """Builds the real registry around a fresh pooled client and mints once."""
    transport = httpx.AsyncHTTPTransport(verify=_TLS_CONTEXT)
    async with make_http_client(connect_timeout=2.0, read_timeout=5.0,
                                transport=transport) as http:
        runtime = ProviderRuntime(
            http,
            clock=clock or SystemClock(),
            sleep=sleep or RecordingSleep(),
            random=lambda: 0.0,  # no jitter: backoffs are exactly 0.5, 1.0, ...
        )
        settings = dataclasses.replace(
            ProviderSettings(), **{case.settings_field: base_url}  # type: ignore[arg-type]
        )
        provider = build_providers(settings, runtime)[case.kind]
        return await provider.mint(api_key, options or case.options, timeout=timeout)


def mint(case: ProviderCase, base_url: str | None, options: SessionOptions | None = None,
         **kwargs: object) -> MintedToken:
    """`mint_async` on a fresh event loop."""
    return asyncio.run(mint_async(case, base_url, options, **kwargs))  # type: ignore[arg-type]
