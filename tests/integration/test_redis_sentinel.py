"""The Redis store on a Sentinel-managed master (`ICEGATE_STORE=redis+sentinel://...`).

Real processes: a primary, a replica and three redis-sentinel (tests/harness/
redis_sentinel.py), with a 400 ms down-after. What a caller sees in a failover: calls fail
UNAVAILABLE while there is no master, and only then; they resume by themselves on the new
master, with no restart. What asynchronous replication loses in one: nothing the replica had
received, everything it had not (docs/RELIABILITY.md, "Redis Sentinel", has the figures).
The URL is checked before anything starts, with a message that never repeats a password.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import icegate
from harness.icegate_server import TEST_ADMIN_KEY, ServerFactory
from harness.pki import TestCA
from harness.pytest_plugin import require_binaries
from harness.redis_sentinel import MASTER_NAME, SentinelGroup
from icegate_server.errors import StoreUnavailableError
from icegate_server.projects.records import Project
from icegate_server.settings import ConfigError, load_settings
from icegate_server.store.base import AdmitOutcome, ProviderKeyRecord, SessionOutcome, month_of
from icegate_server.store.redis import RedisStore
from icegate_server.store.sentinel_url import parse_sentinel_url

PASSWORD = "s3cr%t/p@ss"
"""A password that needs percent-encoding in a URL (as `s3cr%25t%2Fp%40ss`)."""
ENCODED_PASSWORD = "s3cr%25t%2Fp%40ss"
SENTINEL_PASSWORD = "sentinel-pass-0123"
NOW = 1_700_000_000_000
MONTH = month_of(NOW)


redis = pytest.mark.redis


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    """A fresh primary, replica and three sentinels (0.2-1.4 s to start and settle)."""
    require_binaries("redis-server", "redis-sentinel")
    with SentinelGroup() as started:
        yield started


# -- a failover under load, through the gRPC server --------------------------------------


async def issue_until(target: str, key: str, group: SentinelGroup,
                      ) -> tuple[list[tuple[float, str]], float, float]:
    """Issues credentials one call after another; pauses the master after 20 successes and
    goes on until 50 calls succeeded after the sentinels named the new one.

    Returns each call's (start, outcome: "ok" or the status and reason), when the master was
    paused and when the test first saw every sentinel name the new master."""
    # No client-side retry: every UNAVAILABLE the server answers is counted.
    channel = grpc.aio.insecure_channel(target, options=[("grpc.enable_retries", 0)])
    outcomes: list[tuple[float, str]] = []
    paused_at = switched_at = 0.0
    switch: asyncio.Task[object] | None = None
    async with icegate.AsyncClient(target, key, channel=channel) as client:
        while True:
            started = time.monotonic()
            try:
                await client.issue_turn_credentials("user-1", timeout=5)
                outcomes.append((started, "ok"))
            except icegate.IcegateError as error:
                outcomes.append((started, f"{error.code.name} {error.reason}"))
            if switch is None and len(outcomes) == 20:
                old = group.master
                paused_at = time.monotonic()
                old.pause()
                switch = asyncio.ensure_future(asyncio.to_thread(group.wait_for_failover, old))
            if switch is not None and switch.done() and not switched_at:
                switch.result()
                switched_at = time.monotonic()
            after = [outcome for at, outcome in outcomes if switched_at and at > switched_at]
            # 50 successes after the switch; or, if the calls do not come back, 1000 calls
            # (the assertions then say what they saw).
            if after.count("ok") >= 50 or len(after) >= 1000:
                return outcomes, paused_at, switched_at
            await asyncio.sleep(0.005)


@redis
def test_calls_fail_unavailable_during_a_failover_only_and_resume_by_themselves(
        group: SentinelGroup, server_factory: ServerFactory) -> None:
    server = server_factory(store=group.url, store_timeout=0.5)
    with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.create_project("live", rate_limit_requests=1_000_000, rate_limit_window=3600)
        key = admin.create_api_key("live").secret
    old_master = group.master

    outcomes, paused_at, switched_at = asyncio.run(issue_until(server.target, key, group))

    failed = [(at, outcome) for at, outcome in outcomes if outcome != "ok"]
    print(f"\nfailover: {switched_at - paused_at:.2f} s from the pause to every sentinel naming "
          f"the new master; {len(failed)} calls failed, from "
          f"{failed[0][0] - paused_at:+.2f} s to {failed[-1][0] - paused_at:+.2f} s")
    # The failover reached the server's store (the paused master was in use), ...
    assert failed, "no call failed: the paused master was not the one in use"
    # ... every failure was UNAVAILABLE, store unavailable (a caller may retry it), ...
    assert {outcome for _, outcome in failed} == {"UNAVAILABLE STORE_UNAVAILABLE"}
    # ... none came before the master stopped, nor once the sentinels had named the new one:
    # the outage is within the failover.
    assert all(paused_at <= at < switched_at for at, _ in failed)
    # Once calls succeed again, they keep succeeding: no stale connection to the old master.
    first_back = next(at for at, outcome in outcomes if at > paused_at and outcome == "ok")
    assert all(outcome == "ok" for at, outcome in outcomes if at >= first_back)

    # The old master wakes up still believing it is the master (the sentinels demote it some
    # seconds later): the server keeps to the one the sentinels name, and writes nothing to
    # the old one (no split brain).
    old_master.resume()
    before = old_master.command("GET", "icegate:rl:live")
    with icegate.Client(server.target, key) as caller:
        for _ in range(5):
            caller.issue_turn_credentials("user-1")
    assert old_master.command("GET", "icegate:rl:live") == before
    assert group.master.command("GET", "icegate:rl:live") != before


# -- what a failover loses -----------------------------------------------------------------


async def write_burst(store: RedisStore, first: int, count: int) -> None:
    """`count` admissions (rate counter) and sessions begun and confirmed (a quota unit and
    a lease each), numbered from `first`."""
    for number in range(first, first + count):
        admission = await store.admit(digest=None, project_id="alpha", now_ms=NOW, count=True)
        assert admission.outcome is AdmitOutcome.ADMITTED
        session = f"s{number}"
        began = await store.begin_session(
            project_id="alpha", session_id=session, month=MONTH, now_ms=NOW,
            pending_ms=60_000, quota=1000, max_concurrent=1000, provider="openai")
        assert began.outcome is SessionOutcome.STARTED
        assert await store.confirm_session(project_id="alpha", session_id=session,
                                           month=MONTH, now_ms=NOW, lease_ms=600_000)


async def held(store: RedisStore) -> tuple[int, int, int]:
    """What the master holds: (admissions counted, quota units, live leases)."""
    tat = await store.rate_position("alpha")
    used, active = await store.session_counts(project_id="alpha", month=MONTH, now_ms=NOW)
    interval = 3600  # ms: 1000 calls an hour
    return ((tat - NOW) // interval if tat is not None else 0), used, active


async def seed(store: RedisStore) -> None:
    """Project alpha, with an OpenAI key to begin sessions with."""
    await store.create_project(Project("alpha", rate_limit_requests=1000,
                                       rate_limit_window_seconds=3600))
    await store.put_provider_key(ProviderKeyRecord("alpha", "openai", b"k", "abcd", 1))


async def held_after_failover(store: RedisStore) -> tuple[int, int, int]:
    """`held`, once the store's calls reach the new master (up to 5 s of UNAVAILABLE)."""
    for _ in range(100):
        try:
            return await held(store)
        except StoreUnavailableError:
            await asyncio.sleep(0.05)
    return await held(store)


