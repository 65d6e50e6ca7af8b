"""A stand-in for OpenAI's Realtime API on this machine: `make demo`'s development aid.

NOT a provider and never part of icegate: nothing in the server starts it or knows of it. The
demo points the dev server's `ICEGATE_OPENAI_BASE_URL` at it, exactly as it would point at a
proxy in front of api.openai.com. It answers what icegate asks of OpenAI:

- `POST /v1/realtime/calls` (multipart `sdp` + `session`, as CreateCall sends them): a real
  WebRTC peer (aiortc) answers the browser's offer; on the browser's `oai-events` data channel
  it sends `session.created`, then a short scripted response (`response.created`, transcript
  deltas, `response.done`), and answers `session.update` and `response.create`. Its "voice",
  on the call's audio track, is a soft tone while it speaks and silence otherwise.
- `POST /v1/realtime/calls/{call_id}/hangup` (EndSession): closes that peer.
- `POST /v1/realtime/client_secrets` (CreateSession): a fake ephemeral token.

Only the key given in `DEMO_PROVIDER_KEY` is accepted. Its peers offer 127.0.0.1 only: the
demo's coturn relays to loopback peers and nowhere else.

    DEMO_PROVIDER_KEY=sk-demo-... python examples/demo/fake_provider.py --listen 127.0.0.1:8765
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.policy
import itertools
import json
import math
import os
import secrets
import time
from array import array
from collections.abc import AsyncIterator
from email.parser import BytesParser
from typing import Any

import aioice.ice
import uvicorn
from aiortc import MediaStreamTrack, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from av import AudioFrame
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

GREETING = "Hello from the demo provider. This is a fake: no model is listening."
_ids = itertools.count(1)


def _loopback_only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"] if use_ipv4 else []


# aioice offers every address of the machine except loopback; the demo's coturn relays to
# loopback only (its deny list covers the private and documentation ranges).
aioice.ice.get_host_addresses = _loopback_only


SAMPLE_RATE = 48_000
FRAME_SAMPLES = 960  # 20 ms, Opus's usual frame
TONE = array("h", (int(3000 * math.sin(2 * math.pi * 400 * n / SAMPLE_RATE))
                   for n in range(FRAME_SAMPLES))).tobytes()  # 400 Hz: 8 whole periods a frame
SILENCE = bytes(2 * FRAME_SAMPLES)


class Voice(MediaStreamTrack):
    """The provider's audio, paced in real time: the tone while `speaking`, else silence."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.speaking = False
        self._samples = 0
        self._started: float | None = None

    async def recv(self) -> AudioFrame:
        if self._started is None:
            self._started = time.monotonic()
        delay = self._started + self._samples / SAMPLE_RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._samples
        frame.planes[0].update(TONE if self.speaking else SILENCE)
        self._samples += FRAME_SAMPLES
        return frame


