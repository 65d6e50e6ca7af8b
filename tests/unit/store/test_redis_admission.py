"""The admissions' own Redis connection (store/redis_admission.py), on a fake transport.

What each caller of a batch gets back when replies come whole, in pieces, unasked for, or not
at all; and that the hand-packed `_ADMIT` arguments are what hiredis would have packed.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import hiredis
import pytest
import redis.exceptions

from icegate_server.store.redis import _admit_args, _admit_argv
from icegate_server.store.redis_admission import AdmissionConnection

Item = tuple[bytes, "asyncio.Future[Any]"]


class FakeTransport(asyncio.Transport):
    """Records what is written; `set_protocol` is how the connection takes it over."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.protocol: asyncio.Protocol | None = None
        self.aborted = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self.protocol = protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


class FakeRedisConnection:
    """What `AdmissionConnection` uses of a connected redis-py connection."""

    def __init__(self) -> None:
        self._writer = type("Writer", (), {"transport": FakeTransport()})()
        self.disconnected = False

    @property
    def transport(self) -> FakeTransport:
        transport: FakeTransport = self._writer.transport
        return transport

    async def disconnect(self, nowait: bool = False) -> None:
        self.disconnected = True


class Harness:
    """An `AdmissionConnection` whose items are (command, future); answers are the replies."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.connections: list[FakeRedisConnection] = []

        async def connect() -> Any:
            self.connections.append(FakeRedisConnection())
            return self.connections[-1]

        def answer(item: Item, reply: Any) -> None:
            item[1].set_result(reply)

        def fail(item: Item, error: BaseException) -> None:
            item[1].set_exception(error)

        self.admissions: AdmissionConnection[Item] = AdmissionConnection(
            connect, timeout=timeout, pack=lambda batch: b"".join(c for c, _ in batch),
            answer=answer, fail=fail)

    def submit(self, command: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.admissions.submit((command, future))
        return future

    @property
    def transport(self) -> FakeTransport:
        return self.connections[-1].transport

    def reply(self, data: bytes) -> None:
        protocol = self.transport.protocol
        assert protocol is not None
        protocol.data_received(data)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


REPLIES = [b"*2\r\n" + bulk(b"1700000000000") + bulk(b"admitted"),
           b"-NOSCRIPT No matching script\r\n",
           b"*3\r\n" + bulk(b"1700000000001") + bulk(b"unknown_key") + b"$-1\r\n"]


def test_replies_split_at_every_byte_answer_each_caller_in_order() -> None:
    async def scenario() -> list[Any]:
        harness = Harness()
        futures = [harness.submit(b"A"), harness.submit(b"B"), harness.submit(b"C")]
        await settle()
        assert harness.transport.written == [b"ABC"]  # one batch, one write
        for byte in b"".join(REPLIES):
            harness.reply(bytes([byte]))
        return [await f if i != 1 else (await asyncio.gather(f, return_exceptions=True))[0]
                for i, f in enumerate(futures)]

    first, noscript, third = asyncio.run(scenario())
    assert first == [b"1700000000000", b"admitted"]
    assert isinstance(noscript, hiredis.ReplyError)
    assert str(noscript).startswith("NOSCRIPT")
    assert third == [b"1700000000001", b"unknown_key", None]


def test_calls_that_arrive_while_a_batch_is_out_go_together_once_it_is_answered() -> None:
    async def scenario() -> tuple[list[bytes], list[Any]]:
        harness = Harness()
        first = harness.submit(b"A")
        await settle()
        later = [harness.submit(b"B"), harness.submit(b"C")]
        await settle()
        assert harness.transport.written == [b"A"]  # B and C wait for A's reply
        harness.reply(REPLIES[0])
        await settle()
        harness.reply(REPLIES[0] + REPLIES[2])
        return harness.transport.written, [await first, *[await f for f in later]]

    written, replies = asyncio.run(scenario())
    assert written == [b"A", b"BC"]
    assert [reply[1] for reply in replies] == [b"admitted", b"admitted", b"unknown_key"]


def test_a_reply_nobody_asked_for_drops_the_connection() -> None:
    async def scenario() -> tuple[list[Any], bool, int, Any]:
        harness = Harness()
        futures = [harness.submit(b"A"), harness.submit(b"B")]
        await settle()
        harness.reply(REPLIES[0] * 3)  # one more than the batch has callers
        answered = [await f for f in futures]
        dropped = harness.transport.aborted
        after = harness.submit(b"C")  # the stream is off: C goes out on a new connection
        await settle()
        harness.reply(REPLIES[2])
        return answered, dropped, len(harness.connections), await after

    answered, dropped, connections, after = asyncio.run(scenario())
    assert [reply[1] for reply in answered] == [b"admitted", b"admitted"]
    assert dropped
    assert connections == 2
    assert after[1] == b"unknown_key"


def test_a_reply_that_does_not_parse_fails_the_batch() -> None:
    async def scenario() -> list[Any]:
        harness = Harness()
        futures = [harness.submit(b"A"), harness.submit(b"B")]
        await settle()
        harness.reply(b"!not resp\r\n")
        return await asyncio.gather(*futures, return_exceptions=True)

    for outcome in asyncio.run(scenario()):
        assert isinstance(outcome, redis.exceptions.ConnectionError)
        assert "Protocol error" in str(outcome)


def test_an_unanswered_batch_times_out_and_the_next_goes_out_on_a_new_connection() -> None:
    async def scenario() -> tuple[list[Any], int, Any]:
        harness = Harness(timeout=0.05)
        futures = [harness.submit(b"A"), harness.submit(b"B")]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        after = harness.submit(b"C")
        await settle()
        harness.reply(REPLIES[0])
        return outcomes, len(harness.connections), await after

    outcomes, connections, after = asyncio.run(scenario())
    for outcome in outcomes:
        assert isinstance(outcome, redis.exceptions.TimeoutError)
    assert connections == 2
    assert after[1] == b"admitted"


def test_a_lost_connection_fails_only_the_batch_on_the_wire() -> None:
    async def scenario() -> tuple[Any, Any]:
        harness = Harness()
        on_wire = harness.submit(b"A")
        await settle()
        waiting = harness.submit(b"B")
        protocol = harness.transport.protocol
        assert protocol is not None
        protocol.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
        lost = (await asyncio.gather(on_wire, return_exceptions=True))[0]
        await settle()
        harness.reply(REPLIES[0])
        return lost, await waiting

    lost, waiting = asyncio.run(scenario())
    assert isinstance(lost, redis.exceptions.ConnectionError)
    assert "reset" in str(lost)
    assert waiting[1] == b"admitted"


def test_a_connection_that_cannot_be_opened_fails_its_batch() -> None:
    async def scenario() -> Any:
        async def refuse() -> Any:
            raise redis.exceptions.ConnectionError("Error 111 connecting: refused")

        failed: list[BaseException] = []
        admissions: AdmissionConnection[Item] = AdmissionConnection(
            refuse, timeout=1.0, pack=lambda batch: b"",
            answer=lambda item, reply: None,
            fail=lambda item, error: failed.append(error))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        admissions.submit((b"A", future))
        await settle()
        await admissions.close()
        return failed

    [error] = asyncio.run(scenario())
    assert isinstance(error, redis.exceptions.ConnectionError)


def test_close_waits_for_the_batch_on_the_wire_then_refuses_new_calls() -> None:
    async def scenario() -> tuple[Any, Any, bool]:
        harness = Harness()
        on_wire = harness.submit(b"A")
        await settle()
        closing = asyncio.ensure_future(harness.admissions.close())
        await settle()
        assert not closing.done()
        harness.reply(REPLIES[0])
        await closing
        late = harness.submit(b"B")
        return await on_wire, (await asyncio.gather(late, return_exceptions=True))[0], \
            harness.connections[-1].disconnected

    answered, refused, disconnected = asyncio.run(scenario())
    assert answered[1] == b"admitted"
    assert isinstance(refused, redis.exceptions.ConnectionError)
    assert disconnected


@pytest.mark.parametrize(("digest", "project_id", "now_ms", "count"), [
    (hashlib.sha256(b"key").digest(), "", 1_700_000_000_000, True),
    (None, "alpha", 0, False),
    (None, "", 5, True),
    (None, "proj-\u00e9\u4e2d", 123, False),  # lengths in bytes, not characters
])
def test_hand_packed_admit_arguments_are_what_hiredis_packs(
        digest: bytes | None, project_id: str, now_ms: int, count: bool) -> None:
    packed = hiredis.pack_command(tuple(_admit_args(digest, project_id, now_ms, count)))
    arguments = packed[packed.index(b"\n") + 1:]  # without the "*<n>" header
    assert _admit_argv(digest, project_id, now_ms, count) == arguments
    # Remembered per caller: a second call differs only in now_ms.
    later = hiredis.pack_command(tuple(_admit_args(digest, project_id, now_ms + 1, count)))
    assert _admit_argv(digest, project_id, now_ms + 1, count) == later[later.index(b"\n") + 1:]
