"""OpenAI Realtime: GA `/v1/realtime/client_secrets` and beta `/v1/realtime/sessions`.

The request and answer shapes live here as functions because Azure OpenAI speaks the same
two dialects with another URL and auth header.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from icegate_server.errors import InvalidFieldError
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
    check_choice,
    check_instructions,
    check_modalities,
    check_model,
    check_range,
    check_tools,
    reject_if_set,
)
from icegate_server.sessions.providers.openai_session import (
    beta_session_fields,
    ga_session,
    validate_beta_session,
    validate_ga_session,
)
from icegate_server.sessions.providers.upstream_text import (
    UpstreamField,
    upstream_sdp,
    upstream_text,
)

DEFAULT_BASE_URL = "https://api.openai.com"
DEFAULT_GA_MODEL = "gpt-realtime"
DEFAULT_BETA_MODEL = "gpt-4o-realtime-preview"

VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"}
)
SPEED_RANGE = (0.25, 1.5)
TOKEN_TTL_RANGE = (10, 7200)
DEFAULT_TOKEN_TTL_SECONDS = 600
# The beta session docs give 0.6..1.2 for realtime audio models; wider values are refused there.
BETA_TEMPERATURE_RANGE = (0.6, 1.2)
GA_MODALITIES = (frozenset({"audio"}), frozenset({"text"}))
BETA_MODALITIES = (frozenset({"text"}), frozenset({"audio", "text"}))


# --- GA: client_secrets (also Azure GA) -------------------------------------------------------


def validate_client_secrets_options(
    options: SessionOptions, provider: ProviderKind, *, model_required: bool
) -> None:
    """Checks options for a GA `client_secrets` request."""
    check_model(options.model, required=model_required)
    check_choice("voice", options.voice, VOICES)
    check_instructions(options.instructions)
    if options.temperature is not None:
        # The GA session object has no temperature any more; say so, not just "no".
        beta = "openai_beta" if provider is ProviderKind.OPENAI else "azure_legacy"
        raise InvalidFieldError("temperature", f"is a beta-only session field: GA sessions "
                                f"({provider.value}) have none; use provider {beta}")
    check_range("speed", options.speed, *SPEED_RANGE)
    check_range("token_ttl", options.token_ttl_seconds, *TOKEN_TTL_RANGE)
    check_modalities(options.modalities, GA_MODALITIES)
    reject_if_set("email", options.email, provider)
    check_tools(options.tools)
    validate_ga_session(options, provider)


def client_secrets_body(options: SessionOptions, model: str) -> JsonObject:
    """The GA request body: an expiry and the session (`openai_session.ga_session`)."""
    seconds = options.token_ttl_seconds or DEFAULT_TOKEN_TTL_SECONDS
    return {"expires_after": {"anchor": "created_at", "seconds": seconds},
            "session": ga_session(options, model)}


def call_parts(options: SessionOptions, model: str, sdp_offer: str
               ) -> dict[str, tuple[None, str, str]]:
    """The multipart body of a server-side call: the browser's offer and the GA session."""
    return {"sdp": (None, sdp_offer, "application/sdp"),
            "session": (None, json.dumps(ga_session(options, model)), "application/json")}


def parse_call(answer: UpstreamAnswer, model: str) -> CreatedCall:
    """Reads a call's `201 Created`: the SDP answer as the body, the call id in `Location`
    (`/v1/realtime/calls/{call_id}`; tolerated absent, as the docs leave it unconfirmed)."""
    sdp_answer = upstream_sdp(answer.raw_text, answer.secrets)
    if not sdp_answer:
        raise answer.malformed("no SDP answer")
    call_id = upstream_text(answer.location.rstrip("/").rpartition("/")[2],
                            UpstreamField.CALL_ID, answer.secrets)
    return CreatedCall(sdp_answer=sdp_answer, call_id=call_id, model=model,
                       upstream_request_id=answer.request_id)


def checked_call_id(call_id: str) -> str:
    """A call id fit to go into a URL path (it came from a provider's answer, once)."""
    if not re.fullmatch(UpstreamField.CALL_ID.value or "", call_id):
        raise ValueError("not a call id")
    return call_id


def parse_client_secret(answer: UpstreamAnswer, options: SessionOptions, model: str) -> MintedToken:
    """Reads `{"value", "expires_at", "session": {...}}`."""
    return MintedToken(
        value=answer.require_text(UpstreamField.TOKEN, "value"),
        expires_at=answer.require_unix_time("expires_at"),
        upstream_session_id=answer.text(UpstreamField.SESSION_ID, "session", "id"),
        model=answer.text(UpstreamField.MODEL, "session", "model", default=model),
        voice=answer.text(UpstreamField.VOICE, "session", "audio", "output", "voice",
                          default=options.voice),
        upstream_request_id=answer.request_id,
    )


