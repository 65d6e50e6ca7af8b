"""CreateCall: icegate posts the browser's offer to the provider; the browser holds no token.

The fake OpenAI answers with a real aiortc peer, and the last test has aiortc, as the
browser, connect relay-only through a real coturn to that peer and hear the provider's first
event on the data channel.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcconfiguration import RTCIceTransportPolicy

import icegate
from fake_upstreams import AzureEmulation, FakeUpstream, OpenAIEmulation, openai_error
from fake_upstreams.openai import form_parts
from fake_upstreams.webrtc_peer import RealtimePeers
from harness.icegate_server import TEST_ADMIN_KEY, TEST_TURN_SECRET, RunningServer, ServerFactory
from icegate_server.clock import FrozenClock, SystemClock

OPENAI_KEY = "sk-test-SECRET-openai-key-1234"
AZURE_KEY = "azure-test-key-0123456789"
NOW = datetime(2026, 11, 10, 12, 0, tzinfo=timezone.utc).timestamp()
CALLS_PATH = "/v1/realtime/calls"
OFFER = ("v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
         "a=group:BUNDLE 0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
         "c=IN IP4 0.0.0.0\r\na=mid:0\r\na=sctp-port:5000\r\n")


@pytest.fixture
def openai():
    with FakeUpstream(OpenAIEmulation(OPENAI_KEY)) as fake:
        yield fake


@pytest.fixture
def server(server_factory: ServerFactory, store_url: str, openai) -> RunningServer:
    return server_factory(FrozenClock(NOW), store=store_url, openai_base_url=openai.base_url,
                          session_lease_seconds=600)


@pytest.fixture
def admin(server):
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        client.set_provider_key("default", "openai", OPENAI_KEY)
        yield client


def counts(admin: icegate.Client) -> tuple[int, int]:
    sessions = admin.get_usage().sessions
    return sessions.used_this_month, sessions.active


def test_a_call_posts_the_offer_and_the_session_with_the_real_key(server, admin, openai):
    started = admin.create_call(OFFER, "openai", voice="marin", instructions="Be brief.",
                                user_id="alice")
    (request,) = openai.requests_to(CALLS_PATH)
    assert request.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    parts = form_parts(request)
    assert parts is not None and parts["sdp"] == OFFER
    session = json.loads(parts["session"])
    assert session["instructions"] == "Be brief."
    assert session["audio"]["output"]["voice"] == "marin"

    assert started.sdp_answer.startswith("v=0")
    assert started.call_id.startswith("rtc_")
    assert started.session_id.startswith("ses_")
    assert started.lease_expire_time.seconds == int(NOW) + 600
    servers = icegate.rtc_ice_servers(started.ice_servers)
    assert servers[1]["username"] == f"{int(NOW) + 3600}:default/alice"
    assert OPENAI_KEY.encode() not in started.SerializeToString()
    assert counts(admin) == (1, 1)
    admin.end_session(started.session_id)
    assert counts(admin) == (1, 0)


def test_the_policy_binds_calls_too(server, admin, openai):
    admin.set_session_policy("default", "openai", {"instructions": "Only talk about tea.",
                                                   "caller_options": ["voice"]})
    with pytest.raises(icegate.SessionPolicyError) as caught:
        admin.create_call(OFFER, "openai", instructions="Talk about anything.")
    assert caught.value.field == "instructions"
    assert openai.requests_to(CALLS_PATH) == []
    admin.create_call(OFFER, "openai", voice="cedar")
    session = json.loads(form_parts(openai.requests_to(CALLS_PATH)[0])["session"])
    assert session["instructions"] == "Only talk about tea."


@pytest.mark.parametrize(("offer", "provider"), [
    ("", "openai"), ("hello", "openai"), ("v=0\r\nbad line\r\n", "openai"),
    ("v=0\r\na=x\x00y\r\n", "openai"), ("v=0\r\n" + "a=x\r\n" * 8000, "openai"),
    (OFFER, "gemini"), (OFFER, "openai_beta"), (OFFER, "orga"),
])
def test_a_bad_offer_or_provider_is_refused_before_anything_is_taken(
        server, admin, openai, offer, provider):
    with pytest.raises(icegate.InvalidArgumentError) as caught:
        admin.create_call(offer, provider)
    assert caught.value.field_violations[0].field in ("sdp_offer", "provider")
    assert openai.requests == []
    assert counts(admin) == (0, 0)


def test_a_refused_call_gives_back_its_lease_and_unit(server, admin, openai):
    openai.enqueue(openai_error(400, "Invalid SDP offer."))
    with pytest.raises(icegate.UpstreamRejectedError):
        admin.create_call(OFFER, "openai")
    assert counts(admin) == (0, 0)


def test_a_hostile_answer_never_reaches_the_caller(server, admin, openai):
    from fake_upstreams import CannedResponse

    for answer in (f"v=0\r\na=ice-pwd:{OPENAI_KEY}\r\n".encode(), b"<html>oops</html>",
                   b"v=0\r\na=fine\r\n\x1b[31m\r\n"):
        openai.enqueue(CannedResponse(201, raw_body=answer,
                                      headers={"Content-Type": "application/sdp"}))
        with pytest.raises(icegate.UpstreamUnavailableError) as caught:
            admin.create_call(OFFER, "openai")
        assert OPENAI_KEY not in str(caught.value)
    # A Location that holds the key, or no call id at all, leaves the call id empty.
    openai.enqueue(CannedResponse(201, raw_body=b"v=0\r\n", headers={
        "Content-Type": "application/sdp", "Location": f"/v1/realtime/calls/{OPENAI_KEY}"}))
    assert admin.create_call(OFFER, "openai").call_id == ""
    assert counts(admin) == (1, 1)


def test_azure_ga_takes_calls(server_factory: ServerFactory):
    with FakeUpstream(AzureEmulation(AZURE_KEY, frozenset({"rt"}))) as azure:
        server = server_factory(azure_base_url=azure.base_url)
        with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
            admin.set_provider_key("default", "azure", AZURE_KEY)
            started = admin.create_call(OFFER, "azure", model="rt")
        (request,) = azure.requests_to("/openai/v1/realtime/calls")
        assert request.headers["api-key"] == AZURE_KEY
        assert json.loads(form_parts(request)["session"])["model"] == "rt"
        assert started.call_id.startswith("rtc_")


def test_the_cli_starts_a_call_from_an_sdp_file(server, admin, tmp_path):
    offer = tmp_path / "offer.sdp"
    offer.write_text(OFFER)
    icegate_cli = str(Path(sys.executable).parent / "icegate")
    env = {"ICEGATE_TARGET": server.target, "ICEGATE_API_KEY": TEST_ADMIN_KEY,
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([icegate_cli, "session", "call", "--provider", "openai",
                           "--sdp-file", str(offer)], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["browser"]["answer"]["sdp"].startswith("v=0")
    assert answer["call_id"].startswith("rtc_")


@pytest.mark.coturn
def test_a_relay_only_browser_hears_the_providers_first_event(server_factory, coturn_factory):
    coturn = coturn_factory([TEST_TURN_SECRET])
    with RealtimePeers() as peers, \
            FakeUpstream(OpenAIEmulation(OPENAI_KEY, peers)) as openai:
        # coturn checks the credential's expiry against the real time.
        server = server_factory(SystemClock(), openai_base_url=openai.base_url,
                                turn_uris=(coturn.turn_uri,))
        with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
            admin.set_provider_key("default", "openai", OPENAI_KEY)
            admin.set_session_policy("default", "openai", {"instructions": "Speak French.",
                                                           "caller_options": ["voice"]})
            ice = admin.get_ice_servers("browser")
            event, candidates = asyncio.run(browser_call(admin, ice.ice_servers))
    assert candidates and all(" typ relay" in line for line in candidates)
    assert event["type"] == "session.created"
    assert event["session"]["instructions"] == "Speak French."  # the policy's, via icegate
    assert event["session"]["audio"]["output"]["voice"] == "cedar"


async def browser_call(admin: icegate.Client, ice_servers) -> tuple[dict, list[str]]:
    """aiortc as the browser: relay only, a data channel, the offer through icegate."""
    turn = [RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
            for s in ice_servers if s.username]
    browser = RTCPeerConnection(RTCConfiguration(
        iceServers=turn, iceTransportPolicy=RTCIceTransportPolicy.RELAY))
    first_event: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
    channel = browser.createDataChannel("oai-events")

    @channel.on("message")
    def on_message(message: str) -> None:
        if not first_event.done():
            first_event.set_result(json.loads(message))

    try:
        await browser.setLocalDescription(await browser.createOffer())
        offer = browser.localDescription.sdp
        candidates = [line for line in offer.splitlines() if line.startswith("a=candidate")]
        started = await asyncio.to_thread(admin.create_call, offer, "openai", voice="cedar")
        await browser.setRemoteDescription(RTCSessionDescription(started.sdp_answer, "answer"))
        return await asyncio.wait_for(first_event, 30), candidates
    finally:
        await browser.close()
