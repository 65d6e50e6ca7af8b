"""Look-alike identifiers through the real server: an id with a trailing newline (which `$`
under `re.match` let through) is refused INVALID_FIELD, naming the field, and creates nothing.
"""

from __future__ import annotations

import pytest

import icegate
from harness.icegate_server import TEST_ADMIN_KEY

FAST = 5.0


@pytest.fixture(scope="module")
def admin(module_server_factory):
    with icegate.Client(module_server_factory().target, TEST_ADMIN_KEY) as client:
        client.create_project("acme", timeout=FAST)
        yield client


def assert_invalid_field(caught: pytest.ExceptionInfo[icegate.InvalidArgumentError],
                         field: str) -> None:
    assert caught.value.reason == "INVALID_FIELD"
    assert [violation.field for violation in caught.value.field_violations] == [field]


@pytest.mark.parametrize("project_id", ["acme\n", "acme ", " acme", "acme\x00",
                                        "\u0430cme",  # Cyrillic a
                                        "a" * 63 + "\n", "a" * 64])
def test_a_look_alike_project_id_is_not_created(admin, project_id):
    with pytest.raises(icegate.InvalidArgumentError) as caught:
        admin.create_project(project_id, timeout=FAST)
    assert_invalid_field(caught, "project_id")
    listed = [project.project_id for project in admin.list_projects(timeout=FAST).projects]
    assert sorted(listed) == ["acme", "default"]


def test_the_longest_project_id_is_created(admin):
    longest = "b" * 63
    admin.create_project(longest, timeout=FAST)
    credential = admin.issue_turn_credentials("alice", project_id=longest, timeout=FAST)
    assert credential.username.endswith(f":{longest}/alice")
    admin.delete_project(longest, timeout=FAST)


def test_a_call_naming_a_look_alike_project_is_refused(admin):
    with pytest.raises(icegate.InvalidArgumentError) as caught:
        admin.issue_turn_credentials("alice", project_id="acme\n", timeout=FAST)
    assert_invalid_field(caught, "project_id")


@pytest.mark.parametrize("user_id", ["alice\n", "alice ", " alice", "ali\x00ce"])
def test_a_look_alike_user_id_gets_no_credential(admin, user_id):
    with pytest.raises(icegate.InvalidArgumentError) as caught:
        admin.issue_turn_credentials(user_id, project_id="acme", timeout=FAST)
    assert_invalid_field(caught, "user_id")


@pytest.mark.parametrize("session_id", ["ses_AAAAAAAAAAAAAAAAAAAAAA\n",
                                        "ses_AAAAAAAAAAAAAAAAAAAAAA ", "ses_AAAA\x00AAAA"])
def test_a_look_alike_session_id_is_refused(admin, session_id):
    for call in (admin.keep_alive_session, admin.end_session):
        with pytest.raises(icegate.InvalidArgumentError) as caught:
            call(session_id, project_id="acme", timeout=FAST)
        assert_invalid_field(caught, "session_id")


def test_a_look_alike_key_id_is_refused(admin):
    key = admin.create_api_key("acme", timeout=FAST)
    with pytest.raises(icegate.InvalidArgumentError) as caught:
        admin.revoke_api_key(key.api_key.key_id + "\n", timeout=FAST)
    assert_invalid_field(caught, "key_id")
