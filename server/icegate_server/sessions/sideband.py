"""The sideband of a call: icegate's own WebSocket to a running OpenAI call, holding it to
its policy.

A browser that holds a call's data channel can send `session.update` and change what the
project's policy fixed (openai-realtime-api-beta #115). With a policy in enforce mode,
icegate opens the call's sideband (`wss://.../v1/realtime?call_id=...`, the project's key),
reads the call's events, and when a `session.updated` (or `session.created`) shows a locked
field changed, it sends its own `session.update` with the policy's values, or hangs the call
up and ends its session, as the policy says. One task per call, on the replica that created
the call; it stops when the call is hung up, when the provider closes the socket, and at
shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import websockets
from websockets.asyncio.client import connect

from icegate_server.observability.logs import Safe

logger = logging.getLogger(__name__)

MAX_EVENT_BYTES = 256 * 1024
"""A sideband event larger than this closes the socket (a session fits many times over)."""
MAX_RESTORES = 20
"""A browser that changes the locked fields this many times is hung up, whatever the mode:
it is fighting the policy, and each restore costs the project a round of provider work."""
OPEN_TIMEOUT_SECONDS = 10.0
CLOSE_TIMEOUT_SECONDS = 2.0
"""How long stopping a watcher (EndSession) waits for the provider to close the socket."""


@dataclass(frozen=True)
class LockedSession:
    """What a call's policy fixed, as the GA session spells it.

    Attributes:
        instructions: The instructions sent, or None when the policy did not fix them.
        tool_names: The names of the tools sent (compared by name: a provider may add
            defaults to a tool), or None when the policy did not fix tools.
        tools: The tools sent, to restore them.
        voice: The voice sent, or None when the policy did not restrict voices.
    """

    instructions: str | None = None
    tool_names: tuple[str, ...] | None = None
    tools: tuple[Mapping[str, Any], ...] = ()
    voice: str | None = None

    def drifted(self, session: Mapping[str, Any]) -> list[str]:
        """The locked fields `session` (a `session.updated` event's) no longer holds."""
        drift = []
        if self.instructions is not None and session.get("instructions") != self.instructions:
            drift.append("instructions")
        if self.tool_names is not None:
            tools = session.get("tools")
            names = tuple(tool.get("name") for tool in tools if isinstance(tool, dict)) \
                if isinstance(tools, list) else None
            if names != self.tool_names:
                drift.append("tools")
        if self.voice is not None:
            audio = session.get("audio")
            output = audio.get("output") if isinstance(audio, dict) else None
            voice = output.get("voice") if isinstance(output, dict) else None
            if voice != self.voice:
                drift.append("voice")
        return drift

    def restoring_update(self) -> dict[str, Any]:
        """The `session.update` that puts every locked field back."""
        session: dict[str, Any] = {"type": "realtime"}
        if self.instructions is not None:
            session["instructions"] = self.instructions
        if self.tool_names is not None:
            session["tools"] = [dict(tool) for tool in self.tools]
        if self.voice is not None:
            session["audio"] = {"output": {"voice": self.voice}}
        return {"type": "session.update", "session": session}

    @property
    def empty(self) -> bool:
        return self.instructions is None and self.tool_names is None and self.voice is None


HangUp = Callable[[], Awaitable[None]]


class Sidebands:
    """The sideband watchers of this process's calls, by session id."""

    def __init__(self) -> None:
        self._watching: dict[str, asyncio.Task[None]] = {}

    def watch(self, session_id: str, call_id: str, url: str, headers: Mapping[str, str],
              locked: LockedSession, *, restore: bool, hang_up: HangUp) -> None:
        """Starts watching a call (in the background; nothing to await).

        Args:
            url: The call's sideband URL; `headers` carry the project's key.
            restore: Put drifted fields back (True) or hang up (False).
            hang_up: Hangs the call up and ends its session.
        """
        task = asyncio.ensure_future(self._watch(session_id, call_id, url, dict(headers),
                                                 locked, restore, hang_up))
        self._watching[session_id] = task
        task.add_done_callback(lambda _: self._forget(session_id, task))

    def _forget(self, session_id: str, task: asyncio.Task[None]) -> None:
        if self._watching.get(session_id) is task:
            del self._watching[session_id]

    @property
    def watching(self) -> frozenset[str]:
        """The sessions watched now."""
        return frozenset(self._watching)

    async def stop(self, session_id: str) -> None:
        """Stops watching a session's call (its call is being hung up)."""
        task = self._watching.pop(session_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self) -> None:
        """Stops every watcher (at shutdown)."""
        for session_id in list(self._watching):
            await self.stop(session_id)

    async def _watch(self, session_id: str, call_id: str, url: str, headers: dict[str, str],
                     locked: LockedSession, restore: bool, hang_up: HangUp) -> None:
        restores = 0
        try:
            async with connect(url, additional_headers=headers, max_size=MAX_EVENT_BYTES,
                               open_timeout=OPEN_TIMEOUT_SECONDS,
                               close_timeout=CLOSE_TIMEOUT_SECONDS) as socket:
                async for message in socket:
                    event = _event(message)
                    if event.get("type") not in ("session.created", "session.updated"):
                        continue
                    session = event.get("session")
                    drift = locked.drifted(session if isinstance(session, dict) else {})
                    if not drift:
                        continue
                    logger.warning("call %s of session %s changed %s against its policy",
                                   Safe(call_id), Safe(session_id), Safe(", ".join(drift)))
                    restores += 1
                    if not restore or restores > MAX_RESTORES:
                        await hang_up()
                        return
                    await socket.send(json.dumps(locked.restoring_update()))
        except (OSError, asyncio.TimeoutError, websockets.WebSocketException) as error:
            # The key never reaches the log: only the failure's kind.
            logger.warning("sideband of call %s (session %s) closed: %s", Safe(call_id),
                           Safe(session_id), Safe(type(error).__name__))


def _event(message: str | bytes) -> dict[str, Any]:
    try:
        event = json.loads(message)
    except ValueError:
        return {}
    return event if isinstance(event, dict) else {}
