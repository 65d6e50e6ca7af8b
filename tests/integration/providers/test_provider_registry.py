"""The registry the server uses: kinds, base URLs from the settings, the shared client."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from fake_upstreams.harness import API_KEY, CASES_BY_KIND, mint
from icegate_server.errors import (
    InvalidFieldError,
    UpstreamAuthFailedError,
    UpstreamNotConfiguredError,
)
from icegate_server.server import provider_settings
from icegate_server.sessions.providers import (
    ProviderKind,
    ProviderRuntime,
    ProviderSettings,
    SessionOptions,
    build_providers,
    make_http_client,
    parse_provider_kind,
)
from icegate_server.settings import ConfigError, load_settings


def test_every_kind_has_an_adapter_of_that_kind() -> None:
    async def build() -> None:
        async with make_http_client() as http:
            providers = build_providers(ProviderSettings(), ProviderRuntime(http))
            assert set(providers) == set(ProviderKind)
            assert all(p.kind is kind for kind, p in providers.items())

    asyncio.run(build())


def test_base_url_settings_override_defaults() -> None:
    # The base URLs are ordinary settings; the server turns them into ProviderSettings.
    settings = provider_settings(load_settings({}, {
        "ICEGATE_OPENAI_BASE_URL": "http://127.0.0.1:9000",
        "ICEGATE_AZURE_BASE_URL": "https://res.openai.azure.com",
        "ICEGATE_GEMINI_BASE_URL": "",
    }))
    assert settings.openai_base_url == "http://127.0.0.1:9000"
    assert settings.azure_base_url == "https://res.openai.azure.com"
    assert settings.orga_base_url == "https://api.orga-ai.com"
    assert settings.gemini_base_url == "https://generativelanguage.googleapis.com"
    assert provider_settings(load_settings({}, {})) == ProviderSettings()
    assert ProviderSettings().azure_base_url is None


@pytest.mark.parametrize("bad", ["ftp://x", "api.openai.com", "https://", "http://:80"])
def test_bad_base_url_names_the_variable(bad: str) -> None:
    with pytest.raises(ConfigError, match="ICEGATE_ORGA_BASE_URL"):
        load_settings({}, {"ICEGATE_ORGA_BASE_URL": bad})


def test_parse_provider_kind() -> None:
    assert parse_provider_kind(" Azure_Legacy ") is ProviderKind.AZURE_LEGACY
    with pytest.raises(InvalidFieldError) as caught:
        parse_provider_kind("deepgram")
    assert caught.value.violations[0].field == "provider"


@pytest.mark.parametrize("kind", [ProviderKind.AZURE, ProviderKind.AZURE_LEGACY])
def test_azure_without_endpoint_is_not_configured(kind: ProviderKind) -> None:
    with pytest.raises(UpstreamNotConfiguredError, match="ICEGATE_AZURE_BASE_URL") as caught:
        mint(CASES_BY_KIND[kind], None)
    assert caught.value.provider == kind.value


@pytest.mark.parametrize("kind", list(ProviderKind))
def test_missing_key_is_not_configured_and_sends_nothing(kind: ProviderKind) -> None:
    with pytest.raises(UpstreamNotConfiguredError):
        mint(CASES_BY_KIND[kind], "http://127.0.0.1:9", api_key="")


def test_unprintable_key_is_refused_without_quoting_it() -> None:
    with pytest.raises(UpstreamAuthFailedError) as caught:
        mint(CASES_BY_KIND[ProviderKind.OPENAI], "http://127.0.0.1:9",
             api_key=API_KEY + "\r\nX-Evil: 1")
    assert API_KEY not in str(caught.value)


def test_http_client_factory_sets_timeouts_and_no_redirects() -> None:
    async def check() -> None:
        transport = httpx.MockTransport(lambda request: httpx.Response(204))
        async with make_http_client(1.5, 7.0, transport=transport) as http:
            assert http.timeout.connect == 1.5
            assert http.timeout.read == 7.0
            assert http.follow_redirects is False
            assert (await http.get("https://example.test/")).status_code == 204

    asyncio.run(check())


def test_session_options_defaults_are_provider_defaults() -> None:
    options = SessionOptions()
    assert (options.model, options.voice, options.modalities) == ("", "", ())
    assert options.temperature is None and options.token_ttl_seconds is None
