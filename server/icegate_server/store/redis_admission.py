"""The admissions' own Redis connection: batches written as packed bytes, replies parsed by
hiredis in `data_received`, every other command left to redis-py.

A hand-built fast path, kept because it pays: IssueTurnCredentials reaches Redis on every
call, and redis-py's round trip for it (pool check, connection object, parser, response
handling, the asyncio stream layers and a task per batch) was most of what a call cost on
Redis beyond SQLite. Instructions per IssueTurnCredentials call, measured alone with callgrind
(`cd bench && ../.venv/bin/python instructions.py icegate-sqlite icegate-redis`, issue 16):
on Redis 761k and 772k before it (redis-py, hiredis packing; SQLite 571k and 532k in the same
runs: 1.33 and 1.45 x), 570k-616k after (SQLite 534k-569k: 1.02-1.08 x, median 1.08, six
runs). docs/PERFORMANCE.md has where the rest goes.

One batch is on the wire at a time. What the store hands over meanwhile waits, and goes out,
all together, as soon as the batch's last reply is parsed, and a lone call goes out on the
next turn of the loop. Per batch: one `transport.write` and a timeout check (one timer serves
every batch sent within a timeout of the one that armed it). Per reply: hiredis's `gets()` and
the store's `answer`.

A busy loop's gRPC calls linger (`linger`, `ICEGATE_STORE_LINGER`, 2 ms by default). Over gRPC
the loop meets about one admission a turn, so batches stayed near one call (1.05) at any load,
and the round trip's fixed cost (two system calls on each side and a wake-up of each process)
was paid per call: most of what a Redis call cost beyond a SQLite one. So when the loop's
thread worked at least `BUSY_SHARE` of the last `BUSY_WINDOW` (its CPU time over wall time,
measured by the first such call after each window), a batch whose first call `may_linger` is
held for `linger`, and what arrives meanwhile joins it. A loop with time to spare never holds
a call: holding would only add to its latency. A saturated one queues its calls anyway, and
grpc answers calls that finish together for less: batches of about 9 calls let it answer more
of them. Connect's calls never linger: each holds its connection's next request back, so a
held batch leaves the loop idle (measured over Connect: 0.79 x the bare Connect server's
calls a second not lingering, 0.62-0.68 x lingering).
Measured in alternating rounds over gRPC (h2load -c 32 -m 8, issue 16, docs/PERFORMANCE.md,
"Lingering batches"): CPU per call, icegate and redis-server together, 1.32-1.38 x SQLite's
without lingering, 0.96-1.06 x with it. Latency at a fixed rate: at 1,000 calls a second (the
loop a third busy) p99 1.7-2.4 ms, as without (1.8-2.3). Near saturation the tail is noisy
either way: at 2,500 a second where the loop does about 3,100 without lingering, p99 3-15 ms
without, 13-21 ms with; where 2,500 was past what it did without (a slower moment), 25-52 ms
without, 12-14 ms with. `ICEGATE_STORE_LINGER=0` keeps the lowest tail for a server run near
its limit. Thresholds tried: 75 % of 50 ms read bursts at 1,000 a second as busy (p99 up to
4.8 ms); 95 % of 0.2 s, of CPU time or of run-plus-runqueue time (schedstat), rarely saw the
loop busy at all (grpc's loop waits for grpc's own threads even when saturated), and gained
7 % of capacity instead of 15-30 %.

The connection is opened by redis-py (`connection_pool.make_connection()`, `connect()`):
TCP, TLS or a Unix socket, AUTH, SELECT and CLIENT SETNAME under the pool's connect and
socket timeouts, as for every other command; under Sentinel (`redis+sentinel://`),
`connect()` first asks the sentinels for the master's address, so each connection opened
after a failure is on the current master. Its transport is then handed to this module's
protocol; redis-py's connection object keeps only the socket, to close it.

What the store's callers see, on every way a batch can end:

* each its own reply (`answer`), or error reply (NOSCRIPT, say), in the order sent;
* `fail(item, error)`, a redis-py `ConnectionError` or `TimeoutError` the store turns into
  `StoreUnavailableError`, when the connection cannot be opened, is lost with the batch on
  the wire (Redis killed, connection reset, a reply that does not parse), or the batch's
  replies are not all in within `timeout` of its write (Redis paused). The connection is
  then dropped, as the stream's position is unknown: a late reply must not answer the next
  batch's callers. Nothing is re-sent: the scripts count, and one that timed out may have
  run.
* The calls waiting behind a lost batch go out on a new connection. A connection Redis
  closes while idle (a restart) is seen by the event loop as it happens, so only the
  batches on the wire at that moment fail.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import hiredis
import redis.asyncio.connection
import redis.exceptions

Item = TypeVar("Item")
"""What the store queues for one call (its arguments and its future)."""

BUSY_SHARE = 0.9
"""The share of a window the loop's thread must have spent working for the loop to be busy."""
BUSY_WINDOW = 0.05
"""Seconds over which the loop's busy share is measured (the first call after one ends
measures it)."""