async def renewable(store: RedisStore, session_id: str) -> bool:
    """Whether the session's lease is live (KeepAliveSession would renew it)."""
    return await store.renew_session(project_id="alpha", session_id=session_id, now_ms=NOW,
                                     lease_ms=600_000)


@redis
@pytest.mark.parametrize("cut_off", [False, True], ids=["replica-in-sync", "replica-cut-off"])
def test_what_a_failover_keeps_is_what_the_replica_had_received(group: SentinelGroup,
                                                                 cut_off: bool) -> None:
    """Ten of everything, then (the replica cut off, or not) ten more and ten sessions
    ended, then the master is killed right after its last reply and the replica promoted."""
    async def scenario() -> tuple[tuple[int, int, int], bool, bool]:
        store = await RedisStore.open(group.url, timeout=0.5)
        try:
            await seed(store)
            await write_burst(store, 0, 10)
            assert await held(store) == (10, 10, 10)
            if cut_off:
                await asyncio.to_thread(group.cut_off_replica)
            await write_burst(store, 10, 10)
            for number in range(10):  # leases given back
                assert await store.end_session(project_id="alpha", session_id=f"s{number}",
                                               now_ms=NOW)
            assert await held(store) == (20, 20, 10)
            killed = group.kill_master()
            await asyncio.to_thread(group.wait_for_failover, killed)
            # The same store, with no reopen, reads the new master.
            counts = await held_after_failover(store)
            return counts, await renewable(store, "s0"), await renewable(store, "s10")
        finally:
            await store.close()

    (admissions, units, leases), ended_is_back, new_is_live = asyncio.run(scenario())
    print(f"\nafter the failover: {admissions}/20 admissions, {units}/20 quota units, "
          f"{leases} live leases (10 expected with nothing lost)")
    if cut_off:
        # Everything since the cut is lost: ten admissions and ten quota units; the ten
        # sessions begun lose their leases (KeepAliveSession answers NOT_FOUND), the ten
        # ended hold theirs again (until they expire).
        assert (admissions, units, leases) == (10, 10, 10)
        assert (ended_is_back, new_is_live) == (True, False)
    else:
        assert (admissions, units, leases) == (20, 20, 10)
        assert (ended_is_back, new_is_live) == (False, True)


