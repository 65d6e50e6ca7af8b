"""The store contract for TURN usage: the meter lease and the allocation bookkeeping, on every
backend (a fresh SQLite file, a fresh real redis-server), with frozen time."""

from __future__ import annotations

from pytest import fixture
from test_store_contract import MONTH, NOW, Backend, backend  # noqa: F401 (the fixture)

from icegate_server.projects.records import Project
from icegate_server.store.base import (
    Store,
    TurnAllocationEvent,
    TurnEventKind,
    TurnMeterState,
    TurnProjectChange,
    TurnUsageFigures,
)

LEASE_MS = 5000
STARTED, ALIVE, RELAYED, ENDED, TOTAL = (
    TurnEventKind.STARTED, TurnEventKind.ALIVE, TurnEventKind.RELAYED, TurnEventKind.ENDED,
    TurnEventKind.RELAYED_TOTAL)


def event(kind: TurnEventKind, allocation: str = "1 x:acme/alice", user: str = "alice",
          relayed: int = 0, project: str = "acme") -> TurnAllocationEvent:
    return TurnAllocationEvent(kind, allocation, project, user, relayed)


async def lead(store: Store, owner: str = "a", now: int = NOW) -> TurnMeterState:
    return await store.claim_turn_meter(
        TurnMeterState(owner, now + LEASE_MS, True, now, 0), now_ms=now)


class Recorder:
    """Writes batches as one meter would: its own owner name and increasing batch numbers."""

    def __init__(self, store: Store, owner: str = "a") -> None:
        self.store, self.owner, self.batch = store, owner, 0

    async def __call__(self, *events: TurnAllocationEvent, now: int = NOW
                       ) -> dict[str, TurnProjectChange] | None:
        self.batch += 1
        return await self.store.record_turn_events(events, owner=self.owner, batch=self.batch,
                                                   now_ms=now, month=MONTH)


@fixture
def with_project(backend: Backend) -> Backend:  # noqa: F811
    async def scenario(store: Store) -> None:
        await store.create_project(Project("acme"))
        await store.create_project(Project("other"))

    backend.run(scenario)
    return backend


def test_one_owner_holds_the_lease_until_it_lapses(backend: Backend) -> None:  # noqa: F811
    async def scenario(store: Store) -> None:
        assert (await lead(store, "a")).owner == "a"
        # Another replica asking meanwhile is told who holds it, and how the stream stands.
        held = await lead(store, "b", NOW + 1000)
        assert (held.owner, held.connected) == ("a", True)
        assert (await lead(store, "a", NOW + 2000)).owner == "a"  # renewed
        assert (await lead(store, "b", NOW + 2000 + LEASE_MS)).owner == "b"  # lapsed
        # Giving it up (expiry 0) frees it at once for the next claimant.
        await store.claim_turn_meter(TurnMeterState("b", 0, False, NOW, 0), now_ms=NOW + 8000)
        assert (await lead(store, "a", NOW + 8001)).owner == "a"
        assert (await store.turn_meter_state()).owner == "a"

    backend.run(scenario)


def test_only_the_lease_holder_writes(with_project: Backend) -> None:
    async def scenario(store: Store) -> None:
        await lead(store, "a")
        assert await Recorder(store, "b")(event(STARTED)) is None
        assert (await store.turn_usage(project_id="acme", month=MONTH)).live_allocations == 0
        # A lease past its expiry writes nothing either (the holder was paused, say).
        assert await Recorder(store, "a")(event(STARTED), now=NOW + LEASE_MS) is None

    with_project.run(scenario)


