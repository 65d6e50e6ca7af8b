"""The provider's side of a realtime call: a real WebRTC peer (aiortc) answering SDP offers.

OpenAI's calls endpoint answers a browser's offer with its own peer's SDP answer; the browser
then connects to that peer and, on its `oai-events` data channel, receives the session's
first event (`session.created`). `RealtimePeers` does the same on a loop of its own, so the
HTTP fakes (threads) can answer offers synchronously. Its peers gather host candidates on
127.0.0.1 only: a test's traffic never leaves loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aioice.ice
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription

_ids = itertools.count(1)


def _loopback_only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"] if use_ipv4 else []


@dataclass
class CallPeer:
    """One answered call: its peer connection, the session it was given, its events."""

    call_id: str
    session: dict[str, Any]
    connection: RTCPeerConnection
    channel: RTCDataChannel | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    hung_up: bool = False
    sidebands: list[Any] = field(default_factory=list)
    """The sideband sockets of the call (each with `send(text)` and `close()`)."""


class RealtimePeers:
    """Answers offers with aiortc peers; use as a context manager (stops its loop and peers)."""

    def __init__(self) -> None:
        self.calls: dict[str, CallPeer] = {}
        self.on_event: Callable[[CallPeer, dict[str, Any]], None] | None = None
        """Called (on the peers' loop) with every event a browser sends on a data channel."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fake-realtime-peers")
        self._original_hosts = aioice.ice.get_host_addresses

    def __enter__(self) -> RealtimePeers:
        # Host candidates on loopback only (aioice leaves 127.0.0.1 out by default, and would
        # offer the machine's other addresses instead).
        aioice.ice.get_host_addresses = _loopback_only
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self._run(self._close_all(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        aioice.ice.get_host_addresses = self._original_hosts

    def _run(self, coroutine: Any, timeout: float = 20) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def answer(self, offer: str, session: dict[str, Any]) -> tuple[str, str]:
        """The SDP answer to `offer` and the new call's id."""
        result: tuple[str, str] = self._run(self._answer(offer, session))
        return result

    def send(self, call_id: str, event: dict[str, Any]) -> None:
        """Sends `event` to the browser of a call (as the provider would)."""
        self._loop.call_soon_threadsafe(self._send, call_id, event)

    def hang_up(self, call_id: str) -> bool:
        """Ends a call; False when there is none of that id."""
        result: bool = self._run(self._hang_up(call_id))
        return result

    def _send(self, call_id: str, event: dict[str, Any]) -> None:
        peer = self.calls.get(call_id)
        if peer is not None and peer.channel is not None and peer.channel.readyState == "open":
            peer.channel.send(json.dumps(event))

    async def _answer(self, offer: str, session: dict[str, Any]) -> tuple[str, str]:
        call_id = f"rtc_fake{next(_ids)}"
        connection = RTCPeerConnection()
        peer = CallPeer(call_id, session, connection)
        self.calls[call_id] = peer

        @connection.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            peer.channel = channel
            # The provider speaks first: the session as it starts.
            channel.send(json.dumps({"type": "session.created", "event_id": f"event_{call_id}",
                                     "session": {"id": f"sess_{call_id}", **session}}))

            @channel.on("message")
            def on_message(message: str | bytes) -> None:
                event = json.loads(message)
                peer.received.append(event)
                if self.on_event is not None:
                    self.on_event(peer, event)
                if event.get("type") == "session.update":
                    self._apply_update(peer, event.get("session") or {})

        await connection.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await connection.setLocalDescription(await connection.createAnswer())
        return connection.localDescription.sdp, call_id

    def update(self, call_id: str, patch: dict[str, Any]) -> None:
        """Applies a `session.update` from the call's sideband (any thread)."""
        peer = self.calls.get(call_id)
        if peer is not None:
            self._loop.call_soon_threadsafe(self._apply_update, peer, patch)

    def attach_sideband(self, call_id: str, sideband: Any) -> bool:
        """Adds a sideband socket to a live call; False when there is no such call."""
        peer = self.calls.get(call_id)
        if peer is None or peer.hung_up:
            return False
        peer.sidebands.append(sideband)
        return True

    def _apply_update(self, peer: CallPeer, patch: dict[str, Any]) -> None:
        """What the provider does with a `session.update`, from the browser or a sideband:
        the fields change, and every listener hears `session.updated`."""
        for key, value in patch.items():
            if key == "audio" and isinstance(value, dict):
                audio = peer.session.setdefault("audio", {})
                for side, fields in value.items():
                    audio.setdefault(side, {}).update(fields)
            elif key != "type":
                peer.session[key] = value
        event = json.dumps({"type": "session.updated", "event_id": f"event_{next(_ids)}",
                            "session": {"id": f"sess_{peer.call_id}", **peer.session}})
        if peer.channel is not None and peer.channel.readyState == "open":
            peer.channel.send(event)
        for sideband in list(peer.sidebands):
            sideband.send(event)

    async def _hang_up(self, call_id: str) -> bool:
        peer = self.calls.get(call_id)
        if peer is None or peer.hung_up:
            return False
        peer.hung_up = True
        for sideband in peer.sidebands:
            sideband.close()
        await peer.connection.close()
        return True

    async def _close_all(self) -> None:
        for peer in self.calls.values():
            await peer.connection.close()
