"""RTCIceServer lists: STUN entries without credentials, then TURN/TURNS with one credential."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from icegate_server.turn.credentials import TurnCredential


@dataclass(frozen=True)
class IceServer:
    """One W3C `RTCIceServer`: URIs, and for TURN the username and credential."""

    urls: tuple[str, ...]
    username: str = ""
    credential: str = ""

    def __repr__(self) -> str:
        hidden = "<hidden>" if self.credential else "''"
        return f"IceServer(urls={self.urls!r}, username={self.username!r}, credential={hidden})"


def build_ice_servers(
    stun_uris: Sequence[str], credential: TurnCredential | None
) -> list[IceServer]:
    """The list a browser passes to `new RTCPeerConnection({iceServers})`.

    STUN comes first: it costs the relay nothing, and browsers gather from every entry anyway.
    """
    servers = []
    if stun_uris:
        servers.append(IceServer(urls=tuple(stun_uris)))
    if credential is not None and credential.uris:
        servers.append(IceServer(urls=credential.uris, username=credential.username,
                                 credential=credential.password))
    return servers