def test_allocations_live_until_they_end_and_bytes_add_up(with_project: Backend) -> None:
    async def scenario(store: Store) -> None:
        await lead(store)
        record = Recorder(store)
        changes = await record(event(STARTED), event(STARTED, "2 x:acme/alice"),
                               event(STARTED, "3 x:acme/bob", "bob"),
                               event(STARTED, "4 x:other/carol", "carol", project="other"))
        assert changes == {"acme": TurnProjectChange(3, 0), "other": TurnProjectChange(1, 0)}
        assert await record(event(RELAYED, relayed=1000), event(RELAYED, relayed=500),
                            now=NOW + 10) == {"acme": TurnProjectChange(3, 1500)}
        assert await record(event(ENDED), event(TOTAL, relayed=1700),
                            now=NOW + 20) == {"acme": TurnProjectChange(2, 200)}
        assert await store.turn_usage(project_id="acme", month=MONTH) == \
            TurnUsageFigures(2, 1700, NOW + 20)
        assert await store.turn_usage(project_id="acme", month=MONTH, user_id="alice") == \
            TurnUsageFigures(1, 1700, NOW + 20)
        assert await store.turn_usage(project_id="acme", month=MONTH, user_id="bob") == \
            TurnUsageFigures(1, 0, NOW)
        assert await store.turn_usage(project_id="acme", month="2023-12") == \
            TurnUsageFigures(2, 0, 0)

    with_project.run(scenario)


def test_repeated_events_count_once(with_project: Backend) -> None:
    async def scenario(store: Store) -> None:
        await lead(store)
        record = Recorder(store)
        await record(event(STARTED), event(STARTED), event(ALIVE), event(RELAYED, relayed=100))
        # A second "new" of a live allocation does not reset what was counted for it.
        await record(event(STARTED), event(ENDED), event(ENDED), event(TOTAL, relayed=100),
                     event(TOTAL, relayed=100), event(ALIVE), event(TOTAL, relayed=50))
        figures = await store.turn_usage(project_id="acme", month=MONTH)
        assert (figures.live_allocations, figures.relayed_bytes) == (0, 100)
        # A batch replayed under a number already applied (a retry after a timeout) is a no-op.
        assert await store.record_turn_events([event(STARTED, "9 x:acme/al"),
                                               event(RELAYED, "9 x:acme/al", relayed=5)],
                                              owner="a", batch=record.batch, now_ms=NOW,
                                              month=MONTH) == {}
        assert (await store.turn_usage(project_id="acme", month=MONTH)).relayed_bytes == 100

    with_project.run(scenario)


def test_totals_make_good_what_the_reports_missed(with_project: Backend) -> None:
    async def scenario(store: Store) -> None:
        await lead(store)
        record = Recorder(store)
        # Started while nobody listened: only its last report and its totals are seen.
        await record(event(RELAYED, relayed=300), event(ENDED), event(TOTAL, relayed=1000))
        # Never seen alive at all: its totals alone count, once.
        await record(event(ENDED, "5 x:acme/bob", "bob"),
                     event(TOTAL, "5 x:acme/bob", "bob", relayed=42))
        await record(event(TOTAL, "5 x:acme/bob", "bob", relayed=42))
        figures = await store.turn_usage(project_id="acme", month=MONTH)
        assert (figures.live_allocations, figures.relayed_bytes) == (0, 1042)

    with_project.run(scenario)


def test_an_allocation_id_coturn_reuses_is_a_new_allocation(with_project: Backend) -> None:
    async def scenario(store: Store) -> None:
        await lead(store)
        record = Recorder(store)
        await record(event(STARTED), event(RELAYED, relayed=100), event(ENDED),
                     event(TOTAL, relayed=100))
        # An alive report of an ended allocation is stale: it stays ended.
        await record(event(ALIVE))
        assert (await store.turn_usage(project_id="acme", month=MONTH)).live_allocations == 0
        # coturn restarted and gave the same id to the same username: counted from zero.
        await record(event(STARTED), event(ENDED), event(TOTAL, relayed=30))
        assert (await store.turn_usage(project_id="acme", month=MONTH)).relayed_bytes == 130

    with_project.run(scenario)


def test_events_of_unknown_projects_are_dropped(with_project: Backend) -> None:
    async def scenario(store: Store) -> None:
        await lead(store)
        changes = await Recorder(store)(event(STARTED, project="nosuch"),
                                        event(RELAYED, project="nosuch", relayed=10))
        assert changes == {}
        assert await store.turn_usage(project_id="nosuch", month=MONTH) == TurnUsageFigures()

    with_project.run(scenario)


