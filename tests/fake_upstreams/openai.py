"""OpenAI Realtime as the fakes see it: GA client_secrets, beta sessions, OpenAI error bodies."""

from __future__ import annotations

import email.policy
import itertools
import json
import re
import socket
import time
from email.parser import BytesParser
from typing import TYPE_CHECKING, Any

from fake_upstreams.server import CannedResponse, RecordedRequest
from fake_upstreams.websocket import ServerWebSocket

if TYPE_CHECKING:
    from fake_upstreams.webrtc_peer import RealtimePeers

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


CANNED_SDP_ANSWER = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
"""The answer of a fake without a WebRTC peer (tests that never connect)."""


def form_parts(request: RecordedRequest) -> dict[str, str] | None:
    """The parts of a multipart/form-data body by name, None when it is not one."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return None
    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + request.body)
    parts = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            payload = part.get_payload(decode=True)
            parts[name] = payload.decode() if isinstance(payload, bytes) else str(payload)
    return parts


def answer_call(request: RecordedRequest, peers: RealtimePeers | None, request_id: str,
                location_prefix: str, check_session: Any = None) -> CannedResponse:
    """A calls endpoint: `sdp` and `session` parts in, `201` with the SDP answer out."""
    parts = form_parts(request)
    if parts is None or "sdp" not in parts or "session" not in parts:
        return openai_error(400, "Expected multipart/form-data with sdp and session parts.")
    try:
        session = json.loads(parts["session"])
    except ValueError:
        return openai_error(400, "session must be JSON")
    problem = (check_session or check_ga_session)(session)
    if problem:
        return openai_error(400, problem)
    if not parts["sdp"].startswith("v=0"):
        return openai_error(400, "Invalid SDP offer.")
    if peers is None:
        sdp, call_id = CANNED_SDP_ANSWER, f"rtc_canned{next(_ids)}"
    else:
        sdp, call_id = peers.answer(parts["sdp"], session)
    return CannedResponse(201, raw_body=sdp.encode(), headers={
        "Content-Type": "application/sdp", "Location": f"{location_prefix}/{call_id}",
        "x-request-id": request_id})


class OpenAIEmulation:
    """Answers like api.openai.com for one valid key; calls get a real WebRTC peer's answer
    when given `peers`."""

    def __init__(self, api_key: str, peers: RealtimePeers | None = None) -> None:
        self.api_key = api_key
        self.peers = peers
        self.hung_up: list[str] = []
        self.sidebands_opened: list[str] = []
        self.sideband_updates: list[dict[str, Any]] = []
        self.ringing: set[str] = set()
        """Incoming calls (`ring`) waiting for an accept or a reject."""
        self.accepted: list[tuple[str, dict[str, Any]]] = []
        """(call id, session) of each accepted incoming call."""
        self.rejected: list[tuple[str, int]] = []
        """(call id, SIP status) of each rejected incoming call."""

    def ring(self) -> str:
        """A SIP call ringing the project: its id, to accept or reject once."""
        call_id = f"rtc_sip{next(_ids)}"
        self.ringing.add(call_id)
        return call_id

    def _answer_incoming(self, call_id: str, verb: str, body: Any,
                         request_id: str) -> CannedResponse:
        if call_id not in self.ringing:
            return openai_error(404, f"Call {call_id} not found.")
        if verb == "accept":
            problem = check_ga_session(body)
            if problem:
                return openai_error(400, problem)
            self.accepted.append((call_id, body))
        else:
            status = (body or {}).get("status_code", 603)
            if not isinstance(status, int) or not 400 <= status <= 699:
                return openai_error(400, "Invalid value for 'status_code'.")
            self.rejected.append((call_id, status))
        self.ringing.discard(call_id)
        return CannedResponse(200, {}, headers={"x-request-id": request_id})

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
        if request.method == "POST" and request.path == "/v1/realtime/calls":
            return answer_call(request, self.peers, request_id, "/v1/realtime/calls")
        incoming = re.fullmatch(r"/v1/realtime/calls/([A-Za-z0-9_-]+)/(accept|reject)",
                                request.path)
        if request.method == "POST" and incoming:
            return self._answer_incoming(incoming[1], incoming[2], request.json, request_id)
        hangup = re.fullmatch(r"/v1/realtime/calls/([A-Za-z0-9_-]+)/hangup", request.path)
        if request.method == "POST" and hangup:
            call_id = hangup[1]
            known = self.peers.hang_up(call_id) if self.peers is not None else \
                call_id.startswith(("rtc_canned", "rtc_sip"))
            if not known:
                return openai_error(404, f"Call {call_id} not found.")
            self.hung_up.append(call_id)
            return CannedResponse(200, {}, headers={"x-request-id": request_id})
        if request.method == "POST" and request.path == "/v1/realtime/sessions":
            body = request.json
            if not isinstance(body, dict) or "model" not in body:
                return openai_error(400, "Missing required parameter: 'model'.", param="model")
            return beta_answer(body, request_id)
        return openai_error(404, f"Invalid URL ({request.method} {request.path})")

    def websocket(self, request: RecordedRequest, connection: socket.socket,
                  head: bytes) -> None:
        """`GET /v1/realtime?call_id=...` upgraded: a call's sideband. The call's events
        reach it; its `session.update` changes the call's session."""
        call_id = (request.query.get("call_id") or [""])[0]
        if request.path != "/v1/realtime" or self.peers is None or \
                request.headers.get("authorization") != f"Bearer {self.api_key}":
            connection.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
            return
        sideband = ServerWebSocket(connection, head)
        if not self.peers.attach_sideband(call_id, sideband):
            sideband.close()
            return
        self.sidebands_opened.append(call_id)
        for message in sideband.messages():
            event = json.loads(message)
            if event.get("type") == "session.update":
                self.sideband_updates.append(event)
                self.peers.update(call_id, event.get("session") or {})
