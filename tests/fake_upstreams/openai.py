"""OpenAI Realtime as the fakes see it: GA client_secrets, beta sessions, OpenAI error bodies."""

from __future__ import annotations

import itertools
import time
from typing import Any

from fake_upstreams.server import CannedResponse, RecordedRequest

VOICES = {"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"}
_ids = itertools.count(1)


def openai_error(
    status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
    param: str | None = None, headers: dict[str, str] | None = None,
) -> CannedResponse:
    """An error in OpenAI's shape, with an `x-request-id`."""
    return CannedResponse(
        status,
        {"error": {"message": message, "type": type, "param": param, "code": code}},
        headers={"x-request-id": f"req_err{next(_ids)}", **(headers or {})},
    )


def _masked(key: str) -> str:
    # What OpenAI really echoes back for a wrong key: its head and tail.
    return f"{key[:6]}{'*' * 10}{key[-4:]}"


def ga_answer(session: dict[str, Any], seconds: int, request_id: str) -> CannedResponse:
    n = next(_ids)
    now = int(time.time())
    return CannedResponse(200, {
        "value": f"ek_ga_{n}",
        "expires_at": now + seconds,
        "session": {"type": "realtime", "object": "realtime.session", "id": f"sess_{n}",
                    **session},
    }, headers={"x-request-id": request_id})


def beta_answer(body: dict[str, Any], request_id: str) -> CannedResponse:
    n = next(_ids)
    return CannedResponse(200, {
        "id": f"sess_{n}",
        "object": "realtime.session",
        "model": body["model"],
        "voice": body.get("voice", "alloy"),
        "modalities": body.get("modalities", ["audio", "text"]),
        "client_secret": {"value": f"ek_beta_{n}", "expires_at": int(time.time()) + 60},
    }, headers={"x-request-id": request_id})


REALTIME_FIELDS = {"type", "model", "instructions", "output_modalities", "audio", "tools",
                   "tool_choice", "max_output_tokens", "tracing", "prompt", "include",
                   "truncation"}
TRANSCRIPTION_FIELDS = {"type", "audio", "include"}
AUDIO_FORMATS = {"audio/pcm", "audio/pcmu", "audio/pcma"}
INPUT_FIELDS = {"format", "turn_detection", "transcription", "noise_reduction"}
OUTPUT_FIELDS = {"format", "voice", "speed"}


def check_ga_session(session: Any) -> str | None:
    """The first thing OpenAI would refuse in a GA `session` object, None when fine."""
    if not isinstance(session, dict) or session.get("type") not in ("realtime", "transcription"):
        return "session.type must be realtime or transcription"
    known = REALTIME_FIELDS if session["type"] == "realtime" else TRANSCRIPTION_FIELDS
    unknown = sorted(set(session) - known)
    if unknown:  # e.g. the beta's `temperature`
        return f"Unknown parameter: 'session.{unknown[0]}'."
    audio = session.get("audio", {})
    for side, fields in (("input", INPUT_FIELDS), ("output", OUTPUT_FIELDS)):
        part = audio.get(side, {})
        extra = sorted(set(part) - fields)
        if extra:
            return f"Unknown parameter: 'session.audio.{side}.{extra[0]}'."
        audio_format = part.get("format")
        if audio_format is not None and audio_format.get("type") not in AUDIO_FORMATS:
            return f"Invalid value for 'session.audio.{side}.format.type'."
    voice = audio.get("output", {}).get("voice")
    if voice is not None and voice not in VOICES:
        return f"Invalid value: '{voice}'. Supported values are: {sorted(VOICES)}"
    detection = audio.get("input", {}).get("turn_detection")
    if detection is not None and detection.get("type") not in ("server_vad", "semantic_vad"):
        return "Invalid value for 'session.audio.input.turn_detection.type'."
    transcription = audio.get("input", {}).get("transcription")
    if transcription is not None and not transcription.get("model"):
        return "Missing required parameter: 'session.audio.input.transcription.model'."
    tokens = session.get("max_output_tokens", "inf")
    if tokens != "inf" and not (isinstance(tokens, int) and 1 <= tokens <= 4096):
        return "Invalid value for 'session.max_output_tokens'."
    return None


def check_ga_body(body: Any) -> str | None:
    """The first thing OpenAI would refuse in a client_secrets body, None when fine."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    expires = body.get("expires_after", {"anchor": "created_at", "seconds": 600})
    if expires.get("anchor") != "created_at":
        return "expires_after.anchor must be created_at"
    if not 10 <= expires.get("seconds", 600) <= 7200:
        return "expires_after.seconds must be between 10 and 7200"
    return check_ga_session(body.get("session"))


class OpenAIEmulation:
    """Answers like api.openai.com for one valid key."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    def __call__(self, request: RecordedRequest) -> CannedResponse:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            return openai_error(401, f"Incorrect API key provided: {_masked(given)}.",
                                code="invalid_api_key")
        request_id = f"req_{next(_ids)}"
        if request.method == "POST" and request.path == "/v1/realtime/client_secrets":
            problem = check_ga_body(request.json)
            if problem:
                return openai_error(400, problem)
            return ga_answer(request.json["session"],
                             request.json["expires_after"]["seconds"], request_id)
        if request.method == "POST" and request.path == "/v1/realtime/sessions":
            body = request.json
            if not isinstance(body, dict) or "model" not in body:
                return openai_error(400, "Missing required parameter: 'model'.", param="model")
            return beta_answer(body, request_id)
        return openai_error(404, f"Invalid URL ({request.method} {request.path})")
