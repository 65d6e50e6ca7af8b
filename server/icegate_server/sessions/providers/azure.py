"""Azure OpenAI Realtime: GA `/openai/v1/realtime/client_secrets` and the legacy preview API.

Both speak OpenAI's dialects (see `openai`), with the `api-key` header, a resource-specific
base URL (`https://<resource>.openai.azure.com`, no default) and the deployment name as model.
"""

from __future__ import annotations

from collections.abc import Mapping

from icegate_server.errors import UpstreamNotConfiguredError
from icegate_server.sessions.providers.base import (
    CreatedCall,
    JsonObject,
    MintedToken,
    ProviderKind,
    ProviderRuntime,
    SessionOptions,
    UpstreamAnswer,
    UpstreamHttp,
    check_api_key,
)
from icegate_server.sessions.providers.openai import (
    DEFAULT_TOKEN_TTL_SECONDS,
    call_parts,
    checked_call_id,
    client_secrets_body,
    parse_call,
    parse_client_secret,
    parse_session,
    sessions_body,
    validate_client_secrets_options,
    validate_sessions_options,
)

LEGACY_API_VERSION = "2025-04-01-preview"
# Azure front doors add their own id; either helps a support ticket.
REQUEST_ID_HEADERS = ("x-request-id", "apim-request-id")


class _AzureBase:
    """What both Azure adapters share: the resource URL and the `api-key` header."""

    kind: ProviderKind
    _path: str

    _calls_path = "/openai/v1/realtime/calls"

    def __init__(self, runtime: ProviderRuntime, base_url: str | None) -> None:
        """Builds the adapter.

        Args:
            runtime: The shared HTTP client, clock, sleep and random source.
            base_url: The resource's endpoint, e.g. https://myres.openai.azure.com; None when
                the operator configured none (every mint then fails as not configured).
        """
        self._url = None if not base_url else base_url.rstrip("/") + self._path
        self._calls_url = None if not base_url else base_url.rstrip("/") + self._calls_path
        self._http = UpstreamHttp(runtime, self.kind, request_id_headers=REQUEST_ID_HEADERS)

    def _configured_url(self) -> str:
        if self._url is None:
            raise UpstreamNotConfiguredError(
                "no Azure OpenAI endpoint is configured (ICEGATE_AZURE_BASE_URL)",
                provider=self.kind.value,
            )
        return self._url

    async def _post(
        self, api_key: str, body: JsonObject, *, timeout: float | None,
        params: Mapping[str, str] | None = None,
    ) -> UpstreamAnswer:
        """POSTs `body` to the resource with the `api-key` header (URL and key checked first)."""
        url = self._configured_url()
        check_api_key(api_key, self.kind)
        return await self._http.call(
            "POST", url, headers={"api-key": api_key}, params=params, json_body=body,
            deadline=self._http.deadline(timeout), secrets=(api_key,),
        )


class AzureProvider(_AzureBase):
    """Azure OpenAI GA: `POST /openai/v1/realtime/client_secrets`."""

    kind = ProviderKind.AZURE
    _path = "/openai/v1/realtime/client_secrets"
    default_token_ttl_seconds: int | None = DEFAULT_TOKEN_TTL_SECONDS

    def validate(self, options: SessionOptions) -> None:
        """See `Provider.validate`; the model is the deployment name and is required."""
        validate_client_secrets_options(options, self.kind, model_required=True)

    async def mint(
        self, api_key: str, options: SessionOptions, *, timeout: float | None
    ) -> MintedToken:
        """See `Provider.mint`."""
        self.validate(options)
        answer = await self._post(
            api_key, client_secrets_body(options, options.model), timeout=timeout)
        return parse_client_secret(answer, options, options.model)

    async def create_call(self, api_key: str, options: SessionOptions, sdp_offer: str, *,
                          timeout: float | None) -> CreatedCall:
        """See `CallingProvider.create_call`: `POST /openai/v1/realtime/calls`, multipart."""
        self.validate(options)
        self._configured_url()
        assert self._calls_url is not None
        check_api_key(api_key, self.kind)
        answer = await self._http.call(
            "POST", self._calls_url, headers={"api-key": api_key},
            files=call_parts(options, options.model, sdp_offer), json_answer=False,
            deadline=self._http.deadline(timeout), secrets=(api_key,))
        return parse_call(answer, options.model)

    async def hang_up(self, api_key: str, call_id: str, *, timeout: float | None) -> None:
        """See `CallingProvider.hang_up`: `POST /openai/v1/realtime/calls/{call_id}/hangup`."""
        self._configured_url()
        check_api_key(api_key, self.kind)
        await self._http.call(
            "POST", f"{self._calls_url}/{checked_call_id(call_id)}/hangup",
            headers={"api-key": api_key}, json_answer=False,
            deadline=self._http.deadline(timeout), secrets=(api_key,))


class AzureLegacyProvider(_AzureBase):
    """Azure OpenAI preview: `POST /openai/realtimeapi/sessions?api-version=2025-04-01-preview`."""

    kind = ProviderKind.AZURE_LEGACY
    _path = "/openai/realtimeapi/sessions"
    default_token_ttl_seconds: int | None = None

    def validate(self, options: SessionOptions) -> None:
        """See `Provider.validate`; the model is the deployment name and is required."""
        validate_sessions_options(options, self.kind, model_required=True)

    async def mint(
        self, api_key: str, options: SessionOptions, *, timeout: float | None
    ) -> MintedToken:
        """See `Provider.mint`."""
        self.validate(options)
        answer = await self._post(
            api_key, sessions_body(options, options.model), timeout=timeout,
            params={"api-version": LEGACY_API_VERSION})
        return parse_session(answer, options, options.model)