def test_the_sweep_ends_what_was_not_seen_since(with_project: Backend) -> None:
    async def scenario(store: Store) -> None:
        await lead(store)
        record = Recorder(store)
        await record(*(event(STARTED, f"{n} x:acme/alice") for n in range(5)))
        await record(event(ALIVE, "1 x:acme/alice"), event(ALIVE, "3 x:acme/alice"),
                     now=NOW + 100)
        assert await store.sweep_turn_allocations(owner="b", seen_before_ms=NOW + 100,
                                                  now_ms=NOW + 100, limit=2) is None
        first = await store.sweep_turn_allocations(owner="a", seen_before_ms=NOW + 100,
                                                   now_ms=NOW + 100, limit=2)
        assert first == (2, {"acme": TurnProjectChange(3, 0)})
        assert await store.sweep_turn_allocations(
            owner="a", seen_before_ms=NOW + 100, now_ms=NOW + 100, limit=2) == \
            (1, {"acme": TurnProjectChange(2, 0)})
        assert await store.sweep_turn_allocations(
            owner="a", seen_before_ms=NOW + 100, now_ms=NOW + 100, limit=2) == (0, {})
        figures = await store.turn_usage(project_id="acme", month=MONTH, user_id="alice")
        assert figures.live_allocations == 2

    with_project.run(scenario)


def test_deleting_a_project_removes_its_turn_figures(with_project: Backend) -> None:
    async def scenario(store: Store) -> None:
        await lead(store)
        await Recorder(store)(event(STARTED), event(RELAYED, relayed=77))
        await store.delete_project("acme", NOW)
        await store.create_project(Project("acme"))
        assert await store.turn_usage(project_id="acme", month=MONTH) == TurnUsageFigures()
        assert await store.turn_usage(project_id="acme", month=MONTH, user_id="alice") == \
            TurnUsageFigures()

    with_project.run(scenario)


def test_an_allocation_swept_by_mistake_lives_again_when_reported(with_project: Backend) -> None:
    async def scenario(store: Store) -> None:
        await lead(store)
        record = Recorder(store)
        await record(event(STARTED), event(RELAYED, relayed=100))
        # A stats Redis restarted empty lost coturn's status keys: the resync ends it...
        await store.sweep_turn_allocations(owner="a", seen_before_ms=NOW + 1, now_ms=NOW + 1,
                                           limit=10)
        assert (await store.turn_usage(project_id="acme", month=MONTH)).live_allocations == 0
        # ...until coturn reports it again, and then its bytes go on adding up, once.
        await record(event(ALIVE), event(RELAYED, relayed=50), now=NOW + 2)
        assert (await store.turn_usage(project_id="acme", month=MONTH)).live_allocations == 1
        await record(event(ENDED), event(TOTAL, relayed=150), event(ALIVE), now=NOW + 3)
        figures = await store.turn_usage(project_id="acme", month=MONTH)
        assert (figures.live_allocations, figures.relayed_bytes) == (0, 150)

    with_project.run(scenario)