# --- beta: sessions (also Azure legacy) -------------------------------------------------------


def validate_sessions_options(
    options: SessionOptions, provider: ProviderKind, *, model_required: bool
) -> None:
    """Checks options for a beta `sessions` request."""
    check_model(options.model, required=model_required)
    check_choice("voice", options.voice, VOICES)
    check_instructions(options.instructions)
    check_range("temperature", options.temperature, *BETA_TEMPERATURE_RANGE)
    check_range("speed", options.speed, *SPEED_RANGE)
    # The beta token lives about a minute and the documented body has no way to change it.
    reject_if_set("token_ttl", options.token_ttl_seconds, provider)
    check_modalities(options.modalities, BETA_MODALITIES)
    reject_if_set("email", options.email, provider)
    check_tools(options.tools)
    validate_beta_session(options, provider)


def sessions_body(options: SessionOptions, model: str) -> JsonObject:
    """The beta request body: flat session fields."""
    body: dict[str, Any] = {"model": model}
    if options.voice:
        body["voice"] = options.voice
    if options.instructions:
        body["instructions"] = options.instructions
    if options.modalities:
        body["modalities"] = sorted(options.modalities)
    if options.temperature is not None:
        body["temperature"] = options.temperature
    if options.speed is not None:
        body["speed"] = options.speed
    if options.tools:
        body["tools"] = list(options.tools)
    body.update(beta_session_fields(options))
    return body


def parse_session(answer: UpstreamAnswer, options: SessionOptions, model: str) -> MintedToken:
    """Reads `{"id", "model", "voice", "client_secret": {"value", "expires_at"}}`."""
    return MintedToken(
        value=answer.require_text(UpstreamField.TOKEN, "client_secret", "value"),
        expires_at=answer.require_unix_time("client_secret", "expires_at"),
        upstream_session_id=answer.text(UpstreamField.SESSION_ID, "id"),
        model=answer.text(UpstreamField.MODEL, "model", default=model),
        voice=answer.text(UpstreamField.VOICE, "voice", default=options.voice),
        upstream_request_id=answer.request_id,
    )


# --- the adapters -----------------------------------------------------------------------------


class _OpenAIBase:
    """What the GA and beta adapters share: URL, auth headers, error dialect."""

    kind: ProviderKind
    _path: str
    _default_model: str

    def __init__(
        self,
        runtime: ProviderRuntime,
        base_url: str = DEFAULT_BASE_URL,
        *,
        organization: str = "",
        project: str = "",
    ) -> None:
        """Builds the adapter.

        Args:
            runtime: The shared HTTP client, clock, sleep and random source.
            base_url: Scheme and host (no path), e.g. https://api.openai.com.
            organization: Optional `OpenAI-Organization` header value.
            project: Optional `OpenAI-Project` header value.
        """
        self._url = base_url.rstrip("/") + self._path
        self._calls_url = base_url.rstrip("/") + "/v1/realtime/calls"
        # The sideband of a call is a WebSocket on the same host (wss for https).
        self._sideband_url = "ws" + base_url.rstrip("/").removeprefix("http") + "/v1/realtime"
        self._http = UpstreamHttp(runtime, self.kind)
        self._extra_headers = {
            name: value
            for name, value in (("OpenAI-Organization", organization),
                                ("OpenAI-Project", project))
            if value
        }

    async def _post(
        self, api_key: str, body: JsonObject, *, timeout: float | None,
        headers: Mapping[str, str] | None = None,
    ) -> UpstreamAnswer:
        """POSTs `body` with the bearer key, the optional OpenAI headers and `headers`."""
        check_api_key(api_key, self.kind)
        auth = {"Authorization": f"Bearer {api_key}", **self._extra_headers}
        return await self._http.call(
            "POST", self._url, headers={**auth, **(headers or {})}, json_body=body,
            deadline=self._http.deadline(timeout), secrets=(api_key,),
        )


