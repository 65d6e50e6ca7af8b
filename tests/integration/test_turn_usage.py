"""TURN usage metered from a real coturn 4.6.1's stats stream (redis-statsdb), on each store.

A real coturn publishes its allocation events to a real Redis (the stats Redis, apart from
icegate's store); icegate subscribes, and GetUsage reports what a real TURN client relayed.
The expected figures come from coturn itself: the test subscribes to the same stream and adds
up the relay-side totals coturn publishes when each allocation ends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import icegate
from harness.coturn_observed import (
    ObservedCoturn,
    RelayingClient,
    coturn_cli_sessions,
    wait_for,
)
from harness.icegate_server import TEST_ADMIN_KEY, TEST_TURN_SECRET, RunningServer, ServerFactory
from harness.pytest_plugin import require_binaries
from harness.redis_server import RedisServer
from icegate.v1 import usage_pb2
from icegate_server.clock import SystemClock
from icegate_server.turn.coturn_stats import COTURN_STATS_HEALTH
from icegate_server.turn.credentials import turn_password

PROJECT = "acme"


class StatsTotals:
    """Adds up coturn's own relay-side totals (`total_traffic/peer`, rcvb + sentb) of the
    allocations that ended, per username, as coturn publishes them: what icegate must count."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, decode_responses=True)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(**{"turn/realm/*/user/*/allocation/*": self._handle})
        self._lock = threading.Lock()
        self._totals: dict[str, int] = {}
        self._thread = self._pubsub.run_in_thread(sleep_time=0.01, daemon=True)

    def _handle(self, message: dict[str, Any]) -> None:
        channel, data = message["channel"], message["data"]
        if not channel.endswith("/total_traffic/peer"):
            return
        username = channel.split("/user/", 1)[1].rsplit("/allocation/", 1)[0]
        counters = dict(part.strip().split("=") for part in data.split(","))
        with self._lock:
            self._totals[username] = (self._totals.get(username, 0) + int(counters["rcvb"])
                                      + int(counters["sentb"]))

    def total(self, username: str) -> int:
        with self._lock:
            return self._totals.get(username, 0)

    def close(self) -> None:
        self._thread.stop()
        self._client.close()


@pytest.fixture
def stats_redis() -> Iterator[RedisServer]:
    require_binaries("redis-server")
    with RedisServer() as server:
        yield server


@pytest.fixture
def coturn(stats_redis: RedisServer) -> Iterator[ObservedCoturn]:
    require_binaries("turnserver", "turnutils_uclient")
    with ObservedCoturn([TEST_TURN_SECRET], statsdb_port=stats_redis.port) as server:
        yield server


@pytest.fixture
def metered(server_factory: ServerFactory, store_url: str, stats_redis: RedisServer
            ) -> RunningServer:
    server = server_factory(SystemClock(), store=store_url, coturn_statsdb=stats_redis.url)
    with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.create_project(PROJECT)
    return server


def _turn_usage(server: RunningServer, user: str = "") -> usage_pb2.TurnUsage:
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        return client.get_usage(PROJECT, turn_user_id=user).turn


def _credential(server: RunningServer, user: str) -> tuple[str, str]:
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        issued = client.issue_turn_credentials(user, project_id=PROJECT)
    return issued.username, issued.password


@pytest.fixture
def coturn_totals(stats_redis: RedisServer) -> Iterator[StatsTotals]:
    totals = StatsTotals(stats_redis.url)
    yield totals
    totals.close()


def _live_on_coturn(coturn: ObservedCoturn, username: str) -> int:
    return sum(1 for _, listed in coturn_cli_sessions(coturn) if listed == username)


def test_usage_reports_what_coturn_relayed(metered: RunningServer, coturn: ObservedCoturn,
                                           coturn_totals: StatsTotals) -> None:
    wait_for(lambda: _turn_usage(metered).metering == usage_pb2.TURN_METERING_LIVE,
             message="metering live")
    username, password = _credential(metered, "alice")
    with RelayingClient(coturn, username, password, seconds=3.0) as client:
        # The client relays between allocations of its own: icegate counts what coturn lists.
        live = wait_for(lambda: (n := _live_on_coturn(coturn, username)) >= 2 and n,
                        message="the client's allocations")
        wait_for(lambda: _turn_usage(metered).live_allocations == live,
                 message="icegate counting them")
        client.process.wait(timeout=30)
    # turnutils_uclient leaves one allocation alive when it exits: still counted as live.
    usage = wait_for(
        lambda: ((u := _turn_usage(metered, "alice")).live_allocations
                 == _live_on_coturn(coturn, username) < live
                 and u.relayed_bytes_this_month == coturn_totals.total(username) > 0 and u),
        message="the ended allocations' bytes counted")
    assert usage.user.relayed_bytes_this_month == usage.relayed_bytes_this_month
    assert usage.user.live_allocations == usage.live_allocations
    assert usage.user.user_id == "alice"
    assert usage.last_activity_time.seconds > 0
    assert usage.metering == usage_pb2.TURN_METERING_LIVE


def test_usernames_icegate_did_not_sign_are_counted_apart(
        metered: RunningServer, coturn: ObservedCoturn, coturn_totals: StatsTotals) -> None:
    wait_for(lambda: _turn_usage(metered).metering == usage_pb2.TURN_METERING_LIVE,
             message="metering live")
    expiry = int(SystemClock().now()) + 600
    # Valid for coturn (signed with its secret), but not names icegate issues: no project,
    # a project that does not exist, user ids icegate would refuse (the separator; too long).
    foreign = [f"{expiry}:{PROJECT}", f"{expiry}:nosuch/alice", f"{expiry}:{PROJECT}/a:b",
               f"{expiry}:{PROJECT}/{'x' * 257}"]
    for username in foreign:
        result = coturn.allocate(username, turn_password(TEST_TURN_SECRET, username))
        assert result.ok, result.output
    wait_for(lambda: all(coturn_totals.total(u) > 0 for u in foreign),
             message="coturn reporting their traffic")
    unattributed = metered.server.metrics.registry.get_sample_value
    wait_for(lambda: (unattributed("icegate_turn_unattributed_events_total") or 0) > 0,
             message="unattributed events counted")
    usage = _turn_usage(metered)
    assert usage.relayed_bytes_this_month == 0
    assert usage.live_allocations == 0


def test_health_and_metrics_say_metering_is_live(metered: RunningServer,
                                                 coturn: ObservedCoturn) -> None:
    wait_for(lambda: _turn_usage(metered).metering == usage_pb2.TURN_METERING_LIVE,
             message="metering live")
    with icegate.Client(metered.target, TEST_ADMIN_KEY) as client:
        assert client.health(COTURN_STATS_HEALTH) == "SERVING"
        assert client.health() == "SERVING"
    sample = metered.server.metrics.registry.get_sample_value
    assert sample("icegate_coturn_stats_up") == 1
    username, password = _credential(metered, "bob")
    assert coturn.allocate(username, password).ok
    wait_for(lambda: (sample("icegate_turn_relayed_bytes_total", {"project": PROJECT}) or 0)
             == _turn_usage(metered).relayed_bytes_this_month > 0,
             message="per-project bytes in Prometheus")
    assert sample("icegate_turn_live_allocations", {"project": PROJECT}) is not None
