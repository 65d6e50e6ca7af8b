"""TURN usage metered from coturn's stats stream (`redis-statsdb`), into icegate's store.

coturn publishes every allocation's start, refreshes, end and relayed traffic on a Redis of
its own (`ICEGATE_COTURN_STATSDB`; see `coturn_events` for what and how it is parsed). One
replica at a time meters it: the holder of the meter lease in icegate's store
(`Store.claim_turn_meter`, renewed every `HEARTBEAT_SECONDS`, lost `LEASE_SECONDS` after its
holder stops renewing it). The holder subscribes, turns each message into a
`TurnAllocationEvent` of the project and user id the username names, and writes them in
batches (`Store.record_turn_events`), each fenced by the lease, so a replica that lost it
(paused, cut off) writes nothing more. With the SQLite store the one process holds it.

Counting once:
- Allocation starts and ends are idempotent in the store; relayed bytes arrive as deltas,
  which only the lease holder writes, each batch under a number the store remembers, so a
  batch retried after an unknown outcome (a store timeout) counts once.
- The relayed totals coturn sends at an allocation's end top up what its deltas did not bring
  (deltas missed while the stream was down, or by a replica taking over), and add nothing
  when every delta was counted: `total_traffic` missing does not lose the deltas, and a
  delta missing is made good by the total.
- On every (re)subscription, and every `RESYNC_SECONDS`, the holder reads which allocations
  coturn holds, marks them alive, and ends those it thought alive that coturn no longer
  holds: ends missed while the stream was down, or when coturn restarted, are caught up
  within that time. Where coturn's admin CLI is configured (`ICEGATE_COTURN_CLI`) its session
  listing is the authority. Otherwise the status keys coturn keeps in the stats Redis stand
  in for it: coturn clears them when it starts, but the deletions it sends while that Redis
  is down are lost, so a key left idle (not rewritten by a refresh) longer than coturn's
  longest allocation lifetime (`MAX_STATUS_IDLE_SECONDS`) is taken for a dead allocation.

What cannot be recovered: the bytes of an allocation that ended while no replica was
subscribed, when its totals were missed too. icegate reports how metering stands
(`Metering`: live, or interrupted since when) in GetUsage, in the health service
`COTURN_STATS_HEALTH` and in metrics, and resumes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import itertools
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from icegate_server.clock import Clock
from icegate_server.errors import StoreUnavailableError
from icegate_server.observability.logs import Safe
from icegate_server.observability.metrics import IcegateMetrics
from icegate_server.store import Store
from icegate_server.store.base import (
    TurnAllocationEvent,
    TurnEventKind,
    TurnMeterState,
    month_of,
)
from icegate_server.turn.coturn_cli import CoturnCli, CoturnCliError
from icegate_server.turn.coturn_events import (
    STATS_CHANNEL_PATTERNS,
    STATUS_KEY_PATTERN,
    EventKind,
    parse_event,
    parse_status_key,
    parse_turn_username,
)

log = logging.getLogger(__name__)

COTURN_STATS_HEALTH = "icegate.coturn.stats"
"""The health service name that reports metering: SERVING while the stats stream is metered,
NOT_SERVING while it is interrupted (icegate itself still serves)."""
HEARTBEAT_SECONDS = 1.0
LEASE_SECONDS = 5.0
RESYNC_SECONDS = 30.0
BATCH_EVENTS = 500
"""Events written in one store call at most."""
MAX_STATUS_IDLE_SECONDS = 3600
"""coturn's default `max-allocate-lifetime`: an allocation alive is refreshed (its status key
rewritten) at least this often."""
STATS_TIMEOUT_SECONDS = 5.0
"""How long a connection to the stats Redis, or one command on it, may take."""
_FIRST_RETRY_SECONDS = 0.2
_MAX_RETRY_SECONDS = 5.0

_STORE_KINDS = {
    EventKind.NEW: TurnEventKind.STARTED,
    EventKind.REFRESHED: TurnEventKind.ALIVE,
    EventKind.DELETED: TurnEventKind.ENDED,
    EventKind.PEER_TRAFFIC: TurnEventKind.RELAYED,
    EventKind.PEER_TOTAL: TurnEventKind.RELAYED_TOTAL,
}
"""What the store is told of each kind; the client-side counters are not metered (the
relay-side ones are what was relayed, both ways)."""


class MeteringStatus(enum.Enum):
    """How TURN usage metering stands."""

    OFF = "off"
    """No stats stream configured (`ICEGATE_COTURN_STATSDB` unset)."""
    LIVE = "live"
    """A replica is subscribed to the stats stream and counting."""
    INTERRUPTED = "interrupted"
    """Nobody is counting: the stats Redis is unreachable, or no replica holds the lease."""


@dataclass(frozen=True)
class Metering:
    """Metering as every replica sees it (from the store), for reports and health."""

    status: MeteringStatus
    since_ms: int = 0
    """When the status began (0: unknown)."""
    last_event_ms: int = 0


def metering_of(state: TurnMeterState, now_ms: int) -> Metering:
    """How metering stands by the meter state the store holds."""
    if state.owner and state.lease_expires_ms > now_ms and state.connected:
        return Metering(MeteringStatus.LIVE, state.changed_ms, state.last_event_ms)
    since = state.changed_ms
    if state.owner and state.connected:  # its holder went quiet while subscribed
        since = state.lease_expires_ms
    return Metering(MeteringStatus.INTERRUPTED, since, state.last_event_ms)


def replica_id() -> str:
    """This process's name as a meter lease holder: host, pid and a random part."""
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in ".-")[:64]
    return f"{host or 'host'}:{os.getpid()}:{secrets.token_hex(4)}"