Connect = Callable[[], Awaitable[redis.asyncio.connection.AbstractConnection]]


class AdmissionConnection(Generic[Item]):
    """One Redis connection that sends the store's batches and hands back replies in order.

    Args:
        connect: Opens a redis-py connection (connected and authenticated).
        timeout: Seconds a batch's replies may take, all of them, from its write.
        pack: Turns a batch into the bytes to write (called at send time, so a deadline in
            them is computed then).
        answer: Takes one item's reply: a RESP value (strings as bytes), or
            `hiredis.ReplyError`.
        fail: Takes one item whose batch failed, and the connection-level error.
        gone: Whether an item's caller has gone (cancelled) before its batch went out: such
            an item is not sent, so it takes nothing in Redis.
        linger: Seconds a busy loop's batch waits for more items before it goes out (0:
            never).
    """

    def __init__(self, connect: Connect, *, timeout: float,
                 pack: Callable[[list[Item]], bytes],
                 answer: Callable[[Item, Any], None],
                 fail: Callable[[Item, BaseException], None],
                 gone: Callable[[Item], bool] = lambda item: False,
                 linger: float = 0.0) -> None:
        self._connect = connect
        self._timeout = timeout
        self._linger = linger
        self._hold: asyncio.TimerHandle | None = None
        """While a busy store's batch lingers for more calls: the timer that ends it."""
        self._busy = False
        """Whether the loop's thread worked `BUSY_SHARE` of the last window or more."""
        self._window_start = self._window_cpu = 0.0
        self._pack = pack
        self._answer = answer
        self._fail = fail
        self._gone = gone
        self._waiting: list[Item] = []
        self._link: _Link[Item] | None = None
        """The open connection, if any."""
        self._connecting: asyncio.Task[None] | None = None
        self._stale: list[redis.asyncio.connection.AbstractConnection] = []
        """redis-py connections whose socket was dropped, to tidy up before the next one."""
        self._closed = False

    def submit(self, item: Item, may_linger: bool = False) -> None:
        """Queues `item`: it goes out with the next batch. A first item that `may_linger`
        holds its batch for `linger` while the loop is busy."""
        if self._closed:
            self._fail(item, redis.exceptions.ConnectionError("closing"))
            return
        waiting = self._waiting
        waiting.append(item)
        if may_linger and self._linger:
            now = time.monotonic()
            if now - self._window_start >= BUSY_WINDOW:
                self._measure_busy(now)
            if len(waiting) == 1 and self._busy:
                self._hold = asyncio.get_running_loop().call_later(self._linger, self._release)
                return
        if len(waiting) == 1:
            link = self._link
            if link is None or not link.answering:
                # On the next turn of the loop, so the calls this turn starts go out as one
                # batch. (Written at once instead, batches under the benchmark shrank from
                # 1.2 calls to 1.0, and a call cost 1.5 % more instructions: 585k, not 576k.)
                asyncio.get_running_loop().call_soon(self._flush)

    def _measure_busy(self, now: float) -> None:
        # The CPU time of this thread, the loop's: `submit` is called on the loop. (A system
        # call, made once a window.)
        cpu = time.thread_time()
        self._busy = cpu - self._window_cpu >= BUSY_SHARE * (now - self._window_start)
        self._window_start, self._window_cpu = now, cpu

    def _release(self) -> None:
        """Ends the linger: the batch goes out, or, with one on the wire, when it is in."""
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None
        self._flush()

    def _flush(self) -> None:
        if not self._waiting or self._connecting is not None or self._hold is not None:
            return
        link = self._link
        if link is not None:
            if link.answering:
                return  # the waiting go out when its last reply is in (`data_received`)
            if link.send(self._waiting):
                self._waiting = []
                return
        # No connection, or Redis closed it while idle: a new one.
        batch, self._waiting = self._waiting, []
        self._connecting = asyncio.get_running_loop().create_task(self._reconnect(batch))

    async def _reconnect(self, batch: list[Item]) -> None:
        try:
            if self._link is not None:
                self._stale.append(self._link.drop())
                self._link = None
            while self._stale:
                await self._stale.pop().disconnect(nowait=True)
            connection = await self._connect()
            link = _Link(self, connection, self._timeout)
        except BaseException as error:  # CancelledError too: the store is closing
            self._connecting = None
            for item in batch:
                self._fail(item, error)
            if not isinstance(error, Exception):
                raise
            if self._waiting:  # arrived meanwhile: they get their own attempt
                asyncio.get_running_loop().call_soon(self._flush)
            return
        self._connecting = None
        self._link = link
        self._waiting[:0] = batch
        self._flush()

    def lost(self, link: _Link[Item], error: BaseException) -> None:
        """`link` failed (lost, timed out, unparsable): its batch fails, the waiting go on."""
        if link is not self._link:
            return
        self._link = None
        self._stale.append(link.drop())
        for item in link.take_unanswered():
            self._fail(item, error)
        if self._waiting and not self._closed:
            asyncio.get_running_loop().call_soon(self._flush)

    async def close(self) -> None:
        """Waits for the batches queued so far, then closes the connection."""
        self._linger = 0.0
        if self._hold is not None:
            self._release()
        while self._connecting is not None or self._waiting or (
                self._link is not None and self._link.answering):
            if self._connecting is not None:
                await asyncio.gather(self._connecting, return_exceptions=True)
            elif self._link is not None and self._link.answering:
                await self._link.wait_answered()
            else:
                self._flush()
                await asyncio.sleep(0)
        self._closed = True
        if self._link is not None:
            self._stale.append(self._link.drop())
            self._link = None
        while self._stale:
            await self._stale.pop().disconnect(nowait=True)


