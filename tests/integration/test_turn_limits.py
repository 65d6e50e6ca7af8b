"""A project's TURN limits against a real coturn: `max_allocations` (live allocations) and the
monthly `byte_quota`, set through `icegate admin project create/update`, refuse new TURN
credentials (IssueTurnCredentials, GetIceServers, CreateSession) with RESOURCE_EXHAUSTED and
their own reasons, as typed client errors; other projects are untouched."""

from __future__ import annotations

import json

import grpc
import pytest
from google.rpc import error_details_pb2

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
from icegate.cli import main as icegate_cli
from icegate_server.clock import SystemClock

LIMITED, OTHER = "limited", "other"


@pytest.fixture
def metered(server_factory: ServerFactory, store_url: str,
            stats_redis: RedisServer) -> RunningServer:
    server = server_factory(SystemClock(), store=store_url, coturn_statsdb=stats_redis.url)
    with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.create_project(OTHER)
    metering_live(server.target, OTHER)
    return server


@pytest.fixture(autouse=True)
def admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICEGATE_API_KEY", TEST_ADMIN_KEY)


def _admin_cli(server: RunningServer, capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code = icegate_cli(["--target", server.target, "admin", "project", *args])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def _refusal(server: RunningServer, project_id: str, user: str) -> icegate.IcegateError:
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        with pytest.raises(icegate.IcegateError) as issue:
            client.issue_turn_credentials(user, project_id=project_id)
        with pytest.raises(type(issue.value)):
            client.get_ice_servers(user, project_id=project_id)
    return issue.value


def test_max_allocations_refuses_credentials_while_the_project_is_at_it(
        metered: RunningServer, observed_coturn: ObservedCoturn,
        capsys: pytest.CaptureFixture[str]) -> None:
    created = _admin_cli(metered, capsys, "create", LIMITED, "--max-allocations", "2")
    assert created["max_allocations"] == 2
    username, password = issue_credential(metered.target, LIMITED, "alice")
    with RelayingClient(observed_coturn, username, password, seconds=60):
        live = wait_for(lambda: (n := live_on_coturn(observed_coturn, username)) >= 2 and n,
                        message="the client's allocations")
        wait_for(lambda: turn_usage(metered.target, LIMITED).live_allocations == live,
                 message="metered")
        refused = _refusal(metered, LIMITED, "bob")
        assert isinstance(refused, icegate.TurnAllocationLimitError)
        assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (refused.current, refused.max_allocations) == (live, 2)
        assert any(isinstance(d, error_details_pb2.QuotaFailure) for d in refused.details)
        # Another project is untouched; raising the limit lets the project in again.
        issue_credential(metered.target, OTHER, "carol")
        _admin_cli(metered, capsys, "update", LIMITED, "--max-allocations", str(live + 1))
        issue_credential(metered.target, LIMITED, "bob")
        _admin_cli(metered, capsys, "update", LIMITED, "--max-allocations", "1")
        assert isinstance(_refusal(metered, LIMITED, "bob"), icegate.TurnAllocationLimitError)
    # The client is gone: its relaying allocations ended, and the project is under it again
    # once they are (turnutils_uclient leaves one allocation behind: raise the limit past it).
    left = live_on_coturn(observed_coturn, username)
    _admin_cli(metered, capsys, "update", LIMITED, "--max-allocations", str(left + 1))
    wait_for(lambda: turn_usage(metered.target, LIMITED).live_allocations == left,
             message="the ends metered")
    issue_credential(metered.target, LIMITED, "bob")
    assert metered.server.metrics.registry.get_sample_value(
        "icegate_limit_refusals_total", {"reason": "TURN_ALLOCATION_LIMIT"}) >= 3


def test_byte_quota_refuses_credentials_once_the_month_relayed_it(
        metered: RunningServer, observed_coturn: ObservedCoturn,
        coturn_totals: StatsTotals, capsys: pytest.CaptureFixture[str]) -> None:
    _admin_cli(metered, capsys, "create", LIMITED, "--byte-quota", "500",
               "--upgrade-url", "https://icegate.example.test/upgrade")
    username, password = issue_credential(metered.target, LIMITED, "alice")
    assert observed_coturn.allocate(username, password).ok
    wait_for(lambda: coturn_totals.ended(username) >= 2, message="coturn's totals")
    used = wait_for(lambda: (u := turn_usage(metered.target, LIMITED).relayed_bytes_this_month)
                    == coturn_totals.total(username) > 0 and u, message="metered")
    assert used >= 500  # one short relay moves more than the quota
    refused = _refusal(metered, LIMITED, "bob")
    assert isinstance(refused, icegate.TurnByteQuotaExceededError)
    # At least what was metered above: coturn may still report the last bytes of an
    # allocation turnutils_uclient left behind.
    assert refused.bytes_used >= used
    assert refused.byte_quota == 500
    assert refused.upgrade_url == "https://icegate.example.test/upgrade"
    assert refused.resets_at is not None
    assert any(isinstance(d, error_details_pb2.QuotaFailure) for d in refused.details)
    assert turn_usage(metered.target, LIMITED).byte_quota == 500
    # Sessions are refused the same way, before anything is taken.
    with icegate.Client(metered.target, TEST_ADMIN_KEY) as client:
        with pytest.raises(icegate.TurnByteQuotaExceededError):
            client.create_session("openai", project_id=LIMITED, user_id="bob")
        assert client.get_usage(LIMITED).sessions.used_this_month == 0
    issue_credential(metered.target, OTHER, "carol")
    # A larger quota lets the project in again (well above what was used: coturn may still
    # report the last bytes of the ended allocations).
    _admin_cli(metered, capsys, "update", LIMITED, "--byte-quota", str(used * 100))
    issue_credential(metered.target, LIMITED, "bob")


@pytest.mark.parametrize("value", ["-1", str(2**62 + 1)])
def test_limits_out_of_range_are_invalid_arguments(
        metered: RunningServer, value: str) -> None:
    with icegate.Client(metered.target, TEST_ADMIN_KEY) as client:
        with pytest.raises(icegate.InvalidArgumentError) as bad:
            client.create_project(LIMITED, byte_quota=int(value))
        assert bad.value.field_violations[0].field == "byte_quota"
        with pytest.raises(icegate.InvalidArgumentError) as bad:
            client.update_project(OTHER, max_allocations=-1)
        assert bad.value.field_violations[0].field == "max_allocations"
