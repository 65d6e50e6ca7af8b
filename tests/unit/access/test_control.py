"""AccessControl: who a key (or a certificate) is, which project it may act on, the rate limit,
and fail-open while the store is away. A real SQLite store in a tmp dir, a frozen clock."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from google.rpc import error_details_pb2

from icegate_server import status
from icegate_server.access.control import FAIL_OPEN_MEMORY_SECONDS, AccessControl, MethodPolicy
from icegate_server.access.keys import key_digest
from icegate_server.clock import FrozenClock
from icegate_server.errors import (
    InvalidApiKeyError,
    InvalidFieldError,
    NotFoundError,
    ProjectForbiddenError,
    RateLimitedError,
    StoreUnavailableError,
)
from icegate_server.projects.records import ApiKey, Project
from icegate_server.store import open_store

T = TypeVar("T")

STATIC_ADMIN_KEY = "igk_static_admin_key_0123456789"
ACME_KEY = "igk_acme01_acme-web-secret-0123456789"
BILLING_KEY = "igk_bill01_billing-secret-0123456789"
STORED_ADMIN_KEY = "igk_admin1_stored-admin-secret-0123456789"
REVOKED_KEY = "igk_revk01_revoked-secret-0123456789"
NEVER_ISSUED_KEY = "igk_nope01_never-issued-secret-0123456789"
WEB_CERT = "uri:spiffe://corp/web"
START = 1_800_000_000.0


class SwitchableStore:
    """The real store, whose round trips fail as an unreachable one's do while `down`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.down = False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreUnavailableError("store down")
            return await method(*args, **kwargs)

        return call


class World:
    """A fresh store with projects acme (3 requests a minute) and billing, their keys, and
    an AccessControl over it whose store can be taken away (`down`)."""

    def __init__(self, access: AccessControl, clock: FrozenClock,
                 store: SwitchableStore) -> None:
        self.access = access
        self.clock = clock
        self._store = store

    @property
    def down(self) -> bool:
        return self._store.down

    @down.setter
    def down(self, down: bool) -> None:
        self._store.down = down

    async def admit(self, key: str, project_id: str = "",
                    policy: MethodPolicy = MethodPolicy.PROJECT) -> str:
        """The project the call acts on ("" for admin calls), or the refusal raised."""
        context = await self.access.admit(key, policy, project_id)
        return context.project.project_id if context.project else ""


def run(tmp_path: Path, script: Callable[[World], Awaitable[T]], **options: Any) -> T:
    """Runs `script` against a fresh world; `options` go to AccessControl."""

    async def main() -> T:
        store = await open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
        try:
            await store.create_project(Project("acme", rate_limit_requests=3,
                                               rate_limit_window_seconds=60))
            await store.create_project(Project("billing"))
            for key_id, project_id, secret, admin in [
                    ("acme01", "acme", ACME_KEY, False), ("bill01", "billing", BILLING_KEY, False),
                    ("admin1", "", STORED_ADMIN_KEY, True), ("revk01", "acme", REVOKED_KEY, False)]:
                await store.create_api_key(ApiKey(key_id, project_id=project_id, admin=admin,
                                                  create_time=START), key_digest(secret))
            await store.revoke_api_key("revk01", int(START * 1000))
            clock = FrozenClock(START)
            switchable = SwitchableStore(store)
            access = AccessControl(switchable, clock, [STATIC_ADMIN_KEY],  # type: ignore[arg-type]
                                   **options)
            return await script(World(access, clock, switchable))
        finally:
            await store.close()

    return asyncio.run(main())


def refusal(tmp_path: Path, script: Callable[[World], Awaitable[object]],
            **options: Any) -> Exception:
    with pytest.raises(Exception) as caught:
        run(tmp_path, script, **options)
    return caught.value


# -- who may act on which project ------------------------------------------------------------

def test_a_static_admin_key_administers_and_acts_on_any_project(tmp_path):
    async def script(world: World) -> list[str]:
        return [await world.admit(STATIC_ADMIN_KEY, policy=MethodPolicy.ADMIN),
                await world.admit(STATIC_ADMIN_KEY, "acme"),
                await world.admit(STATIC_ADMIN_KEY, "billing")]

    assert run(tmp_path, script) == ["", "acme", "billing"]