def openai_error(status: int, message: str, code: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape."""
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                   "param": None, "code": code}}, status_code=status,
                        headers={"x-request-id": f"req_demo{next(_ids)}"})


def form_parts(content_type: str, body: bytes) -> dict[str, str]:
    """The parts of a multipart/form-data body by name (empty when it is not one)."""
    if not content_type.startswith("multipart/form-data"):
        return {}
    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            parts[name] = payload.decode("utf-8", "replace")
    return parts


def event(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, "event_id": f"event_demo{next(_ids)}", **fields})


class Call:
    """One answered call: the peer, the session icegate asked for, the browser's channel."""

    def __init__(self, call_id: str, session: dict[str, Any]) -> None:
        self.call_id = call_id
        self.session = session
        self.connection = RTCPeerConnection()
        self.voice = Voice()
        self.channel: RTCDataChannel | None = None
        self.responses: set[asyncio.Task[None]] = set()

    def speak(self, text: str) -> None:
        """Starts a scripted response (the task kept until done, then let go)."""
        task = asyncio.ensure_future(self.respond(text))
        self.responses.add(task)
        task.add_done_callback(self.responses.discard)

    def send(self, text: str) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(text)

    async def respond(self, text: str) -> None:
        """A scripted response, word by word, as a model's transcript would arrive."""
        response_id = f"resp_demo{next(_ids)}"
        self.send(event("response.created", response={"id": response_id,
                                                        "status": "in_progress"}))
        self.voice.speaking = True
        try:
            for word in text.split(" "):
                await asyncio.sleep(0.15)
                self.send(event("response.output_audio_transcript.delta",
                                response_id=response_id, delta=word + " "))
        finally:
            self.voice.speaking = False
        self.send(event("response.done", response={"id": response_id, "status": "completed"}))

    def on_message(self, message: str | bytes) -> None:
        try:
            received = json.loads(message)
        except ValueError:
            self.send(event("error", error={"type": "invalid_request_error",
                                            "message": "events are JSON objects"}))
            return
        kind = received.get("type") if isinstance(received, dict) else None
        if kind == "session.update" and isinstance(received.get("session"), dict):
            self.session.update(received["session"])
            self.send(event("session.updated", session={"id": f"sess_{self.call_id}",
                                                        **self.session}))
        elif kind == "response.create":
            self.speak("You asked for a response; here it is.")
        else:
            self.send(event("error", error={"type": "invalid_request_error",
                                            "message": "the demo provider takes "
                                            "session.update and response.create"}))


class FakeRealtime:
    """The HTTP side: checks the key, answers offers with aiortc peers, hangs calls up."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.calls: dict[str, Call] = {}

    def authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    async def create_call(self, request: Request) -> Response:
        if not self.authorized(request):
            return openai_error(401, "Incorrect API key provided.", "invalid_api_key")
        parts = form_parts(request.headers.get("content-type", ""), await request.body())
        if "sdp" not in parts or "session" not in parts:
            return openai_error(400, "Expected multipart/form-data with sdp and session parts.")
        try:
            session = json.loads(parts["session"])
        except ValueError:
            return openai_error(400, "session must be JSON")
        if not isinstance(session, dict) or not parts["sdp"].startswith("v=0"):
            return openai_error(400, "Invalid SDP offer or session.")
        call = Call(f"rtc_demo{next(_ids)}_{secrets.token_hex(4)}", session)
        self.calls[call.call_id] = call

        @call.connection.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            call.channel = channel
            channel.on("message", call.on_message)
            # The provider speaks first: the session as it starts, then a greeting.
            call.send(event("session.created", session={"id": f"sess_{call.call_id}",
                                                        **call.session}))
            call.speak(GREETING)

        try:
            await call.connection.setRemoteDescription(
                RTCSessionDescription(parts["sdp"], "offer"))
            if any(t.kind == "audio" for t in call.connection.getTransceivers()):
                call.connection.addTrack(call.voice)  # answers the offer's audio section
            await call.connection.setLocalDescription(await call.connection.createAnswer())
        except ValueError:
            await self._close(call.call_id)
            return openai_error(400, "Invalid SDP offer.")
        return Response(call.connection.localDescription.sdp, status_code=201,
                        media_type="application/sdp", headers={
                            "Location": f"/v1/realtime/calls/{call.call_id}",
                            "x-request-id": f"req_demo{next(_ids)}"})

    async def hang_up(self, request: Request) -> Response:
        if not self.authorized(request):
            return openai_error(401, "Incorrect API key provided.", "invalid_api_key")
        call_id = request.path_params["call_id"]
        if not await self._close(call_id):
            return openai_error(404, "Call not found.")
        return JSONResponse({})

    async def client_secret(self, request: Request) -> Response:
        if not self.authorized(request):
            return openai_error(401, "Incorrect API key provided.", "invalid_api_key")
        try:
            body = await request.json()
            session = body["session"]
            seconds = int(body.get("expires_after", {}).get("seconds", 600))
        except (ValueError, KeyError, TypeError, AttributeError):
            return openai_error(400, "Expected a JSON body with a session.")
        return JSONResponse({"value": f"ek_demo_{secrets.token_hex(8)}",
                             "expires_at": int(time.time()) + seconds,
                             "session": {"object": "realtime.session",
                                         "id": f"sess_demo{next(_ids)}", **session}})

    async def not_found(self, request: Request) -> Response:
        return openai_error(404, "Not a route of the demo provider.")

    async def _close(self, call_id: str) -> bool:
        call = self.calls.pop(call_id, None)
        if call is None:
            return False
        for task in list(call.responses):
            task.cancel()
        await call.connection.close()
        return True

    async def close_all(self) -> None:
        for call_id in list(self.calls):
            await self._close(call_id)


def create_app(api_key: str) -> Starlette:
    fake = FakeRealtime(api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await fake.close_all()

    return Starlette(lifespan=lifespan, routes=[
        Route("/v1/realtime/calls", fake.create_call, methods=["POST"]),
        Route("/v1/realtime/calls/{call_id:str}/hangup", fake.hang_up, methods=["POST"]),
        Route("/v1/realtime/client_secrets", fake.client_secret, methods=["POST"]),
        Route("/{path:path}", fake.not_found, methods=["GET", "POST"]),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8765", help="host:port (loopback)")
    args = parser.parse_args()
    api_key = os.environ.get("DEMO_PROVIDER_KEY", "")
    if len(api_key) < 16:
        parser.error("set DEMO_PROVIDER_KEY (the key icegate's project holds, 16+ characters)")
    host, _, port = args.listen.rpartition(":")
    uvicorn.run(create_app(api_key), host=host, port=int(port), log_level="warning")


if __name__ == "__main__":
    main()