class _LeaseLost(Exception):
    """The store refused a batch: another replica holds the meter lease now."""


class CoturnStatsMeter:
    """Meters TURN usage from coturn's stats stream while this replica holds the lease.

    Args:
        url: The stats Redis (`redis://...`, `rediss://...`, `unix://...`).
        on_change: Called (and awaited, if it returns an awaitable) with the new `Metering`
            whenever the status changes: the server sets its health service from it.
        end_revoked: Awaited with (project id, username) for an allocation that starts under
            a revoked user or session id (a credential issued before the revocation): the
            server ends it through coturn's CLI. None: such allocations are only counted.
    """

    def __init__(self, url: str, store: Store, clock: Clock, metrics: IcegateMetrics, *,
                 owner: str | None = None, cli: CoturnCli | None = None,
                 end_revoked: Callable[[str, str], Awaitable[object]] | None = None,
                 on_change: Callable[[Metering], object] = lambda metering: None,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 lease_seconds: float = LEASE_SECONDS,
                 resync_seconds: float = RESYNC_SECONDS,
                 batch_events: int = BATCH_EVENTS) -> None:
        self._url = url
        self._cli = cli
        self._end_revoked = end_revoked
        self._ending: set[asyncio.Task[None]] = set()
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self.owner = owner or replica_id()
        self._on_change = on_change
        self._heartbeat_seconds = heartbeat_seconds
        self._lease_ms = int(lease_seconds * 1000)
        self._resync_seconds = resync_seconds
        self._batch_events = batch_events
        self._connected = False
        self._changed_ms = self._now_ms()
        self._last_event_ms = 0
        self._batches = itertools.count(1)
        self._consumer: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._metering = Metering(MeteringStatus.INTERRUPTED, self._changed_ms)
        self._leading = False

    @property
    def leading(self) -> bool:
        """Whether this replica holds the meter lease (and meters)."""
        return self._leading

    def metering(self) -> Metering:
        """How metering stood at the last heartbeat."""
        return self._metering

    def _now_ms(self) -> int:
        return int(self._clock.now() * 1000)

    def start(self) -> None:
        """Starts heartbeating (and metering whenever this replica holds the lease)."""
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat_forever())

    async def stop(self) -> None:
        """Stops metering and gives the lease up, so another replica takes over at once."""
        for task in (self._heartbeat, self._consumer):
            if task is not None:
                task.cancel()
        for task in self._ending:
            task.cancel()
        await asyncio.gather(*(t for t in (self._heartbeat, self._consumer) if t is not None),
                             *self._ending, return_exceptions=True)
        self._heartbeat = self._consumer = None
        if self._leading:
            self._leading = False
            self._metrics.clear_turn_projects()
            with contextlib.suppress(StoreUnavailableError):
                await self._store.claim_turn_meter(
                    TurnMeterState(self.owner, 0, False, self._now_ms(), self._last_event_ms),
                    now_ms=self._now_ms())

    # -- the lease -------------------------------------------------------------------------

    async def _beat_forever(self) -> None:
        while True:
            try:
                await self.beat()
            except Exception as error:  # a bug must not stop metering for good
                log.warning("coturn meter heartbeat failed (%s)", Safe(type(error).__name__))
            await asyncio.sleep(self._heartbeat_seconds)

    async def beat(self) -> None:
        """One heartbeat: renew (or take) the lease, start or stop consuming accordingly."""
        now_ms = self._now_ms()
        try:
            state = await self._store.claim_turn_meter(
                TurnMeterState(self.owner, now_ms + self._lease_ms, self._connected,
                               self._changed_ms, self._last_event_ms), now_ms=now_ms)
        except StoreUnavailableError:
            # Our lease runs out unrenewed: another replica (or we, later) takes over.
            state = TurnMeterState(self.owner, 0, False, now_ms, self._last_event_ms)
            self._stop_consuming()
        else:
            if state.owner == self.owner:
                if self._consumer is None or self._consumer.done():
                    self._leading = True
                    self._consumer = asyncio.get_running_loop().create_task(
                        self._consume_forever())
            else:
                self._stop_consuming()
        await self._publish(metering_of(state, now_ms))

    def _stop_consuming(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
            self._consumer = None
        if self._leading:
            self._leading = False
            self._metrics.clear_turn_projects()
        self._set_connected(False)

    async def _publish(self, metering: Metering) -> None:
        changed = metering.status is not self._metering.status
        self._metering = metering
        self._metrics.set_metering_up(metering.status is MeteringStatus.LIVE)
        if changed:
            if metering.status is MeteringStatus.LIVE:
                log.info("coturn stats stream metered")
            else:
                log.warning("coturn stats stream interrupted: TURN usage is not being counted")
            changed_hook = self._on_change(metering)
            if inspect.isawaitable(changed_hook):
                await changed_hook

    def _set_connected(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected = connected
            self._changed_ms = self._now_ms()
            if not connected:
                self._metrics.coturn_stream_interrupted()

    # -- the stream ------------------------------------------------------------------------

    async def _consume_forever(self) -> None:
        delay = _FIRST_RETRY_SECONDS
        while True:
            client = aioredis.Redis.from_url(
                self._url, socket_timeout=STATS_TIMEOUT_SECONDS,
                socket_connect_timeout=STATS_TIMEOUT_SECONDS, socket_keepalive=True,
                health_check_interval=int(STATS_TIMEOUT_SECONDS), decode_responses=True,
                encoding_errors="replace", client_name="icegate-meter")
            try:
                await self._consume(client)
            except _LeaseLost:
                self._set_connected(False)
                return
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                    redis.exceptions.ResponseError, OSError, TimeoutError) as error:
                if self._connected:
                    log.warning("coturn stats stream lost (%s); reconnecting",
                                Safe(type(error).__name__))
                else:
                    delay = min(delay * 2, _MAX_RETRY_SECONDS)
                self._set_connected(False)
            except Exception as error:  # a bug: logged, and the stream taken up again
                log.warning("coturn stats stream failed (%s); reconnecting",
                            Safe(type(error).__name__))
                self._set_connected(False)
                delay = _MAX_RETRY_SECONDS
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(delay)

    async def _consume(self, client: aioredis.Redis) -> None:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.psubscribe(*STATS_CHANNEL_PATTERNS)
            # Subscribed first, then the snapshot: what happens meanwhile waits in the
            # subscription and is applied after it.
            await self._resync(client)
            self._set_connected(True)
            loop = asyncio.get_running_loop()
            next_resync = loop.time() + self._resync_seconds
            while True:
                messages = await self._read_batch(pubsub, loop.time() + self._heartbeat_seconds)
                if messages:
                    await self._apply(messages)
                if loop.time() >= next_resync:
                    await self._resync(client)
                    next_resync = loop.time() + self._resync_seconds
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _read_batch(self, pubsub: Any, until: float) -> list[tuple[str, str]]:
        """Messages as (channel, data): waits for the first until `until`, then takes what
        is already there, up to a batch."""
        loop = asyncio.get_running_loop()
        batch: list[tuple[str, str]] = []
        timeout = max(until - loop.time(), 0.0)
        while len(batch) < self._batch_events:
            message = await pubsub.get_message(timeout=timeout)
            if message is None:
                if batch or loop.time() >= until:
                    break
                timeout = max(until - loop.time(), 0.0)
                continue
            if message.get("type") == "pmessage":
                batch.append((str(message.get("channel", "")), str(message.get("data", ""))))
            timeout = 0.0
        return batch

    async def _apply(self, messages: Sequence[tuple[str, str]]) -> None:
        events: list[TurnAllocationEvent] = []
        started: dict[str, dict[str, list[str]]] = {}
        metrics = self._metrics
        for channel, data in messages:
            event = parse_event(channel, data)
            if event is None:
                metrics.coturn_event("malformed")
                continue
            metrics.coturn_event(event.kind.value)
            kind = _STORE_KINDS.get(event.kind)
            username = parse_turn_username(event.username)
            if username is None:
                # Not a username icegate signs: counted apart, never attributed.
                metrics.coturn_unattributed(
                    event.relayed_bytes if kind is TurnEventKind.RELAYED else 0)
                continue
            if kind is not None:
                events.append(TurnAllocationEvent(kind, event.allocation, username.project_id,
                                                  username.user_id, event.relayed_bytes))
            if kind is TurnEventKind.STARTED:
                started.setdefault(username.project_id, {}).setdefault(
                    username.user_id, []).append(event.username)
        if events:
            await self._write(events)
            self._last_event_ms = self._now_ms()
        if started and self._end_revoked is not None:
            await self._end_revoked_starts(started)

    async def _end_revoked_starts(self, started: dict[str, dict[str, list[str]]]) -> None:
        """Ends allocations just started under revoked subjects (in the background: metering
        never waits on coturn's CLI)."""
        assert self._end_revoked is not None
        now_ms = self._now_ms()
        for project_id, by_user in started.items():
            try:
                revoked = await self._store.revoked_turn_subjects(
                    project_id=project_id, subjects=list(by_user), now_ms=now_ms)
            except StoreUnavailableError:
                continue
            for user_id in revoked:
                for username in set(by_user[user_id]):
                    task = asyncio.get_running_loop().create_task(
                        self._end_one(project_id, username))
                    self._ending.add(task)
                    task.add_done_callback(self._ending.discard)

    async def _end_one(self, project_id: str, username: str) -> None:
        assert self._end_revoked is not None
        try:
            await self._end_revoked(project_id, username)
        except Exception as error:  # the CLI's errors, whatever they are: logged
            log.warning("an allocation of a revoked credential of project %s not ended: %s",
                        Safe(project_id), Safe(type(error).__name__))

    async def _write(self, events: Sequence[TurnAllocationEvent], *,
                     from_stream: bool = True) -> None:
        """Writes one batch, retrying it (under the same number) while the store is down.

        Events `from_stream` of projects that do not exist are counted as unattributed."""
        batch = next(self._batches)
        delay = _FIRST_RETRY_SECONDS
        retried = False
        while True:
            now_ms = self._now_ms()
            try:
                changes = await self._store.record_turn_events(
                    events, owner=self.owner, batch=batch, now_ms=now_ms, month=month_of(now_ms))
            except StoreUnavailableError:
                retried = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_SECONDS)
                continue
            if changes is None:
                raise _LeaseLost
            self._metrics.turn_project_changes(changes)
            if from_stream and not retried:  # (a retried batch may answer "applied already")
                # The store drops the events of projects that do not exist: not icegate's.
                for event in events:
                    if event.project_id not in changes:
                        self._metrics.coturn_unattributed(
                            event.relayed_bytes if event.kind is TurnEventKind.RELAYED else 0)
            return

    async def _resync(self, client: aioredis.Redis) -> None:
        """Marks alive what coturn holds, then ends what it no longer holds."""
        started_ms = self._now_ms()
        alive: list[TurnAllocationEvent] = []
        complete = True
        async for allocation, username, listing_complete in self._snapshot(client):
            complete = complete and listing_complete
            parsed = parse_turn_username(username)
            if parsed is None:
                continue
            alive.append(TurnAllocationEvent(TurnEventKind.ALIVE, allocation,
                                             parsed.project_id, parsed.user_id))
            if len(alive) >= self._batch_events:
                await self._write(alive, from_stream=False)
                alive = []
        if alive:
            await self._write(alive, from_stream=False)
        if not complete:
            log.warning("coturn's CLI listed only part of its sessions (raise its "
                        "cli-max-output-sessions): ends are not caught up")
            return
        ended = await self._sweep(started_ms)
        if ended:
            self._metrics.coturn_missed_ends(ended)
            log.warning("coturn no longer holds %d allocation(s) whose end icegate did not see "
                        "(coturn restarted, or the stream was down): ended now", ended)

    async def _snapshot(self, client: aioredis.Redis
                        ) -> AsyncIterator[tuple[str, str, bool]]:
        """(allocation, username, complete) of every allocation coturn holds: from its CLI
        when configured and reachable, else from the status keys it keeps."""
        if self._cli is not None:
            try:
                listing = await self._cli.sessions()
            except CoturnCliError as error:
                log.warning("resynchronising from the stats Redis: %s", Safe(str(error)))
            else:
                for session in listing.sessions:
                    yield f"{session.session_id} {session.username}", session.username, \
                        listing.complete
                return
        keys: list[str] = []
        async for key in client.scan_iter(match=STATUS_KEY_PATTERN, count=1000):
            keys.append(str(key))
            if len(keys) >= self._batch_events:
                for found in await self._fresh_status_keys(client, keys):
                    yield found
                keys = []
        for found in await self._fresh_status_keys(client, keys):
            yield found

    async def _fresh_status_keys(self, client: aioredis.Redis, keys: Sequence[str]
                                 ) -> list[tuple[str, str, bool]]:
        """The allocations of status keys rewritten within `MAX_STATUS_IDLE_SECONDS`."""
        if not keys:
            return []
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.object("idletime", key)
        idle = await pipe.execute(raise_on_error=False)
        found = []
        for key, seconds in zip(keys, idle, strict=True):
            parsed = parse_status_key(key)
            # An error (an LFU eviction policy has no idle time) counts as fresh.
            if parsed is None or (isinstance(seconds, int)
                                  and seconds > MAX_STATUS_IDLE_SECONDS):
                continue
            found.append((parsed[0], parsed[1], True))
        return found

    async def _sweep(self, seen_before_ms: int) -> int:
        ended = 0
        delay = _FIRST_RETRY_SECONDS
        while True:
            try:
                swept = await self._store.sweep_turn_allocations(
                    owner=self.owner, seen_before_ms=seen_before_ms, now_ms=self._now_ms(),
                    limit=self._batch_events)
            except StoreUnavailableError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_SECONDS)
                continue
            if swept is None:
                raise _LeaseLost
            count, changes = swept
            self._metrics.turn_project_changes(changes)
            ended += count
            if count < self._batch_events:
                return ended