def test_a_stored_admin_key_administers(tmp_path):
    async def script(world: World) -> str:
        return await world.admit(STORED_ADMIN_KEY, policy=MethodPolicy.ADMIN)

    assert run(tmp_path, script) == ""


def test_a_stored_key_acts_on_its_project_named_or_implied(tmp_path):
    async def script(world: World) -> list[str]:
        return [await world.admit(ACME_KEY, "acme"), await world.admit(ACME_KEY, ""),
                await world.admit(ACME_KEY, "acme", MethodPolicy.PROJECT_UNCOUNTED)]

    assert run(tmp_path, script) == ["acme", "acme", "acme"]


@pytest.mark.parametrize("policy", [MethodPolicy.PROJECT, MethodPolicy.PROJECT_UNCOUNTED])
def test_a_key_naming_another_project_is_forbidden(tmp_path, policy):
    async def script(world: World) -> str:
        return await world.admit(ACME_KEY, "billing", policy)

    assert isinstance(refusal(tmp_path, script), ProjectForbiddenError)


def test_a_project_key_may_not_administer(tmp_path):
    async def script(world: World) -> str:
        return await world.admit(ACME_KEY, policy=MethodPolicy.ADMIN)

    assert isinstance(refusal(tmp_path, script), ProjectForbiddenError)


@pytest.mark.parametrize("key", [NEVER_ISSUED_KEY, REVOKED_KEY, "", "not-a-key"])
@pytest.mark.parametrize("policy", list(MethodPolicy))
def test_an_unknown_or_revoked_key_is_invalid(tmp_path, key, policy):
    async def script(world: World) -> str:
        return await world.admit(key, "acme" if policy is not MethodPolicy.ADMIN else "", policy)

    error = refusal(tmp_path, script)
    assert isinstance(error, InvalidApiKeyError)
    assert status.lookup(error)[1] == "INVALID_API_KEY"
    if key:
        assert key not in error.message


def test_a_project_that_does_not_exist_is_not_found(tmp_path):
    async def script(world: World) -> str:
        return await world.admit(STATIC_ADMIN_KEY, "nowhere")

    assert isinstance(refusal(tmp_path, script), NotFoundError)


def test_a_malformed_project_id_is_an_invalid_field_never_echoed(tmp_path):
    hostile = "acme\n" + "x" * 3000

    async def script(world: World) -> str:
        return await world.admit(ACME_KEY, hostile)

    error = refusal(tmp_path, script)
    assert isinstance(error, InvalidFieldError)
    assert hostile not in str(error)


# -- the rate limit --------------------------------------------------------------------------