@redis
def test_min_replicas_to_write_refuses_unavailable_what_the_replica_would_not_get(
        group: SentinelGroup) -> None:
    """The master configured to accept writes only while a replica is connected and
    acknowledged within 1 s: once the replica is cut off, writes fail UNAVAILABLE instead of
    being acknowledged and then lost in a failover."""
    group.master.command("CONFIG", "SET", "min-replicas-to-write", "1")
    group.master.command("CONFIG", "SET", "min-replicas-max-lag", "1")

    async def scenario() -> tuple[str, tuple[int, int, int]]:
        store = await RedisStore.open(group.url, timeout=0.5)
        try:
            await seed(store)
            await write_burst(store, 0, 10)
            await asyncio.to_thread(group.cut_off_replica)
            with pytest.raises(StoreUnavailableError) as refused:
                await write_burst(store, 10, 1)
            killed = group.kill_master()
            await asyncio.to_thread(group.wait_for_failover, killed)
            return refused.value.message, await held_after_failover(store)
        finally:
            await store.close()

    refusal, kept = asyncio.run(scenario())
    assert refusal.startswith("Redis store unavailable: ResponseError: NOREPLICAS")
    assert kept == (10, 10, 10)  # everything acknowledged, nothing more


# -- authentication ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_group() -> Iterator[SentinelGroup]:
    """A group whose master knows the user `icegate` and whose sentinels need a password
    (shared: these tests only connect)."""
    require_binaries("redis-server", "redis-sentinel")
    with SentinelGroup(user=("icegate", PASSWORD),
                       sentinel_password=SENTINEL_PASSWORD) as started:
        yield started


def sentinel_url(group: SentinelGroup, userinfo: str, query: str = "") -> str:
    hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in group.sentinels)
    return f"redis+sentinel://{userinfo}{hosts}/{MASTER_NAME}{query}"


def open_and_close(url: str) -> None:
    async def main() -> None:
        store = await RedisStore.open(url, timeout=0.5)
        await store.ping()
        await store.close()

    asyncio.run(main())


