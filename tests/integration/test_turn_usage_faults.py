"""Metering TURN usage when things go wrong: the stats Redis goes down and comes back, coturn
restarts, and the stats channel carries garbage. icegate says so (GetUsage, health, metrics),
resumes by itself, and never counts an event twice."""

from __future__ import annotations

import pytest
import redis

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
from icegate.v1 import usage_pb2
from icegate_server.clock import SystemClock
from icegate_server.turn.coturn_stats import COTURN_STATS_HEALTH

PROJECT = "acme"


@pytest.fixture
def metered(server_factory: ServerFactory, store_url: str, stats_redis: RedisServer,
            observed_coturn: ObservedCoturn) -> RunningServer:
    # Resynchronised every half second, so the tests see ends caught up without waiting; from
    # coturn's CLI, the authority on what it holds.
    server = server_factory(SystemClock(), store=store_url, coturn_statsdb=stats_redis.url,
                            coturn_stats_resync=0.5, coturn_cli=observed_coturn.cli_address,
                            coturn_cli_password=observed_coturn.cli_password)
    with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.create_project(PROJECT)
    metering_live(server.target, PROJECT)
    return server


def _health(server: RunningServer) -> str:
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        return client.health(COTURN_STATS_HEALTH)


def test_a_stats_redis_outage_is_reported_and_metering_resumes(
        metered: RunningServer, observed_coturn: ObservedCoturn,
        stats_redis: RedisServer) -> None:
    sample = metered.server.metrics.registry.get_sample_value
    stats_redis.kill()
    wait_for(lambda: turn_usage(metered.target, PROJECT).metering
             == usage_pb2.TURN_METERING_INTERRUPTED, message="metering interrupted")
    assert _health(metered) == "NOT_SERVING"
    with icegate.Client(metered.target, TEST_ADMIN_KEY) as client:
        assert client.health() == "SERVING"  # credentials are still issued
    assert sample("icegate_coturn_stats_up") == 0
    assert (sample("icegate_coturn_stats_interruptions_total") or 0) >= 1

    stats_redis.start()
    wait_for(lambda: _health(metered) == "SERVING", message="metering live again")
    # coturn reconnects to its stats Redis by itself: what it relays now is counted, exactly.
    totals = StatsTotals(stats_redis.url)
    try:
        before = turn_usage(metered.target, PROJECT).relayed_bytes_this_month
        username, password = issue_credential(metered.target, PROJECT, "after")
        assert observed_coturn.allocate(username, password).ok
        wait_for(lambda: totals.total(username) > 0, message="coturn's totals")
        wait_for(lambda: turn_usage(metered.target, PROJECT).relayed_bytes_this_month - before
                 == totals.total(username), message="the new allocation counted once")
    finally:
        totals.close()


def test_allocations_that_end_while_the_stream_is_down_are_ended_after(
        metered: RunningServer, observed_coturn: ObservedCoturn,
        stats_redis: RedisServer) -> None:
    username, password = issue_credential(metered.target, PROJECT, "carol")
    with RelayingClient(observed_coturn, username, password, seconds=4) as client:
        live = wait_for(lambda: (n := live_on_coturn(observed_coturn, username)) >= 2 and n,
                        message="the client's allocations")
        wait_for(lambda: turn_usage(metered.target, PROJECT).live_allocations == live,
                 message="icegate counting them")
        # coturn's deletions of their status keys are lost with it, as are their events.
        stats_redis.kill()
        wait_for(lambda: _health(metered) == "NOT_SERVING", message="interrupted")
        client.process.wait(timeout=60)  # its allocations end while nobody listens
    left = wait_for(lambda: (n := live_on_coturn(observed_coturn, username)) < live and n + 1,
                    message="coturn ending them") - 1
    stats_redis.start()
    wait_for(lambda: turn_usage(metered.target, PROJECT).live_allocations == left,
             message="the ends caught up")
    assert (metered.server.metrics.registry.get_sample_value(
        "icegate_coturn_stats_missed_ends_total") or 0) >= live - left


def test_a_coturn_restart_ends_its_allocations(
        metered: RunningServer, observed_coturn: ObservedCoturn) -> None:
    username, password = issue_credential(metered.target, PROJECT, "dave")
    with RelayingClient(observed_coturn, username, password, seconds=60):
        live = wait_for(lambda: (n := live_on_coturn(observed_coturn, username)) >= 2 and n,
                        message="the client's allocations")
        wait_for(lambda: turn_usage(metered.target, PROJECT).live_allocations == live,
                 message="icegate counting them")
        # coturn dies without a word about its allocations, and clears their keys on start.
        observed_coturn.restart()
        wait_for(lambda: turn_usage(metered.target, PROJECT).live_allocations == 0,
                 message="the lost allocations ended")
    assert _health(metered) == "SERVING"


def test_garbage_on_the_stats_channels_is_counted_and_ignored(
        metered: RunningServer, observed_coturn: ObservedCoturn,
        stats_redis: RedisServer, coturn_totals: StatsTotals) -> None:
    sample = metered.server.metrics.registry.get_sample_value

    def malformed() -> float:
        return sample("icegate_coturn_stats_events_total", {"kind": "malformed"}) or 0

    def unattributed() -> float:
        return sample("icegate_turn_unattributed_events_total") or 0

    hostile = redis.Redis.from_url(stats_redis.url)
    base = "turn/realm/icegate.test/user"
    garbage = [
        (f"{base}/1:{PROJECT}/eve/allocation/1/status", b"new lifetime=-5"),
        (f"{base}/1:{PROJECT}/eve/allocation/1/traffic/peer", b"rcvb=1e99, sentb=1"),
        (f"{base}/1:{PROJECT}/eve/allocation/1/traffic/peer", b"\xff\xfe\x00garbage"),
        (f"{base}/1:{PROJECT}/eve/allocation/1/traffic/peer", b"rcvb=9" * 500),
        (f"{base}/1:{PROJECT}/e\nve/allocation/1/status", b"new lifetime=600"),
        (f"{base}/1:{PROJECT}/" + "x" * 5000 + "/allocation/1/status", b"deleted"),
        (f"{base}/1:{PROJECT}/eve/allocation/notanid/status", b"deleted"),
        (f"{base}/1:{PROJECT}/eve/allocation/1/unknown", b"rcvb=1, sentb=1"),
        ("turn/realm/x/user/\xff/allocation/1/status".encode("latin-1"), b"deleted"),
        # Well formed but for a project that does not exist: counted apart.
        (f"{base}/1:nosuch/eve/allocation/1/traffic/peer", b"rcvb=100, sentb=100"),
    ]
    try:
        for channel, message in garbage:
            hostile.publish(channel, message)
    finally:
        hostile.close()
    # Seven are not what coturn sends; three are, for usernames icegate does not sign (a line
    # break, a byte that is not UTF-8, a project that does not exist).
    wait_for(lambda: (malformed(), unattributed()) == (7, 3), message="garbage counted")
    usage = turn_usage(metered.target, PROJECT)
    assert (usage.live_allocations, usage.relayed_bytes_this_month) == (0, 0)
    assert usage.metering == usage_pb2.TURN_METERING_LIVE
    # And metering goes on: a real allocation is still counted, once.
    username, password = issue_credential(metered.target, PROJECT, "frank")
    assert observed_coturn.allocate(username, password).ok
    wait_for(lambda: turn_usage(metered.target, PROJECT).relayed_bytes_this_month
             == coturn_totals.total(username) > 0, message="counted after the garbage")
