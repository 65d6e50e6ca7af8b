"""Projects, caller keys and rate limits through a real server, on SQLite and on Redis, over
each transport (gRPC, then Connect)."""

from __future__ import annotations

import grpc
import pytest

import icegate
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer, ServerFactory
from harness.raw_connect import connect_status
from icegate.v1 import credentials_pb2, credentials_pb2_grpc


@pytest.fixture
def server(transport: str, server_factory: ServerFactory, store_url: str) -> RunningServer:
    """A real icegate server (frozen clock) on each store backend."""
    return server_factory(store=store_url)


@pytest.fixture
def admin(server):
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        yield client


def project_client(server, admin, project_id, **fields):
    admin.create_project(project_id, **fields)
    secret = admin.create_api_key(project_id, display_name=f"{project_id} web").secret
    return icegate.Client(server.target, secret), secret


def test_project_crud(admin):
    created = admin.create_project("acme", display_name="Acme", rate_limit_requests=50,
                                   rate_limit_window=60, plan="pro",
                                   upgrade_url="https://example.test/upgrade")
    assert (created.rate_limit_requests, created.rate_limit_window.seconds) == (50, 60)
    assert created.turn_ttl_default.seconds == 3600  # unset: the server's default
    assert admin.get_project("acme") == created

    updated = admin.update_project("acme", rate_limit_requests=75, turn_ttl_max=7200)
    assert updated.rate_limit_requests == 75 and updated.turn_ttl_max.seconds == 7200
    assert updated.plan == "pro"  # fields outside the mask are kept

    assert [p.project_id for p in admin.list_all_projects()] == ["acme", "default"]
    admin.delete_project("acme")
    with pytest.raises(icegate.NotFoundError):
        admin.get_project("acme")


def test_project_errors(admin):
    admin.create_project("taken")
    with pytest.raises(icegate.AlreadyExistsError):
        admin.create_project("taken")
    with pytest.raises(icegate.InvalidArgumentError) as caught:
        admin.create_project("Not_Valid")
    assert caught.value.field_violations[0].field == "project_id"
    with pytest.raises(icegate.InvalidArgumentError) as caught:
        admin.create_project("bad-limit", rate_limit_requests=0)
    assert caught.value.field_violations[0].field == "rate_limit_requests"
    with pytest.raises(icegate.InvalidArgumentError) as caught:
        admin.update_project("taken", turn_ttl_default=10**6)
    assert caught.value.field_violations[0].field == "turn_ttl_default"
    with pytest.raises(icegate.NotFoundError):
        admin.update_project("missing", plan="x")


def test_list_projects_pages(admin):
    for index in range(5):
        admin.create_project(f"p{index}")
    first = admin.list_projects(page_size=2)
    assert [p.project_id for p in first.projects] == ["default", "p0"]
    second = admin.list_projects(page_size=2, page_token=first.next_page_token)
    assert [p.project_id for p in second.projects] == ["p1", "p2"]
    with pytest.raises(icegate.InvalidArgumentError):
        admin.list_projects(page_token="not-a-token!")


def test_list_api_keys_pages_and_a_deleted_project_leaves_no_key(server, admin):
    admin.create_project("paged")
    created = [admin.create_api_key("paged", display_name=f"k{n}").api_key for n in range(5)]
    admin.revoke_api_key(created[1].key_id)
    every = admin.list_all_api_keys("paged")
    # Oldest first; keys made within one tick of the clock are in key id order.
    assert sorted(k.display_name for k in every) == [f"k{n}" for n in range(5)]
    assert every == sorted(every, key=lambda k: (k.create_time.ToNanoseconds(), k.key_id))
    first = admin.list_api_keys("paged", page_size=2)
    assert list(first.api_keys) == every[:2]
    second = admin.list_api_keys("paged", page_size=2, page_token=first.next_page_token)
    assert list(second.api_keys) == every[2:4]
    assert admin.list_api_keys("paged").next_page_token == ""  # 5 keys: one default page
    with pytest.raises(icegate.InvalidArgumentError) as caught:
        admin.list_api_keys("paged", page_size=-1)
    assert caught.value.field_violations[0].field == "page_size"
    admin.create_project("other")
    with pytest.raises(icegate.InvalidArgumentError) as caught:
        admin.list_api_keys("other", page_token=first.next_page_token)
    assert caught.value.field_violations[0].field == "page_token"

    secret = admin.create_api_key("paged").secret
    admin.delete_project("paged")
    admin.create_project("paged")
    assert admin.list_all_api_keys("paged") == []
    with icegate.Client(server.target, secret) as old_tenant, \
            pytest.raises(icegate.AuthenticationError):
        old_tenant.get_ice_servers("u1")