def test_the_fourth_call_in_a_minute_is_rate_limited_with_when_to_retry(tmp_path):
    async def script(world: World) -> tuple[list[str], Exception, str]:
        admitted = [await world.admit(ACME_KEY, "acme") for _ in range(3)]
        with pytest.raises(RateLimitedError) as caught:
            await world.admit(ACME_KEY, "acme")
        world.clock.advance(caught.value.retry_after_seconds)
        return admitted, caught.value, await world.admit(ACME_KEY, "acme")

    admitted, error, after_waiting = run(tmp_path, script)
    assert admitted == ["acme"] * 3
    assert isinstance(error, RateLimitedError)
    assert (error.limit, error.window_seconds) == (3, 60)
    assert 0 < error.retry_after_seconds <= 60
    assert error.reset_at.timestamp() == pytest.approx(START + error.retry_after_seconds)
    assert after_waiting == "acme"  # waiting as told is enough
    # What the caller receives: RESOURCE_EXHAUSTED, RATE_LIMITED, and RetryInfo.
    rpc_status = status.to_rpc_status(error)
    retry = [detail for detail in rpc_status.details
             if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(retry) == 1
    info = error_details_pb2.RetryInfo()
    retry[0].Unpack(info)
    assert info.retry_delay.ToTimedelta().total_seconds() == pytest.approx(
        error.retry_after_seconds, abs=1)
    assert status.lookup(error)[1] == "RATE_LIMITED"


def test_the_limit_is_the_projects_whoever_calls_and_usage_reports_do_not_count(tmp_path):
    async def script(world: World) -> None:
        await world.admit(ACME_KEY, "acme")
        await world.admit(STATIC_ADMIN_KEY, "acme")
        for _ in range(5):
            await world.admit(ACME_KEY, "acme", MethodPolicy.PROJECT_UNCOUNTED)
        await world.admit(ACME_KEY, "")
        with pytest.raises(RateLimitedError):
            await world.admit(STATIC_ADMIN_KEY, "acme")
        # Another project's budget is untouched, and a limited project still reports usage.
        assert await world.admit(BILLING_KEY, "billing") == "billing"
        assert await world.admit(ACME_KEY, "acme", MethodPolicy.PROJECT_UNCOUNTED) == "acme"

    run(tmp_path, script)


def test_a_certificate_bound_to_a_project_shares_its_limit_and_may_not_leave_it(tmp_path):
    async def script(world: World) -> list[str]:
        admitted = [await world.access.admit_identity(["cn:web", WEB_CERT],
                                                      MethodPolicy.PROJECT, "")]
        admitted.append(await world.admit(ACME_KEY, "acme"))
        admitted.append(await world.access.admit_identity([WEB_CERT], MethodPolicy.PROJECT,
                                                          "acme"))
        with pytest.raises(RateLimitedError):
            await world.admit(ACME_KEY, "acme")
        with pytest.raises(ProjectForbiddenError):
            await world.access.admit_identity([WEB_CERT], MethodPolicy.PROJECT, "billing")
        with pytest.raises(InvalidApiKeyError):
            await world.access.admit_identity(["dns:stranger.internal"], MethodPolicy.PROJECT,
                                              "")
        return [context if isinstance(context, str) else context.project.project_id
                for context in admitted]

    assert run(tmp_path, script, identity_projects={WEB_CERT: "acme"}) == ["acme"] * 3


# -- fail-open while the store is unreachable --------------------------------------------------

def test_without_fail_open_an_unreachable_store_refuses_every_stored_key(tmp_path):
    async def script(world: World) -> str:
        await world.admit(ACME_KEY, "acme")
        world.down = True
        return await world.admit(ACME_KEY, "acme")

    assert isinstance(refusal(tmp_path, script), StoreUnavailableError)


def test_fail_open_lets_a_recently_admitted_key_in_uncounted(tmp_path):
    async def script(world: World) -> list[str]:
        admitted = [await world.admit(ACME_KEY, "acme")]
        world.down = True
        admitted += [await world.admit(ACME_KEY, "acme") for _ in range(10)]
        world.down = False
        # The ten calls while the store was away were not counted: two of three remain.
        admitted += [await world.admit(ACME_KEY, "acme") for _ in range(2)]
        with pytest.raises(RateLimitedError):
            await world.admit(ACME_KEY, "acme")
        return admitted

    assert run(tmp_path, script, fail_open_rate_limit=True) == ["acme"] * 13


@pytest.mark.parametrize("case", ["never-admitted", "other-project", "remembered-too-long",
                                  "admin-call"])
def test_fail_open_never_lets_in_what_it_has_not_just_seen(tmp_path, case):
    async def script(world: World) -> str:
        await world.admit(ACME_KEY, "acme")
        await world.admit(STORED_ADMIN_KEY, "acme")
        world.down = True
        if case == "never-admitted":
            return await world.admit(BILLING_KEY, "billing")
        if case == "other-project":
            return await world.admit(STORED_ADMIN_KEY, "billing")
        if case == "remembered-too-long":
            world.clock.advance(FAIL_OPEN_MEMORY_SECONDS + 1)
            return await world.admit(ACME_KEY, "acme")
        return await world.admit(STORED_ADMIN_KEY, policy=MethodPolicy.ADMIN)

    error = refusal(tmp_path, script, fail_open_rate_limit=True)
    assert isinstance(error, StoreUnavailableError)
    assert status.lookup(error)[0].name == "UNAVAILABLE"
