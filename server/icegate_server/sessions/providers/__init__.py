"""Upstream AI providers that mint ephemeral realtime tokens, one adapter per provider.

The server builds one pooled `httpx.AsyncClient` with `make_http_client`, wraps it in a
`ProviderRuntime`, and calls `build_providers` once; each request then picks an adapter by
`ProviderKind` and calls `validate` and `mint`.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from icegate_server.errors import InvalidFieldError
from icegate_server.sessions.providers import gemini, openai, orga
from icegate_server.sessions.providers.azure import AzureLegacyProvider, AzureProvider
from icegate_server.sessions.providers.base import (
    CallingProvider,
    CreatedCall,
    IceServer,
    InputTranscription,
    MintedToken,
    PromptReference,
    Provider,
    ProviderKind,
    ProviderRuntime,
    RetryPolicy,
    SessionOptions,
    Tracing,
    TurnDetection,
)
from icegate_server.sessions.providers.gemini import GeminiProvider
from icegate_server.sessions.providers.openai import OpenAIBetaProvider, OpenAIProvider
from icegate_server.sessions.providers.orga import OrgaProvider

__all__ = [
    "CallingProvider",
    "CreatedCall",
    "IceServer",
    "InputTranscription",
    "MintedToken",
    "PromptReference",
    "Provider",
    "ProviderKind",
    "ProviderRuntime",
    "ProviderSettings",
    "RetryPolicy",
    "SessionOptions",
    "Tracing",
    "TurnDetection",
    "build_providers",
    "make_http_client",
    "parse_provider_kind",
]

@dataclass(frozen=True)
class ProviderSettings:
    """Where each provider lives. Azure has no default: its URL names the customer's resource.

    A plain value: the server builds it from its checked settings (`ICEGATE_*_BASE_URL`).
    """

    openai_base_url: str = openai.DEFAULT_BASE_URL
    azure_base_url: str | None = None
    orga_base_url: str = orga.DEFAULT_BASE_URL
    gemini_base_url: str = gemini.DEFAULT_BASE_URL


def make_http_client(
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """The one pooled client every adapter shares; the server closes it on shutdown.

    Args:
        connect_timeout: Seconds to open a connection (and to wait for a pooled one).
        read_timeout: Seconds to wait for each read or write; the caller's deadline is
            enforced separately and usually comes first.
        transport: A replacement transport (tests); None for the real network.
    """
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
        ),
        # Keep every connection the pool may open: with fewer kept alive than allowed, calls
        # beyond the kept ones open (and close) a connection each, under exactly the load
        # where that hurts most. Idle ones still close after httpx's 5 s keep-alive expiry.
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
        # A redirect from a token API is unexpected; following it could send the key elsewhere.
        follow_redirects=False,
        headers={"User-Agent": "icegate"},
        transport=transport,
    )


def build_providers(
    settings: ProviderSettings, runtime: ProviderRuntime
) -> dict[ProviderKind, Provider]:
    """One adapter per provider kind, all sharing `runtime`."""
    return {
        ProviderKind.OPENAI: OpenAIProvider(runtime, settings.openai_base_url),
        ProviderKind.OPENAI_BETA: OpenAIBetaProvider(runtime, settings.openai_base_url),
        ProviderKind.AZURE: AzureProvider(runtime, settings.azure_base_url),
        ProviderKind.AZURE_LEGACY: AzureLegacyProvider(runtime, settings.azure_base_url),
        ProviderKind.ORGA: OrgaProvider(runtime, settings.orga_base_url),
        ProviderKind.GEMINI: GeminiProvider(runtime, settings.gemini_base_url),
    }


def parse_provider_kind(name: str, field: str = "provider") -> ProviderKind:
    """The kind named `name` (its short name, any case).

    Raises:
        InvalidFieldError: an unknown name, on `field`.
    """
    try:
        return ProviderKind(name.strip().lower())
    except ValueError:
        choices = ", ".join(kind.value for kind in ProviderKind)
        raise InvalidFieldError(field, f"must be one of {choices}") from None