def test_key_is_shown_once_and_stored_as_digest_only(server, admin):
    admin.create_project("acme")
    created = admin.create_api_key("acme", display_name="web")
    assert created.secret.startswith(f"igk_{created.api_key.key_id}_")
    listed = admin.list_all_api_keys("acme")
    assert [k.key_id for k in listed] == [created.api_key.key_id]
    assert created.secret not in str(listed)
    if server.settings.store_url.startswith("sqlite"):
        database = (server.settings.data_dir / "icegate.sqlite3").read_bytes()
        assert created.secret.encode() not in database


def test_credential_usernames_bind_the_project(server, admin):
    client, _ = project_client(server, admin, "acme")
    with client:
        username = client.issue_turn_credentials("alice").username
    assert username.split(":", 1)[1] == "acme/alice"
    other = admin.issue_turn_credentials("alice", project_id="default").username
    assert other != username


def test_project_ttl_policy(server, admin):
    client, _ = project_client(server, admin, "short", turn_ttl_default=300, turn_ttl_max=600)
    with client:
        assert client.issue_turn_credentials("a").ttl.seconds == 300
        assert client.issue_turn_credentials("a", ttl=600).ttl.seconds == 600
        with pytest.raises(icegate.InvalidArgumentError):
            client.issue_turn_credentials("a", ttl=601)


class TestAuthorizationMatrix:
    def call(self, server, metadata):
        request = credentials_pb2.IssueTurnCredentialsRequest(user_id="u", project_id="acme")
        if server.transport == "connect":
            return connect_status(server.http_url, request, metadata)
        with grpc.insecure_channel(server.target) as channel:
            stub = credentials_pb2_grpc.CredentialServiceStub(channel)
            try:
                stub.IssueTurnCredentials(request, metadata=metadata, timeout=5)
            except grpc.RpcError as error:
                return error.code()
        return grpc.StatusCode.OK

    def test_matrix(self, server, admin):
        admin.create_project("acme")
        admin.create_project("other")
        acme_key = admin.create_api_key("acme").secret
        other_key = admin.create_api_key("other").secret
        stored_admin = admin.create_api_key(admin=True).secret
        revoked = admin.create_api_key("acme")
        admin.revoke_api_key(revoked.api_key.key_id)

        def bearer(key):
            return (("authorization", f"Bearer {key}"),)

        cases = {
            "no key": ((), grpc.StatusCode.UNAUTHENTICATED),
            "malformed header": ((("authorization", acme_key),), grpc.StatusCode.UNAUTHENTICATED),
            "wrong key": (bearer("igk_nope_" + "x" * 40), grpc.StatusCode.UNAUTHENTICATED),
            "revoked key": (bearer(revoked.secret), grpc.StatusCode.UNAUTHENTICATED),
            "key for another project": (bearer(other_key), grpc.StatusCode.PERMISSION_DENIED),
            "project key": (bearer(acme_key), grpc.StatusCode.OK),
            "stored admin key": (bearer(stored_admin), grpc.StatusCode.OK),
            "static admin key": (bearer(TEST_ADMIN_KEY), grpc.StatusCode.OK),
        }
        outcomes = {name: self.call(server, metadata) for name, (metadata, _) in cases.items()}
        assert outcomes == {name: expected for name, (_, expected) in cases.items()}

    def test_project_key_cannot_administer(self, server, admin):
        client, _ = project_client(server, admin, "acme")
        with client, pytest.raises(icegate.ProjectForbiddenError):
            client.create_project("sneaky")

    def test_stored_admin_key_administers(self, server, admin):
        secret = admin.create_api_key(admin=True, display_name="ops").secret
        with icegate.Client(server.target, secret) as ops:
            ops.create_project("from-ops")
            assert ops.get_project("from-ops").project_id == "from-ops"
        assert [k.admin for k in admin.list_all_api_keys()] == [True]

    def test_unknown_project_is_not_found(self, admin):
        with pytest.raises(icegate.NotFoundError):
            admin.issue_turn_credentials("u", project_id="nope")

    def test_deleting_a_project_revokes_its_keys(self, server, admin):
        client, _ = project_client(server, admin, "doomed")
        with client:
            client.issue_turn_credentials("u")
            admin.delete_project("doomed")
            with pytest.raises(icegate.AuthenticationError):
                client.issue_turn_credentials("u")