class _Link(asyncio.Protocol, Generic[Item]):
    """One open connection: the transport redis-py opened, read by hiredis."""

    def __init__(self, owner: AdmissionConnection[Item],
                 connection: redis.asyncio.connection.AbstractConnection,
                 timeout: float) -> None:
        self._owner = owner
        self._connection = connection
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        # redis-py keeps the stream it opened (TCP, TLS or Unix) in a private attribute; a
        # redis-py without it fails here, at the first admission, not silently.
        writer = connection._writer
        if writer is None:
            raise redis.exceptions.ConnectionError("Connection closed while opening")
        self._transport = writer.transport
        self._reader = hiredis.Reader()  # replies undecoded: bytes
        self.answering: collections.deque[Item] = collections.deque()
        """The items of the batch on the wire whose replies are not in yet."""
        self._batches_sent = 0
        self._sent_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._answered: asyncio.Future[None] | None = None
        self._transport.set_protocol(self)

    def send(self, batch: list[Item]) -> bool:
        """Writes `batch`; False (nothing written) if the transport is closing."""
        if self._transport.is_closing():
            return False
        gone = self._owner._gone
        batch = [item for item in batch if not gone(item)]
        if not batch:
            return True
        self.answering.extend(batch)
        self._transport.write(self._owner._pack(batch))
        self._batches_sent += 1
        # time.monotonic is the loop's clock; uvloop's loop.time() is the one cached when
        # this turn of the loop began, which would cut the timeout short by the turn's length.
        self._sent_at = time.monotonic()
        if self._timer is None:
            self._arm_timer()
        return True

    def _arm_timer(self) -> None:
        self._timer = self._loop.call_at(self._sent_at + self._timeout, self._check_timeout,
                                         self._batches_sent, False)

    def _check_timeout(self, batch_number: int, polled: bool) -> None:
        # One timer for every batch sent within a timeout of each other: it fires for the
        # batch that armed it; if that one is answered and a later one is on the wire, it
        # re-arms for the later one's deadline.
        self._timer = None
        if not self.answering:
            return
        if batch_number != self._batches_sent:
            self._arm_timer()
            return
        if not polled:
            # Due. uvloop runs due timers before it polls the sockets, so replies already
            # in ours would count as late: they are read first (the loop polls before a
            # timer 1 ms away), and only a batch still unanswered then has timed out.
            self._timer = self._loop.call_later(0.001, self._check_timeout, batch_number,
                                                True)
            return
        self._owner.lost(self, redis.exceptions.TimeoutError(
            f"Timeout reading from socket: no reply within {self._timeout:g} s"))

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        answering = self.answering
        answer = self._owner._answer
        try:
            while (reply := reader.gets()) is not False:
                answer(answering.popleft(), reply)
        except (hiredis.ProtocolError, IndexError) as error:  # unparsable, or unasked for
            self._owner.lost(self, redis.exceptions.ConnectionError(
                f"Protocol error from Redis: {type(error).__name__}"))
            return
        if not answering:
            if self._answered is not None:
                self._answered.set_result(None)
                self._answered = None
            owner = self._owner
            if owner._waiting:  # the batch is answered: the waiting go out now, unless
                owner._flush()  # they linger for more

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.lost(self, redis.exceptions.ConnectionError(
            f"Connection lost: {exc}" if exc else "Connection closed by server."))

    def take_unanswered(self) -> list[Item]:
        items = list(self.answering)
        self.answering.clear()
        if self._answered is not None:
            self._answered.set_result(None)
            self._answered = None
        return items

    def drop(self) -> redis.asyncio.connection.AbstractConnection:
        """Closes the socket now; returns redis-py's connection, to tidy up."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport.abort()
        return self._connection

    async def wait_answered(self) -> None:
        if self.answering:
            if self._answered is None:
                self._answered = self._loop.create_future()
            await self._answered


__all__ = ["AdmissionConnection"]