@redis
def test_the_master_and_the_sentinels_authenticate_with_the_urls_passwords(
        auth_group: SentinelGroup) -> None:
    open_and_close(sentinel_url(auth_group, f"icegate:{ENCODED_PASSWORD}@",
                                f"?sentinel_password={SENTINEL_PASSWORD}"))


@redis
@pytest.mark.parametrize(("userinfo", "query", "problem"), [
    ("icegate:wrong-password@", f"?sentinel_password={SENTINEL_PASSWORD}",
     "AuthenticationError"),
    (f"icegate:{ENCODED_PASSWORD}@", "", "MasterNotFoundError"),
    (f"icegate:{ENCODED_PASSWORD}@", "?sentinel_password=wrong-sentinel-pass",
     "MasterNotFoundError"),
], ids=["master-password-wrong", "sentinel-password-missing", "sentinel-password-wrong"])
def test_refused_authentication_is_unavailable_and_names_no_password(
        auth_group: SentinelGroup, userinfo: str, query: str, problem: str) -> None:
    with pytest.raises(StoreUnavailableError) as caught:
        open_and_close(sentinel_url(auth_group, userinfo, query))
    message = caught.value.message
    assert message.startswith(f"Redis store unavailable: {problem}")
    for secret in (PASSWORD, ENCODED_PASSWORD, SENTINEL_PASSWORD, "wrong-password",
                   "wrong-sentinel-pass"):
        assert secret not in message


@redis
def test_a_master_name_the_sentinels_do_not_know_is_unavailable(group: SentinelGroup) -> None:
    with pytest.raises(StoreUnavailableError) as caught:
        open_and_close(group.url.replace(f"/{MASTER_NAME}", "/unknown-master"))
    assert caught.value.message == ("Redis store unavailable: MasterNotFoundError: "
                                    "No master found for 'unknown-master'")


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture
def tls_group(tmp_path: Path) -> Iterator[tuple[SentinelGroup, TestCA]]:
    """A group whose servers and sentinels speak TLS (certificates of a test CA)."""
    require_binaries("redis-server", "redis-sentinel")
    ca = TestCA(tmp_path / "pki")
    server = ca.issue_server()
    with SentinelGroup(tls=(ca.cert, server.cert, server.key)) as started:
        yield started, ca


@redis
def test_rediss_sentinel_reaches_the_master_and_the_sentinels_over_tls(
        tls_group: tuple[SentinelGroup, TestCA], tmp_path: Path) -> None:
    group, _ = tls_group
    assert group.url.startswith("rediss+sentinel://")

    async def scenario() -> tuple[int, int, int]:
        store = await RedisStore.open(group.url, timeout=0.5)
        try:
            await seed(store)
            await write_burst(store, 0, 5)  # admissions: the hiredis protocol over TLS
            return await held(store)
        finally:
            await store.close()

    assert asyncio.run(scenario()) == (5, 5, 5)
    # A CA that did not sign the servers' certificates: refused, UNAVAILABLE.
    other_ca = TestCA(tmp_path / "other", name="another CA")
    with pytest.raises(StoreUnavailableError) as caught:
        open_and_close(group.url.replace(group.tls[0] if group.tls else "", other_ca.cert))
    assert "certificate verify failed" in caught.value.message


# -- the URL, checked at start -------------------------------------------------------------


