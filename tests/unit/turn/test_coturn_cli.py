"""coturn's admin CLI dialogue, against a scripted stand-in speaking coturn 4.6.1's bytes (and
worse): listings parsed whole and checked against coturn's total, a wrong password or a
stranger refused, sessions cancelled one command at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from icegate_server.turn.coturn_cli import (
    CliSession,
    CoturnCli,
    CoturnCliError,
    parse_listing,
)

GREETING = b"TURN Server\r\nCoturn-4.6.1 'Gorst'\r\n\r\nType '?' for help\r\nEnter password: \r\n"
PASSWORD = "cli-password-0123"


def session_block(number: int, session_id: str, username: str) -> bytes:
    return (f"\r\n    {number}) id={session_id}, user <{username}>:\r\n"
            "      realm: icegate.test\r\n      started 5 secs ago\r\n"
            "      expiring in 595 secs\r\n      client protocol UDP, relay protocol UDP\r\n"
            "      usage: rp=7, rb=808, sp=6, sb=536\r\n"
            "       rate: r=0, s=0, total=0 (bytes per sec)\r\n").encode()


def listing(*sessions: tuple[str, str], total: int | None = None) -> bytes:
    body = b"".join(session_block(n + 1, i, u) for n, (i, u) in enumerate(sessions))
    count = len(sessions) if total is None else total
    return body + f"\r\n  Total sessions: {count}\r\n\r\n".encode() + b"> "


def test_a_listing_as_coturn_writes_it() -> None:
    parsed = parse_listing(listing(("001000000000000004", "1796558974:acme/bob"),
                                   ("000000000000000003", "1796558974:acme/b b>:")))
    assert parsed.complete
    assert parsed.sessions == (CliSession("001000000000000004", "1796558974:acme/bob"),
                               CliSession("000000000000000003", "1796558974:acme/b b>:"))


def test_an_empty_listing() -> None:
    assert parse_listing(b"\r\n  Total sessions: 0\r\n\r\n> ").sessions == ()


def test_a_listing_cut_short_by_coturn_is_incomplete() -> None:
    cut = listing(("1", "1:acme/a"), total=300).replace(
        b"\r\n  Total", b"\r\n    ...\r\n\r\n  Total")
    parsed = parse_listing(cut)
    assert not parsed.complete and len(parsed.sessions) == 1


@pytest.mark.parametrize("answer", [
    b"> ",                                                    # no total at all
    listing(("1", "1:acme/a"), total=2),                      # one session missing
    listing(("1", "1:acme/a"), ("2", "1:acme/b"), total=1),   # one session too many
    b"\r\n  Total sessions: many\r\n\r\n> ",
])
def test_listings_that_do_not_add_up_are_refused(answer: bytes) -> None:
    with pytest.raises(CoturnCliError):
        parse_listing(answer)


class StandIn:
    """A TCP server that answers as coturn's CLI would (or as a test makes it misbehave)."""

    def __init__(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                          Awaitable[None]]) -> None:
        self._handler = handler
        self.lines: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handler, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def coturn_like(sessions: dict[str, str], lines: list[bytes]) -> Callable[..., Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(GREETING)
        authenticated = False
        while line := await reader.readline():
            lines.append(line)
            command = line.strip().decode()
            if not authenticated:
                if command == PASSWORD:
                    authenticated = True
                    writer.write(b"> ")
                else:
                    writer.write(b"Enter password: \r\n")
            elif command.startswith("psp "):
                text = command[4:]
                writer.write(listing(*((i, u) for i, u in sessions.items() if text in u)))
            elif command.startswith("cs "):
                sessions.pop(command[3:], None)
                writer.write(b"> ")
            elif command == "quit":
                break
            await writer.drain()
        writer.close()

    return handle


def test_end_sessions_cancels_what_matches_and_counts_what_went() -> None:
    sessions = {"000000000000000001": "1:acme/alice", "000000000000000002": "1:acme/alice",
                "000000000000000003": "1:acme/bob", "000000000000000004": "1:other/alice"}
    lines: list[bytes] = []

    async def scenario() -> int:
        async with StandIn(coturn_like(sessions, lines)) as address:
            cli = CoturnCli(address, PASSWORD, timeout=2)
            return await cli.end_sessions(lambda u: u == "1:acme/alice", contains=":acme/")

    assert asyncio.run(scenario()) == 2
    assert sessions == {"000000000000000003": "1:acme/bob",
                        "000000000000000004": "1:other/alice"}
    assert b"psp :acme/\r\n" in lines and b"cs 000000000000000001\r\n" in lines
    assert PASSWORD.encode() + b"\r\n" == lines[0]


def test_a_wrong_password_is_refused_without_echoing_it() -> None:
    async def scenario() -> None:
        async with StandIn(coturn_like({}, [])) as address:
            await CoturnCli(address, "not-the-password", timeout=2).sessions()

    with pytest.raises(CoturnCliError, match="refused the password") as refused:
        asyncio.run(scenario())
    assert "not-the-password" not in str(refused.value)


@pytest.mark.parametrize("behaviour", ["silent", "hangs-up", "babbles"])
def test_a_peer_that_is_not_coturn_is_refused(behaviour: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if behaviour == "babbles":
            writer.write(b"x" * 70000)
            await writer.drain()
        if behaviour != "hangs-up":
            await asyncio.sleep(3)
        writer.close()

    async def scenario() -> None:
        async with StandIn(handle) as address:
            await CoturnCli(address, PASSWORD, timeout=0.5).sessions()

    with pytest.raises(CoturnCliError):
        asyncio.run(scenario())


def test_nothing_listening_is_refused() -> None:
    from harness.ports import free_tcp_port

    with pytest.raises(CoturnCliError, match="cannot be reached"):
        asyncio.run(CoturnCli(f"127.0.0.1:{free_tcp_port()}", PASSWORD, timeout=1).sessions())


def test_a_match_that_would_break_the_command_line_is_refused() -> None:
    async def scenario() -> None:
        await CoturnCli("127.0.0.1:1", PASSWORD).sessions("acme\r\ncs 1")

    with pytest.raises(ValueError):
        asyncio.run(scenario())


def test_its_repr_hides_the_password() -> None:
    assert PASSWORD not in repr(CoturnCli("127.0.0.1:5766", PASSWORD))
