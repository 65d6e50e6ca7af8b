"""coturn's admin CLI (telnet, `cli-ip`/`cli-port`/`cli-password`), as icegate uses it: list
sessions (`ps`, `psp`) and cancel them (`cs`).

The dialogue of coturn 4.6.1 (`src/apps/relay/turn_admin_server.c`, seen here):

    <- "TURN Server\\r\\nCoturn-4.6.1 'Gorst'\\r\\n\\r\\nType '?' for help\\r\\n"
       "Enter password: \\r\\n"
    -> "<password>\\r\\n"
    <- "> "                                   (a wrong password: "Enter password: " again, and
                                               after five tries coturn hangs up)
    -> "psp :acme/\\r\\n"                      (sessions whose username contains the text)
    <- "\\r\\n    1) id=001000000000000001, user <1796558825:acme/alice>:\\r\\n
        realm: ...\\r\\n ... usage: rp=3, rb=316, sp=2, sb=228\\r\\n ...
        \\r\\n  Total sessions: 1\\r\\n\\r\\n> "
    -> "cs 001000000000000001\\r\\n"           (cancel; coturn ends it on its relay thread)
    <- "> "

coturn reads each TCP segment as one command line, so a command is sent only once the
previous one was answered. A listing stops at `cli-max-output-sessions` (256 unless set) and
then says so ("..." and a warning): `CliListing.complete` is False. Everything coturn writes
is read as hostile: bounded in size and time, the session lines matched whole, and the count
checked against coturn's own total.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from icegate_server.settings import parse_listen_address

MAX_OUTPUT_BYTES = 32 * 1024 * 1024
"""The most a listing may hold (about 100 000 sessions of coturn's ~300-byte blocks)."""
PROMPT = b"> "
_PASSWORD_PROMPT = b"Enter password:"
_SESSION = re.compile(r" {1,8}[0-9]{1,9}\) id=(?P<id>[0-9]{1,20}), user <(?P<user>.*)>:")
_TOTAL = re.compile(r"  Total sessions(?: for [^:]*)?: (?P<total>[0-9]{1,12})")
CANCEL_ROUNDS = 3
"""Listings a `end_sessions` makes at most after cancelling (sessions a listing cut short
are cancelled in the next round)."""
CANCEL_SETTLE_SECONDS = 0.05
"""How long coturn's relay threads get to end cancelled sessions before they are listed
again."""


class CoturnCliError(Exception):
    """coturn's CLI could not be used: unreachable, silent, a wrong password, or an answer
    that is not what coturn writes. The message never holds the password."""


@dataclass(frozen=True)
class CliSession:
    """One session (allocation) as coturn's CLI lists it."""

    session_id: str
    """coturn's id, 18 decimal digits (the `<id>` of its stats channels)."""
    username: str


@dataclass(frozen=True)
class CliListing:
    """The sessions a listing showed; `complete` is False when coturn cut it short."""

    sessions: tuple[CliSession, ...]
    complete: bool


class CoturnCli:
    """Talks to one coturn's admin CLI, a connection per operation.

    Args:
        address: `host:port` of the CLI (`ICEGATE_COTURN_CLI`).
        password: coturn's `cli-password` (`ICEGATE_COTURN_CLI_PASSWORD`).
        timeout: Seconds any one step (connecting, one answer) may take.
    """

    def __init__(self, address: str, password: str, *, timeout: float = 5.0) -> None:
        self._host, self._port = parse_listen_address(address)
        self._host = self._host.strip("[]")
        self._password = password
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"CoturnCli({self._host}:{self._port}, password=<hidden>)"

    async def sessions(self, contains: str = "") -> CliListing:
        """The sessions whose username contains `contains` (all when empty).

        Raises:
            CoturnCliError: The CLI could not be used.
            ValueError: `contains` is not printable (it would break the command line).
        """
        listing_command = _listing_command(contains)
        async with self._session() as command:
            return _parse_listing(await command(listing_command))

    async def end_sessions(self, matches: Callable[[str], bool], contains: str = "") -> int:
        """Cancels every session whose username `matches`, among those containing
        `contains`, and returns how many coturn no longer lists afterwards.

        Raises:
            CoturnCliError: The CLI could not be used (some sessions may have ended).
        """
        ended: set[str] = set()
        listing_command = _listing_command(contains)
        async with self._session() as command:
            listed = _parse_listing(await command(listing_command))
            for _ in range(CANCEL_ROUNDS):
                targets = [s.session_id for s in listed.sessions if matches(s.username)]
                if not targets:
                    break
                for session_id in targets:
                    await command(f"cs {session_id}")
                await asyncio.sleep(CANCEL_SETTLE_SECONDS)
                after = _parse_listing(await command(listing_command))
                still = {s.session_id for s in after.sessions}
                ended.update(session_id for session_id in targets if session_id not in still)
                listed = after
        return len(ended)

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[Callable[[str], Awaitable[bytes]]]:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port), self._timeout)
        except (OSError, asyncio.TimeoutError) as error:
            raise CoturnCliError(f"coturn's CLI at {self._host}:{self._port} cannot be "
                                 f"reached ({type(error).__name__})") from None
        try:
            greeting = await self._read_until(reader, _PASSWORD_PROMPT)
            if _PASSWORD_PROMPT not in greeting:
                raise CoturnCliError("coturn's CLI did not ask for its password")
            writer.write(self._password.encode() + b"\r\n")
            answer = await self._read_prompt(reader, allow_password_prompt=True)
            if answer.rstrip().endswith(_PASSWORD_PROMPT):
                raise CoturnCliError("coturn's CLI refused the password "
                                     "(ICEGATE_COTURN_CLI_PASSWORD)")

            async def command(line: str) -> bytes:
                writer.write(line.encode() + b"\r\n")
                return await self._read_prompt(reader)

            yield command
            with contextlib.suppress(OSError):
                writer.write(b"quit\r\n")
        except (OSError, asyncio.IncompleteReadError) as error:
            raise CoturnCliError(f"coturn's CLI connection failed ({type(error).__name__})"
                                 ) from None
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), self._timeout)

    async def _read_until(self, reader: asyncio.StreamReader, marker: bytes) -> bytes:
        data = b""
        while marker not in data:
            data += await self._read_some(reader, len(data))
        return data

    async def _read_prompt(self, reader: asyncio.StreamReader, *,
                           allow_password_prompt: bool = False) -> bytes:
        data = b""
        while not data.endswith(PROMPT):
            if allow_password_prompt and data.rstrip().endswith(_PASSWORD_PROMPT):
                return data
            data += await self._read_some(reader, len(data))
        return data

    async def _read_some(self, reader: asyncio.StreamReader, have: int) -> bytes:
        if have > MAX_OUTPUT_BYTES:
            raise CoturnCliError("coturn's CLI answer is too long")
        try:
            chunk = await asyncio.wait_for(reader.read(65536), self._timeout)
        except asyncio.TimeoutError:
            raise CoturnCliError("coturn's CLI did not answer in time") from None
        if not chunk:
            raise CoturnCliError("coturn's CLI closed the connection")
        return chunk