def test_a_sentinel_url_is_parsed_into_its_parts() -> None:
    url = parse_sentinel_url(
        f"rediss+sentinel://icegate:{ENCODED_PASSWORD}@10.0.0.1:26379,[::1]:26380,"
        f"sentinel-c.internal:26381/primary-1/3?sentinel_password=p%26w"
        f"&ssl_ca_certs=/etc/icegate/ca.pem")
    assert url.sentinels == (("10.0.0.1", 26379), ("::1", 26380),
                             ("sentinel-c.internal", 26381))
    assert (url.master_name, url.db, url.tls) == ("primary-1", 3, True)
    assert (url.username, url.password, url.sentinel_password) == ("icegate", PASSWORD, "p&w")
    assert url.tls_files == (("ssl_ca_certs", "/etc/icegate/ca.pem"),)
    # The userinfo ends at the last @; a : or , in the password needs no encoding.
    plain = parse_sentinel_url("redis+sentinel://:pa:ss,w@rd@h1:26379/icegate")
    assert (plain.username, plain.password, plain.sentinels) == (None, "pa:ss,w@rd",
                                                                 (("h1", 26379),))
    assert (plain.master_name, plain.db, plain.tls) == ("icegate", 0, False)


@pytest.mark.parametrize(("url", "problem"), [
    ("redis+sentinel:///icegate", "sentinel 1: needs host:port (none given)"),
    (f"redis+sentinel://:{PASSWORD}@/icegate", None),
    ("redis+sentinel://h1:26379,,h2:26379/icegate", "sentinel 2: empty"),
    ("redis+sentinel://h1/icegate", "sentinel 1: needs host:port (no port given)"),
    ("redis+sentinel://h1:0/icegate", "sentinel 1: the port must be a number from 1 to 65535"),
    ("redis+sentinel://h1:65536/icegate", "sentinel 1: the port must be"),
    ("redis+sentinel://h1:26379,h2:port/icegate", "sentinel 2: the port must be"),
    ("redis+sentinel://h1:+1/icegate", "sentinel 1: the port must be"),
    ("redis+sentinel://h1:\uff12\uff16\uff13\uff17\uff19/icegate", "printable ASCII"),  # fullwidth
    ("redis+sentinel://h_1!:26379/icegate", "sentinel 1: the host must be"),
    ("redis+sentinel://[::1:26379/icegate", "sentinel 1: the host must be"),
    # An unencoded / in a password: the parts move, and the message still names no password.
    (f"redis+sentinel://user:{PASSWORD}@h1:26379/icegate", None),
    ("redis+sentinel://h1:26379", "needs the master's name"),
    ("redis+sentinel://h1:26379/", "needs the master's name"),
    ("redis+sentinel://h1:26379/ice gate", "printable ASCII without spaces"),
    ("redis+sentinel://h1:26379/-icegate", "the master's name must be"),
    ("redis+sentinel://h1:26379/icegate/zero", "the database"),
    ("redis+sentinel://h1:26379/icegate/0/extra", "the database"),
    ("redis+sentinel://h1:26379/icegate#frag", "without spaces or #"),
    ("redis+sentinel://h1:26379/ice\x7fgate", "control character"),
    (f"redis+sentinel://h1:26379/icegate?password={PASSWORD}", "unknown option"),
    ("redis+sentinel://h1:26379/icegate?ssl_ca_certs=/ca.pem", "unknown option"),
    ("rediss+sentinel://h1:26379/icegate?ssl_ca_certs=ca.pem", "absolute path"),
    ("redis+sentinel://h1:26379/icegate?sentinel_password=", "give it once, with a value"),
    ("redis+sentinel://h1:26379/icegate?sentinel_password=a&sentinel_password=b",
     "give it once"),
    ("redis+sentinel://h1:26379/icegate?novalue", "name=value pairs"),
    ("redis+sentinel://" + ",".join(f"h{i}:26379" for i in range(17)) + "/icegate",
     "more than 16 sentinels"),
    ("sentinel://h1:26379/icegate", "must start with sqlite:///, redis:// or redis+sentinel://"),
])
def test_a_malformed_sentinel_url_stops_the_start_naming_the_part(url: str,
                                                                  problem: str | None) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {"ICEGATE_STORE": url})
    message = str(caught.value)
    assert message.startswith("invalid setting ICEGATE_STORE")
    if problem is not None:
        assert problem in message
    assert "\n" not in message
    for secret in (PASSWORD, ENCODED_PASSWORD, "s3cr"):
        assert secret not in message