class OpenAIProvider(_OpenAIBase):
    """OpenAI Realtime GA: `POST /v1/realtime/client_secrets`."""

    kind = ProviderKind.OPENAI
    _path = "/v1/realtime/client_secrets"
    default_token_ttl_seconds: int | None = DEFAULT_TOKEN_TTL_SECONDS

    def validate(self, options: SessionOptions) -> None:
        """See `Provider.validate`."""
        validate_client_secrets_options(options, self.kind, model_required=False)

    async def mint(
        self, api_key: str, options: SessionOptions, *, timeout: float | None
    ) -> MintedToken:
        """See `Provider.mint`."""
        self.validate(options)
        model = options.model or DEFAULT_GA_MODEL
        answer = await self._post(api_key, client_secrets_body(options, model), timeout=timeout)
        return parse_client_secret(answer, options, model)

    async def create_call(self, api_key: str, options: SessionOptions, sdp_offer: str, *,
                          timeout: float | None) -> CreatedCall:
        """See `CallingProvider.create_call`: `POST /v1/realtime/calls`, multipart."""
        self.validate(options)
        check_api_key(api_key, self.kind)
        model = options.model or DEFAULT_GA_MODEL
        auth = {"Authorization": f"Bearer {api_key}", **self._extra_headers}
        answer = await self._http.call(
            "POST", self._calls_url, headers=auth, files=call_parts(options, model, sdp_offer),
            json_answer=False, deadline=self._http.deadline(timeout), secrets=(api_key,))
        return parse_call(answer, model)

    async def accept_call(self, api_key: str, call_id: str, options: SessionOptions, *,
                          timeout: float | None) -> CreatedCall:
        """Accepts an incoming call (the `realtime.call.incoming` webhook) with the session of
        `options`: `POST /v1/realtime/calls/{call_id}/accept`, the GA session as the body.
        The answer carries no SDP (the caller's side negotiated it): `sdp_answer` is ""."""
        self.validate(options)
        check_api_key(api_key, self.kind)
        model = options.model or DEFAULT_GA_MODEL
        auth = {"Authorization": f"Bearer {api_key}", **self._extra_headers}
        answer = await self._http.call(
            "POST", f"{self._calls_url}/{checked_call_id(call_id)}/accept", headers=auth,
            json_body=ga_session(options, model), json_answer=False,
            deadline=self._http.deadline(timeout), secrets=(api_key,))
        return CreatedCall(sdp_answer="", call_id=call_id, model=model,
                           upstream_request_id=answer.request_id)

    async def reject_call(self, api_key: str, call_id: str, *, sip_status: int,
                          timeout: float | None) -> None:
        """Declines an incoming call: `POST /v1/realtime/calls/{call_id}/reject` with
        `{"status_code": sip_status}` (e.g. 486 Busy Here)."""
        check_api_key(api_key, self.kind)
        auth = {"Authorization": f"Bearer {api_key}", **self._extra_headers}
        await self._http.call(
            "POST", f"{self._calls_url}/{checked_call_id(call_id)}/reject", headers=auth,
            json_body={"status_code": sip_status}, json_answer=False,
            deadline=self._http.deadline(timeout), secrets=(api_key,))

    def sideband(self, api_key: str, call_id: str) -> tuple[str, dict[str, str]]:
        """The URL and headers of a call's sideband WebSocket (`?call_id=`), with the key."""
        check_api_key(api_key, self.kind)
        return (f"{self._sideband_url}?call_id={checked_call_id(call_id)}",
                {"Authorization": f"Bearer {api_key}", **self._extra_headers})

    async def hang_up(self, api_key: str, call_id: str, *, timeout: float | None) -> None:
        """See `CallingProvider.hang_up`: `POST /v1/realtime/calls/{call_id}/hangup`."""
        check_api_key(api_key, self.kind)
        auth = {"Authorization": f"Bearer {api_key}", **self._extra_headers}
        await self._http.call(
            "POST", f"{self._calls_url}/{checked_call_id(call_id)}/hangup", headers=auth,
            json_answer=False, deadline=self._http.deadline(timeout), secrets=(api_key,))


class OpenAIBetaProvider(_OpenAIBase):
    """OpenAI Realtime beta: `POST /v1/realtime/sessions` (token lives about a minute)."""

    kind = ProviderKind.OPENAI_BETA
    _path = "/v1/realtime/sessions"
    default_token_ttl_seconds: int | None = None

    def validate(self, options: SessionOptions) -> None:
        """See `Provider.validate`."""
        validate_sessions_options(options, self.kind, model_required=False)

    async def mint(
        self, api_key: str, options: SessionOptions, *, timeout: float | None
    ) -> MintedToken:
        """See `Provider.mint`."""
        self.validate(options)
        model = options.model or DEFAULT_BETA_MODEL
        answer = await self._post(api_key, sessions_body(options, model), timeout=timeout,
                                  headers={"OpenAI-Beta": "realtime=v1"})
        return parse_session(answer, options, model)
