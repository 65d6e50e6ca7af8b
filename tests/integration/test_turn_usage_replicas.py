"""Two icegate replicas on one Redis store, both configured with coturn's stats stream: each
event is counted once (one replica meters, under the lease), and when the metering replica
goes away the other takes over and the figures still come out exact."""

from __future__ import annotations

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
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer, ServerFactory
from harness.redis_server import RedisServer
from icegate_server.clock import SystemClock

PROJECT = "acme"

pytestmark = pytest.mark.redis


@pytest.fixture
def replicas(server_factory: ServerFactory, redis_server: RedisServer,
             stats_redis: RedisServer, tmp_path) -> list[RunningServer]:
    servers = [server_factory(SystemClock(), data_dir=tmp_path / name, store=redis_server.url,
                              coturn_statsdb=stats_redis.url, coturn_stats_resync=1.0)
               for name in ("one", "two")]
    with icegate.Client(servers[0].target, TEST_ADMIN_KEY) as admin:
        admin.create_project(PROJECT)
    for server in servers:
        metering_live(server.target, PROJECT)
    return servers


def _leader(servers: list[RunningServer]) -> RunningServer:
    leaders = [s for s in servers if s.server.coturn_meter is not None
               and s.server.coturn_meter.leading]
    assert len(leaders) == 1
    return leaders[0]


def _relayed_metric(server: RunningServer) -> float:
    return server.server.metrics.registry.get_sample_value(
        "icegate_turn_relayed_bytes_total", {"project": PROJECT}) or 0


def test_each_event_is_counted_once(replicas: list[RunningServer],
                                    observed_coturn: ObservedCoturn,
                                    coturn_totals: StatsTotals) -> None:
    username, password = issue_credential(replicas[0].target, PROJECT, "alice")
    with RelayingClient(observed_coturn, username, password, seconds=6) as client:
        client.process.wait(timeout=60)
    # The client's relaying allocations have ended, each with coturn's totals.
    wait_for(lambda: coturn_totals.ended(username) >= 2, message="coturn's totals")
    for server in replicas:  # every replica reports the same figure: the store's
        wait_for(lambda s=server: turn_usage(s.target, PROJECT).relayed_bytes_this_month
                 == coturn_totals.total(username), message="counted once")
    expected = coturn_totals.total(username)
    # Prometheus: only the metering replica counted, so the sum over replicas is exact.
    assert sum(_relayed_metric(s) for s in replicas) == expected
    _leader(replicas)


def test_the_other_replica_takes_over_and_nothing_is_lost_or_doubled(
        replicas: list[RunningServer], observed_coturn: ObservedCoturn,
        coturn_totals: StatsTotals) -> None:
    username, password = issue_credential(replicas[0].target, PROJECT, "bob")
    leader = _leader(replicas)
    follower = next(s for s in replicas if s is not leader)
    with RelayingClient(observed_coturn, username, password, seconds=8) as client:
        live = wait_for(lambda: (n := live_on_coturn(observed_coturn, username)) >= 2 and n,
                        message="the client's allocations")
        wait_for(lambda: turn_usage(follower.target, PROJECT).live_allocations == live,
                 message="counted by the leader")
        leader.stop()  # mid-relay: it gives the lease up, and the other one takes over
        wait_for(lambda: follower.server.coturn_meter is not None
                 and follower.server.coturn_meter.leading, message="the follower leads")
        client.process.wait(timeout=60)
    wait_for(lambda: coturn_totals.ended(username) >= 2, message="coturn's totals")
    # What the leader counted, what the follower counted, and the totals' top-up: exact.
    wait_for(lambda: turn_usage(follower.target, PROJECT).relayed_bytes_this_month
             == coturn_totals.total(username), message="exact after the takeover")
    wait_for(lambda: turn_usage(follower.target, PROJECT).live_allocations
             == live_on_coturn(observed_coturn, username), message="live as coturn lists")