class TestRateLimit:
    def test_burst_then_refused_with_reset_time(self, server, admin):
        client, _ = project_client(server, admin, "acme", rate_limit_requests=4,
                                   rate_limit_window=60)
        with client:
            for _ in range(4):
                client.issue_turn_credentials("u")
            with pytest.raises(icegate.RateLimitedError) as caught:
                client.get_ice_servers("u")
        error = caught.value
        assert error.limit == 4
        # GCRA: one request comes back every 60/4 = 15 s.
        assert error.retry_after.total_seconds() == 15
        assert error.reset_at.timestamp() == server.clock.now() + 15

    def test_window_edge_lets_exactly_one_more_through(self, server, admin):
        client, _ = project_client(server, admin, "acme", rate_limit_requests=4,
                                   rate_limit_window=60)
        with client:
            for _ in range(4):
                client.issue_turn_credentials("u")
            server.clock.advance(14.999)
            with pytest.raises(icegate.RateLimitedError):
                client.issue_turn_credentials("u")
            server.clock.advance(0.001)
            client.issue_turn_credentials("u")
            with pytest.raises(icegate.RateLimitedError):
                client.issue_turn_credentials("u")
            server.clock.advance(60)  # a whole window idle: the full burst is back
            for _ in range(4):
                client.issue_turn_credentials("u")
            with pytest.raises(icegate.RateLimitedError):
                client.issue_turn_credentials("u")

    def test_projects_are_isolated(self, server, admin):
        first, _ = project_client(server, admin, "first", rate_limit_requests=2)
        second, _ = project_client(server, admin, "second", rate_limit_requests=2)
        with first, second:
            first.issue_turn_credentials("u")
            first.issue_turn_credentials("u")
            with pytest.raises(icegate.RateLimitedError):
                first.issue_turn_credentials("u")
            second.issue_turn_credentials("u")
            second.issue_turn_credentials("u")

    def test_refused_calls_do_not_count(self, server, admin):
        client, _ = project_client(server, admin, "acme", rate_limit_requests=2,
                                   rate_limit_window=10)
        with client:
            client.issue_turn_credentials("u")
            client.issue_turn_credentials("u")
            for _ in range(5):
                with pytest.raises(icegate.RateLimitedError):
                    client.issue_turn_credentials("u")
            server.clock.advance(5)
            client.issue_turn_credentials("u")

    def test_forbidden_calls_do_not_count_against_the_named_project(self, server, admin):
        victim, _ = project_client(server, admin, "victim", rate_limit_requests=1)
        attacker, _ = project_client(server, admin, "attacker")
        with victim, attacker:
            for _ in range(3):
                with pytest.raises(icegate.ProjectForbiddenError):
                    attacker.issue_turn_credentials("u", project_id="victim")
            victim.issue_turn_credentials("u")

    def test_usage_reports_the_window(self, server, admin):
        client, _ = project_client(server, admin, "acme", rate_limit_requests=10,
                                   rate_limit_window=100, plan="pro",
                                   upgrade_url="https://example.test/up")
        with client:
            for _ in range(3):
                client.issue_turn_credentials("u")
            usage = client.get_usage()
            again = client.get_usage()  # usage reports are not counted
        assert usage == again
        rate = usage.rate_limit
        assert (rate.limit, rate.window.seconds, rate.used, rate.remaining) == (10, 100, 3, 7)
        assert rate.reset_time.seconds == int(server.clock.now()) + 30
        assert (usage.plan, usage.upgrade_url) == ("pro", "https://example.test/up")
        assert usage.project_id == "acme"
