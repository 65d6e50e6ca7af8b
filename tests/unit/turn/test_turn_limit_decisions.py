"""The TURN limits a credential call is refused by, decided on what its admission read."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from icegate_server.errors import (
    TurnAllocationLimitError,
    TurnByteQuotaExceededError,
    TurnCredentialsRevokedError,
)
from icegate_server.projects.records import Project
from icegate_server.settings import ConfigError, load_settings
from icegate_server.store.base import TurnAdmission, TurnMeterState
from icegate_server.turn.coturn_stats import MeteringStatus, metering_of
from icegate_server.turn.limits import check_turn_limits

NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z
LIMITED = Project("acme", max_allocations=10, byte_quota=1_000_000, plan="starter",
                  upgrade_url="https://icegate.example.test/upgrade")


def check(project: Project, live: int = 0, relayed: int = 0, revoked: int = 0) -> None:
    check_turn_limits(project, TurnAdmission(live, relayed, revoked), subject="alice",
                      now_ms=NOW)


def test_under_every_limit_the_call_goes_on() -> None:
    check(LIMITED, live=9, relayed=999_999, revoked=NOW)  # a revocation that just lapsed
    check(Project("free"), live=10**9, relayed=10**15)  # 0 means none


def test_at_max_allocations_new_credentials_are_refused() -> None:
    with pytest.raises(TurnAllocationLimitError) as refused:
        check(LIMITED, live=10)
    assert (refused.value.current, refused.value.maximum) == (10, 10)


def test_once_the_byte_quota_is_relayed_new_credentials_are_refused() -> None:
    with pytest.raises(TurnByteQuotaExceededError) as refused:
        check(LIMITED, relayed=1_000_000)
    error = refused.value
    assert (error.used, error.quota, error.plan) == (1_000_000, 1_000_000, "starter")
    assert error.resets_at == datetime(2026, 2, 1, tzinfo=timezone.utc)
    assert error.upgrade_url == LIMITED.upgrade_url


def test_a_revoked_subject_is_refused_first() -> None:
    with pytest.raises(TurnCredentialsRevokedError) as refused:
        check(LIMITED, live=10, relayed=10**9, revoked=NOW + 1000)
    assert refused.value.revoked_until.timestamp() * 1000 == NOW + 1000
    assert "alice" in refused.value.message


@pytest.mark.parametrize(("state", "status"), [
    (TurnMeterState(), MeteringStatus.INTERRUPTED),
    (TurnMeterState("a", NOW + 1, True, NOW - 5, NOW - 1), MeteringStatus.LIVE),
    (TurnMeterState("a", NOW + 1, False, NOW - 5, 0), MeteringStatus.INTERRUPTED),
    (TurnMeterState("a", NOW, True, NOW - 5, 0), MeteringStatus.INTERRUPTED),  # lapsed
])
def test_metering_status_from_the_shared_state(state: TurnMeterState,
                                               status: MeteringStatus) -> None:
    assert metering_of(state, NOW).status is status


def test_a_cli_needs_its_password_and_a_password_its_cli() -> None:
    base = {"ICEGATE_DEV_SECRETS": "true"}
    with pytest.raises(ConfigError, match="ICEGATE_COTURN_CLI_PASSWORD"):
        load_settings({}, {**base, "ICEGATE_COTURN_CLI": "127.0.0.1:5766"})
    with pytest.raises(ConfigError, match="ICEGATE_COTURN_CLI"):
        load_settings({}, {**base, "ICEGATE_COTURN_CLI_PASSWORD": "cli-password-0123"})
    settings = load_settings({}, {**base, "ICEGATE_COTURN_CLI": "127.0.0.1:5766",
                                  "ICEGATE_COTURN_CLI_PASSWORD": "cli-password-0123"})
    assert "cli-password-0123" not in repr(settings)