def _listing_command(contains: str) -> str:
    # coturn takes the rest of the line as the text; a line break would start a command.
    if not contains:
        return "ps"
    if not contains.isprintable() or "\n" in contains or "\r" in contains:
        raise ValueError("a CLI match must be printable")
    return f"psp {contains}"


def _parse_listing(output: bytes) -> CliListing:
    """The sessions of a `ps`/`psp` answer, checked against coturn's own total."""
    text = output.decode("utf-8", errors="replace")
    sessions: list[CliSession] = []
    total: int | None = None
    truncated = False
    for line in text.split("\r\n"):
        session = _SESSION.fullmatch(line)
        if session is not None:
            sessions.append(CliSession(session["id"].zfill(18), session["user"]))
            continue
        counted = _TOTAL.fullmatch(line)
        if counted is not None:
            total = int(counted["total"])
        elif line.strip() == "..." or "too many output sessions" in line:
            truncated = True
    if total is None:
        raise CoturnCliError("coturn's CLI answered a listing without its total")
    if len(sessions) > total or (len(sessions) < total and not truncated):
        raise CoturnCliError(f"coturn's CLI listed {len(sessions)} sessions but counted "
                             f"{total}")
    return CliListing(tuple(sessions), complete=len(sessions) == total)


def parse_listing(output: bytes) -> CliListing:
    """`_parse_listing`, for tests and tools that hold a captured answer."""
    return _parse_listing(output)


__all__: Sequence[str] = ("CliListing", "CliSession", "CoturnCli", "CoturnCliError",
                          "parse_listing")
