"""Gemini Live: `POST /v1alpha/auth_tokens` with `x-goog-api-key`; the token is the answer's name.

The session setup is locked into the token (`bidiGenerateContentSetup`), so the browser cannot
change model, voice or instructions with it.
"""

from __future__ import annotations

from icegate_server.clock import utc_datetime
from icegate_server.sessions.providers.base import (
    ErrorDetail,
    JsonObject,
    MintedToken,
    ProviderKind,
    ProviderRuntime,
    SessionOptions,
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
from icegate_server.sessions.providers.openai_session import GA_ONLY, reject_ga_fields
from icegate_server.sessions.providers.upstream_text import UpstreamField

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
DEFAULT_MODEL = "gemini-live-2.5-flash-preview"
VOICES = frozenset({
    "Achernar", "Achird", "Algenib", "Algieba", "Alnilam", "Aoede", "Autonoe", "Callirrhoe",
    "Charon", "Despina", "Enceladus", "Erinome", "Fenrir", "Gacrux", "Iapetus", "Kore",
    "Laomedeia", "Leda", "Orus", "Puck", "Pulcherrima", "Rasalgethi", "Sadachbia",
    "Sadaltager", "Schedar", "Sulafat", "Umbriel", "Vindemiatrix", "Zephyr", "Zubenelgenubi",
})
TEMPERATURE_RANGE = (0.0, 2.0)
# expireTime must be less than 20 hours away.
TOKEN_TTL_RANGE = (10, 20 * 3600 - 1)
DEFAULT_TOKEN_TTL_SECONDS = 30 * 60
# How long the token may be used to *open* a session (Google's default).
NEW_SESSION_WINDOW_SECONDS = 60
MODALITIES = (frozenset({"audio"}), frozenset({"text"}))
MAX_OUTPUT_TOKENS = 65536
REQUEST_ID_HEADERS = ("x-request-id", "x-goog-request-id")


def parse_google_error(body: object) -> ErrorDetail:
    """Reads `{"error": {"code", "message", "status", "details"}}`.

    Google answers a bad key with 400 INVALID_ARGUMENT and reason API_KEY_INVALID, which is
    an auth failure for us, not a bad request.
    """
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return ErrorDetail()
    message, status = error.get("message"), error.get("status")
    details = error.get("details")
    reasons = {
        detail.get("reason") for detail in details if isinstance(detail, dict)
    } if isinstance(details, list) else set()
    return ErrorDetail(
        message=message if isinstance(message, str) else "",
        code=status if isinstance(status, str) else "",
        auth_failure="API_KEY_INVALID" in reasons,
    )


def _rfc3339(unix_seconds: float) -> str:
    return utc_datetime(unix_seconds).isoformat(timespec="seconds").replace("+00:00", "Z")


class GeminiProvider:
    """Gemini Live ephemeral auth tokens (one use, setup locked in)."""

    kind = ProviderKind.GEMINI
    default_token_ttl_seconds: int | None = DEFAULT_TOKEN_TTL_SECONDS

    def __init__(self, runtime: ProviderRuntime, base_url: str = DEFAULT_BASE_URL) -> None:
        """Builds the adapter.

        Args:
            runtime: The shared HTTP client, clock, sleep and random source.
            base_url: Scheme and host (no path).
        """
        self._url = base_url.rstrip("/") + "/v1alpha/auth_tokens"
        self._clock = runtime.clock
        self._http = UpstreamHttp(
            runtime, self.kind, request_id_headers=REQUEST_ID_HEADERS,
            parse_error=parse_google_error,
        )

    def validate(self, options: SessionOptions) -> None:
        """See `Provider.validate`."""
        check_model(options.model)
        check_choice("voice", options.voice, VOICES)
        check_instructions(options.instructions)
        check_range("temperature", options.temperature, *TEMPERATURE_RANGE)
        reject_if_set("speed", options.speed, self.kind)
        check_range("token_ttl", options.token_ttl_seconds, *TOKEN_TTL_RANGE)
        check_modalities(options.modalities, MODALITIES)
        reject_if_set("email", options.email, self.kind)
        check_tools(options.tools)
        reject_ga_fields(options, self.kind, (*GA_ONLY, "tool_choice"))
        check_range("max_output_tokens", options.max_output_tokens, 1, MAX_OUTPUT_TOKENS)
        transcription = options.input_transcription
        if transcription is not None:
            # Gemini transcribes with its own model, in the language it hears.
            for name in ("model", "language", "prompt"):
                reject_if_set(f"input_transcription.{name}", getattr(transcription, name),
                              self.kind)

    async def mint(
        self, api_key: str, options: SessionOptions, *, timeout: float | None
    ) -> MintedToken:
        """See `Provider.mint`; `expires_at` is the expireTime icegate asked for."""
        self.validate(options)
        check_api_key(api_key, self.kind)
        model = options.model or DEFAULT_MODEL
        ttl = options.token_ttl_seconds or DEFAULT_TOKEN_TTL_SECONDS
        now = self._clock.now()
        setup = _setup(options, model)
        body: JsonObject = {
            "uses": 1,
            "expireTime": _rfc3339(now + ttl),
            "newSessionExpireTime": _rfc3339(now + min(ttl, NEW_SESSION_WINDOW_SECONDS)),
            "bidiGenerateContentSetup": setup,
        }
        if options.locked:
            # A session policy fixed these: lock every field sent, so the browser holding
            # the token cannot change them when it opens the session.
            body["fieldMask"] = ",".join(_field_paths(setup))
        answer = await self._http.call(
            "POST", self._url, headers={"x-goog-api-key": api_key}, json_body=body,
            deadline=self._http.deadline(timeout), secrets=(api_key,),
        )
        return MintedToken(
            value=answer.require_text(UpstreamField.TOKEN, "name"),
            expires_at=now + ttl,
            upstream_session_id="",
            model=model,
            voice=options.voice,
            upstream_request_id=answer.request_id,
        )


def _setup(options: SessionOptions, model: str) -> JsonObject:
    """The `bidiGenerateContentSetup` locked into the token."""
    setup: JsonObject = {"model": model if model.startswith("models/") else f"models/{model}"}
    generation: JsonObject = {}
    if options.modalities:
        generation["responseModalities"] = [m.upper() for m in options.modalities]
    if options.temperature is not None:
        generation["temperature"] = options.temperature
    if options.max_output_tokens is not None:
        generation["maxOutputTokens"] = options.max_output_tokens
    if options.voice:
        generation["speechConfig"] = {
            "voiceConfig": {"prebuiltVoiceConfig": {"voiceName": options.voice}}
        }
    if generation:
        setup["generationConfig"] = generation
    if options.instructions:
        setup["systemInstruction"] = {"parts": [{"text": options.instructions}]}
    if options.tools:
        setup["tools"] = list(options.tools)
    if options.input_transcription is not None:
        setup["inputAudioTranscription"] = {}
    return setup


def _field_paths(setup: JsonObject) -> list[str]:
    """The FieldMask paths of what `setup` sets: `generationConfig`'s fields one by one (the
    browser may still set those the setup leaves out), every other field whole."""
    paths: list[str] = []
    for key, value in setup.items():
        if key == "generationConfig":
            paths.extend(f"generationConfig.{inner}" for inner in value)
        else:
            paths.append(key)
    return paths
