"""Fixtures for the provider suites: a fake upstream per provider case, on a real socket."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fake_upstreams import FakeUpstream
from fake_upstreams.harness import CASES, ProviderCase


@pytest.fixture(params=CASES, ids=str)
def case(request: pytest.FixtureRequest) -> ProviderCase:
    """Each provider kind in turn."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def fake(case: ProviderCase) -> Iterator[FakeUpstream]:
    """A running fake of `case`'s provider, emulating it when nothing is queued."""
    with FakeUpstream(case.emulation()) as server:
        yield server
