"""The metric definitions: own registries, bounded labels, store wrapper, lease gauge paging."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from icegate_server.clock import FrozenClock
from icegate_server.errors import (
    StoreUnavailableError,
    UpstreamAuthFailedError,
    UpstreamQuotaError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from icegate_server.observability.metrics import (
    LIMIT_REASONS,
    STORE_OPERATIONS,
    UPSTREAM_OUTCOMES,
    ActiveLeaseGauge,
    IcegateMetrics,
    instrument_store,
    upstream_outcome,
)
from icegate_server.projects.records import Project
from icegate_server.store.base import Store


def sample(metrics: IcegateMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_each_instance_has_its_own_registry():
    first, second = IcegateMetrics(), IcegateMetrics()  # would raise on a shared registry
    first.turn_credential_issued()
    assert sample(first, "icegate_turn_credentials_issued_total") == 1
    assert sample(second, "icegate_turn_credentials_issued_total") == 0


def test_rpc_counts_by_method_and_code_with_latency():
    metrics = IcegateMetrics()
    method = metrics.rpc("/icegate.v1.CredentialService/GetIceServers")
    method.observe(grpc.StatusCode.OK, 0.0004)
    method.observe(grpc.StatusCode.OK, 0.002)
    method.observe(grpc.StatusCode.INVALID_ARGUMENT, 0.001)
    labels = {"method": "/icegate.v1.CredentialService/GetIceServers"}
    assert sample(metrics, "icegate_rpcs_total", **labels, code="OK") == 2
    assert sample(metrics, "icegate_rpcs_total", **labels, code="INVALID_ARGUMENT") == 1
    assert sample(metrics, "icegate_rpc_duration_seconds_bucket", **labels, le="0.0005") == 1
    assert sample(metrics, "icegate_rpc_duration_seconds_count", **labels) == 3


def test_limit_refusals_exist_at_zero_and_ignore_other_reasons():
    metrics = IcegateMetrics()
    for reason in LIMIT_REASONS:
        assert sample(metrics, "icegate_limit_refusals_total", reason=reason) == 0
    metrics.limit_refused("QUOTA_EXCEEDED")
    metrics.limit_refused("UPSTREAM_QUOTA_EXCEEDED")  # the provider's quota, not a limit
    assert sample(metrics, "icegate_limit_refusals_total", reason="QUOTA_EXCEEDED") == 1
    assert sample(metrics, "icegate_limit_refusals_total",
                  reason="UPSTREAM_QUOTA_EXCEEDED") is None


@pytest.mark.parametrize(("error", "outcome"), [
    (None, "ok"),
    (UpstreamAuthFailedError("x", provider="openai"), "auth_failed"),
    (UpstreamRejectedError("x", provider="openai"), "rejected"),
    (UpstreamQuotaError("x", provider="openai"), "quota"),
    (UpstreamUnavailableError("x", provider="openai"), "unavailable"),
    (UpstreamTimeoutError("x", provider="openai"), "timeout"),
    (asyncio.CancelledError(), "cancelled"),
    (RuntimeError("bug"), "error"),
])
def test_upstream_outcomes(error, outcome):
    assert upstream_outcome(error) == outcome
    assert outcome in UPSTREAM_OUTCOMES


def test_upstream_calls_by_provider_and_outcome():
    metrics = IcegateMetrics()
    metrics.upstream_call("gemini", "ok", 0.2)
    metrics.upstream_call("gemini", "timeout", 12.0)
    assert sample(metrics, "icegate_upstream_calls_total", provider="gemini", outcome="ok") == 1
    assert sample(metrics, "icegate_upstream_duration_seconds_count", provider="gemini") == 2
    assert sample(metrics, "icegate_upstream_duration_seconds_bucket", provider="gemini",
                  le="10.0") == 1


class BrokenStore:
    """Fails `admit` like an unreachable backend; answers everything else."""

    def __init__(self) -> None:
        self.closed = False
        self.backend_detail = "sqlite"

    async def admit(self, **_: object) -> None:
        raise StoreUnavailableError("store down")

    async def close(self) -> None:
        self.closed = True

    def __getattr__(self, name: str):
        async def answer(*_: object, **__: object) -> None:
            return None
        return answer


def test_store_errors_are_counted_by_operation():
    metrics = IcegateMetrics()
    inner = BrokenStore()
    store = instrument_store(inner, metrics)  # type: ignore[arg-type]

    async def scenario() -> None:
        with pytest.raises(StoreUnavailableError):
            await store.admit(digest=None, project_id="", now_ms=0, count=True)
        await store.close()

    asyncio.run(scenario())
    assert sample(metrics, "icegate_store_errors_total", operation="admit") == 1
    assert sample(metrics, "icegate_store_errors_total", operation="close") == 0
    assert inner.closed
    assert store.backend_detail == "sqlite"  # not a Store method: passed through


def test_store_operations_are_the_store_protocol():
    assert "admit" in STORE_OPERATIONS and "begin_session" in STORE_OPERATIONS
    assert set(STORE_OPERATIONS) <= set(vars(Store))


class ManyProjects:
    """list_projects pages over `count` projects, each holding `active` live leases."""

    def __init__(self, count: int, active: int) -> None:
        self.projects = [Project(project_id=f"p{n:04d}") for n in range(count)]
        self.active = active
        self.pages = 0
        self.asked: list[tuple[str, int]] = []

    async def list_projects(self, *, after: str, limit: int) -> list[Project]:
        self.pages += 1
        return [p for p in self.projects if p.project_id > after][:limit]

    async def session_counts(self, *, project_id: str, month: str,
                             now_ms: int) -> tuple[int, int]:
        self.asked.append((month, now_ms))
        return 0, self.active


def test_active_lease_gauge_pages_over_every_project():
    store = ManyProjects(count=7, active=2)
    metrics = IcegateMetrics()
    gauge = ActiveLeaseGauge(store, FrozenClock(1_796_000_000), metrics,  # type: ignore[arg-type]
                             page_size=3)
    assert asyncio.run(gauge.refresh()) == 14
    assert store.pages == 3
    assert store.asked[0] == ("2026-11", 1_796_000_000_000)
    assert sample(metrics, "icegate_active_leases") == 14
