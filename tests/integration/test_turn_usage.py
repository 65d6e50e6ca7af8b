"""TURN usage metered from a real coturn 4.6.1's stats stream (redis-statsdb), on each store.

A real coturn publishes its allocation events to a real Redis (the stats Redis, apart from
icegate's store); icegate subscribes, and GetUsage reports what a real TURN client relayed.
The expected figures come from coturn itself: its CLI's session listing, and the relay-side
totals it publishes when each allocation ends (`StatsTotals`, read by the test itself).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

import icegate
from harness.coturn_observed import (
    ObservedCoturn,
    RelayingClient,
    StatsTotals,
    issue_credential,
    live_on_coturn,
    metering_live,
    turn_usage,
    wait_for,
)
from harness.icegate_server import TEST_ADMIN_KEY, TEST_TURN_SECRET, RunningServer, ServerFactory
from harness.redis_server import RedisServer
from icegate.v1 import usage_pb2
from icegate_server.clock import SystemClock
from icegate_server.turn.coturn_stats import COTURN_STATS_HEALTH
from icegate_server.turn.credentials import turn_password

PROJECT = "acme"


@pytest.fixture
def metered(server_factory: ServerFactory, store_url: str,
            stats_redis: RedisServer) -> RunningServer:
    server = server_factory(SystemClock(), store=store_url, coturn_statsdb=stats_redis.url)
    with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.create_project(PROJECT)
    metering_live(server.target, PROJECT)
    return server


def test_usage_reports_what_coturn_relayed(
        metered: RunningServer, observed_coturn: ObservedCoturn,
        coturn_totals: StatsTotals) -> None:
    username, password = issue_credential(metered.target, PROJECT, "alice")
    with RelayingClient(observed_coturn, username, password, seconds=3.0) as client:
        # The client relays between allocations of its own: icegate counts what coturn lists.
        live = wait_for(lambda: (n := live_on_coturn(observed_coturn, username)) >= 2 and n,
                        message="the client's allocations")
        wait_for(lambda: turn_usage(metered.target, PROJECT).live_allocations == live,
                 message="icegate counting them")
        client.process.wait(timeout=30)
    # turnutils_uclient leaves one allocation alive when it exits: still counted as live.
    usage = wait_for(
        lambda: ((u := turn_usage(metered.target, PROJECT, "alice")).live_allocations
                 == live_on_coturn(observed_coturn, username) < live
                 and u.relayed_bytes_this_month == coturn_totals.total(username) > 0 and u),
        message="the ended allocations' bytes counted")
    assert usage.user.relayed_bytes_this_month == usage.relayed_bytes_this_month
    assert usage.user.live_allocations == usage.live_allocations
    assert usage.user.user_id == "alice"
    assert usage.last_activity_time.seconds > 0
    assert usage.metering == usage_pb2.TURN_METERING_LIVE


def test_usernames_icegate_did_not_sign_are_counted_apart(
        metered: RunningServer, observed_coturn: ObservedCoturn,
        coturn_totals: StatsTotals) -> None:
    expiry = int(SystemClock().now()) + 600
    # Valid for coturn (signed with its secret), but not names icegate issues: no project,
    # a project that does not exist, user ids icegate would refuse (the separator; too long).
    foreign = [f"{expiry}:{PROJECT}", f"{expiry}:nosuch/alice", f"{expiry}:{PROJECT}/a:b",
               f"{expiry}:{PROJECT}/{'x' * 257}"]
    # All at once: each allocation runs its client for seconds.
    with ThreadPoolExecutor(len(foreign)) as pool:
        results = list(pool.map(
            lambda username: observed_coturn.allocate(
                username, turn_password(TEST_TURN_SECRET, username)), foreign))
    for result in results:
        assert result.ok, result.output
    wait_for(lambda: all(coturn_totals.total(u) > 0 for u in foreign),
             message="coturn reporting their traffic")
    sample = metered.server.metrics.registry.get_sample_value
    wait_for(lambda: (sample("icegate_turn_unattributed_events_total") or 0) > 0,
             message="unattributed events counted")
    usage = turn_usage(metered.target, PROJECT)
    assert (usage.relayed_bytes_this_month, usage.live_allocations) == (0, 0)


def test_health_and_metrics_say_metering_is_live(
        metered: RunningServer, observed_coturn: ObservedCoturn) -> None:
    with icegate.Client(metered.target, TEST_ADMIN_KEY) as client:
        assert client.health(COTURN_STATS_HEALTH) == "SERVING"
        assert client.health() == "SERVING"
    sample = metered.server.metrics.registry.get_sample_value
    assert sample("icegate_coturn_stats_up") == 1
    username, password = issue_credential(metered.target, PROJECT, "bob")
    assert observed_coturn.allocate(username, password).ok
    wait_for(lambda: (sample("icegate_turn_relayed_bytes_total", {"project": PROJECT}) or 0)
             == turn_usage(metered.target, PROJECT).relayed_bytes_this_month > 0,
             message="per-project bytes in Prometheus")
    assert sample("icegate_turn_live_allocations", {"project": PROJECT}) is not None


def test_without_a_stats_stream_metering_is_off(server_factory: ServerFactory) -> None:
    server = server_factory()
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        turn = client.get_usage().turn
        with pytest.raises(icegate.errors.NotFoundError):
            client.health(COTURN_STATS_HEALTH)
    assert turn.metering == usage_pb2.TURN_METERING_OFF
    assert (turn.live_allocations, turn.relayed_bytes_this_month) == (0, 0)