def test_a_sessions_turn_username_is_taken_once_its_allocations_are_due(
        with_project: Backend) -> None:
    from icegate_server.store.base import ProviderKeyRecord, SessionOutcome

    async def begin(store: Store, session_id: str, username: str) -> None:
        started = await store.begin_session(
            project_id="acme", session_id=session_id, month=MONTH, now_ms=NOW,
            pending_ms=1000, quota=100, max_concurrent=100, provider="openai",
            turn_username=username)
        assert started.outcome is SessionOutcome.STARTED

    async def scenario(store: Store) -> None:
        await store.put_provider_key(ProviderKeyRecord("acme", "openai", b"sealed", "1234", NOW))
        for name in ("ses_ended", "ses_expires", "ses_renewed", "ses_cancelled"):
            await begin(store, name, f"1:acme/{name}")
            assert await store.confirm_session(project_id="acme", session_id=name,
                                               month=MONTH, now_ms=NOW, lease_ms=10_000)
        await begin(store, "ses_never", "")  # no TURN credential: nothing kept
        assert await store.session_turn_username(project_id="acme",
                                                 session_id="ses_ended") == "1:acme/ses_ended"
        assert await store.session_turn_username(project_id="acme",
                                                 session_id="ses_never") is None
        await store.cancel_session(project_id="acme", session_id="ses_cancelled", month=MONTH)
        assert await store.renew_session(project_id="acme", session_id="ses_renewed",
                                         now_ms=NOW + 5000, lease_ms=10_000)
        assert await store.end_session(project_id="acme", session_id="ses_ended",
                                       now_ms=NOW + 100)
        # Ended: due at once; the others when their leases run out (renewed: later).
        assert await store.take_ended_session_turn(now_ms=NOW + 200, limit=10) == [
            ("acme", "ses_ended", "1:acme/ses_ended")]
        assert await store.take_ended_session_turn(now_ms=NOW + 200, limit=10) == []
        assert await store.take_ended_session_turn(now_ms=NOW + 10_000, limit=10) == [
            ("acme", "ses_expires", "1:acme/ses_expires")]
        assert await store.take_ended_session_turn(now_ms=NOW + 15_000, limit=10) == [
            ("acme", "ses_renewed", "1:acme/ses_renewed")]
        assert await store.take_ended_session_turn(now_ms=NOW + 10**9, limit=10) == []

    with_project.run(scenario)


def test_revocations_hold_until_their_time_and_can_be_lifted(with_project: Backend) -> None:
    async def scenario(store: Store) -> None:
        until = await store.revoke_turn_subject(project_id="acme", subject="alice",
                                                until_ms=NOW + 5000, now_ms=NOW)
        assert until == NOW + 5000
        # A shorter revocation does not shorten the one in force.
        assert await store.revoke_turn_subject(project_id="acme", subject="alice",
                                               until_ms=NOW + 10, now_ms=NOW) == NOW + 5000
        admitted = await store.admit(digest=None, project_id="acme", now_ms=NOW, count=True,
                                     turn_subject="alice")
        assert admitted.turn is not None and admitted.turn.revoked_until_ms == NOW + 5000
        other = await store.admit(digest=None, project_id="acme", now_ms=NOW, count=True,
                                  turn_subject="bob")
        assert other.turn is not None and other.turn.revoked_until_ms == 0
        plain = await store.admit(digest=None, project_id="acme", now_ms=NOW, count=True)
        assert plain.turn is None
        assert await store.lift_turn_subject(project_id="acme", subject="alice", now_ms=NOW)
        assert not await store.lift_turn_subject(project_id="acme", subject="alice", now_ms=NOW)
        lifted = await store.admit(digest=None, project_id="acme", now_ms=NOW, count=True,
                                   turn_subject="alice")
        assert lifted.turn is not None and lifted.turn.revoked_until_ms == 0

    with_project.run(scenario)


def test_admissions_read_the_turn_state_metering_wrote(with_project: Backend) -> None:
    async def scenario(store: Store) -> None:
        await lead(store)
        first = await store.admit(digest=None, project_id="acme", now_ms=NOW, count=True,
                                  turn_subject="")
        assert first.turn is not None and (first.turn.live_allocations,
                                           first.turn.relayed_bytes) == (0, 0)
        await Recorder(store)(event(STARTED), event(RELAYED, relayed=700))
        after = await store.admit(digest=None, project_id="acme", now_ms=NOW, count=True,
                                  turn_subject="")
        assert after.turn is not None and (after.turn.live_allocations,
                                           after.turn.relayed_bytes) == (1, 700)
        # Next month the bytes start again; the live allocations do not.
        later = await store.admit(digest=None, project_id="acme",
                                  now_ms=NOW + 40 * 86400 * 1000, count=True, turn_subject="")
        assert later.turn is not None and (later.turn.live_allocations,
                                           later.turn.relayed_bytes) == (1, 0)

    with_project.run(scenario)
