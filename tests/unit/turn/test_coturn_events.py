"""coturn's stats messages, parsed as hostile text: what coturn 4.6.1 sends is read exactly,
anything else is refused, and only usernames icegate signs are attributed."""

from __future__ import annotations

import pytest

from icegate_server.turn.coturn_events import (
    EventKind,
    TurnUsername,
    parse_counters,
    parse_event,
    parse_status_key,
    parse_turn_username,
)

USER = "1796558825:acme/alice"
BASE = f"turn/realm/example.test/user/{USER}/allocation/001000000000000003"


@pytest.mark.parametrize(("topic", "message", "kind", "relayed", "lifetime"), [
    # Messages as coturn 4.6.1 published them in this repository's tests.
    ("status", "new lifetime=777, type=UDP, local=127.0.0.1:13478, remote=127.0.0.1:33077, "
     "ssl=NONE, cipher=NONE", EventKind.NEW, 0, 777),
    ("status", "refreshed lifetime=0, type=UDP, local=127.0.0.1:13478, "
     "remote=127.0.0.1:37863, ssl=NONE, cipher=NONE", EventKind.REFRESHED, 0, 0),
    ("status", "deleted", EventKind.DELETED, 0, 0),
    ("traffic", "rcvp=452, rcvb=91588, sentp=162, sentb=32232", EventKind.TRAFFIC,
     91588 + 32232, 0),
    ("traffic/peer", "rcvp=155, rcvb=31000, sentp=445, sentb=89000", EventKind.PEER_TRAFFIC,
     120000, 0),
    ("total_traffic", "rcvp=13, rcvb=1484, sentp=13, sentb=1228", EventKind.TOTAL, 2712, 0),
    ("total_traffic/peer", "rcvp=5, rcvb=500, sentp=5, sentb=500", EventKind.PEER_TOTAL, 1000,
     0),
])
def test_what_coturn_sends_is_read_exactly(topic: str, message: str, kind: EventKind,
                                           relayed: int, lifetime: int) -> None:
    event = parse_event(f"{BASE}/{topic}", message)
    assert event is not None
    assert (event.kind, event.relayed_bytes, event.lifetime) == (kind, relayed, lifetime)
    assert event.username == USER
    assert event.allocation == f"001000000000000003 {USER}"


def test_channels_without_a_realm_are_read_too() -> None:
    event = parse_event(f"turn/user/{USER}/allocation/7/status", "deleted")
    assert event is not None and event.allocation == f"7 {USER}"


def test_a_username_holding_the_channel_layout_ends_where_coturn_ends_it() -> None:
    # The id and topic are always the channel's last parts; what comes before is the username.
    username = "1:acme/x/allocation/9/status"
    event = parse_event(f"turn/realm/r/user/{username}/allocation/5/status", "deleted")
    assert event is not None
    assert (event.username, event.allocation) == (username, f"5 {username}")


@pytest.mark.parametrize(("channel", "message"), [
    (f"{BASE}/status", "created lifetime=1"),
    (f"{BASE}/status", "new lifetime=-1"),
    (f"{BASE}/status", "new lifetime=1e9"),
    (f"{BASE}/status", "deleted "),
    (f"{BASE}/status", "Deleted"),
    (f"{BASE}/traffic", "rcvp=1, rcvb=2, sentp=3"),
    (f"{BASE}/traffic", "rcvp=1, rcvb=-2, sentp=3, sentb=4"),
    (f"{BASE}/traffic", "rcvp=1, rcvb=2, sentp=3, sentb=4, "),
    (f"{BASE}/traffic", "rcvb=99999999999999999999, sentb=1"),
    (f"{BASE}/traffic", "rcvb=0x10, sentb=1"),
    (f"{BASE}/traffic", "rcvb=١٢٣, sentb=1"),  # non-ASCII digits
    (f"{BASE}/traffic", "rcvb=1;DROP, sentb=1"),
    (f"{BASE}/traffic", ""),
    (f"{BASE}/traffic/peers", "rcvb=1, sentb=1"),
    (f"{BASE}/status/extra", "deleted"),
    (f"turn/realm/r/user/{USER}/allocation/abc/status", "deleted"),
    (f"turn/realm/r/user/{USER}/allocation//status", "deleted"),
    ("turn/realm/r/user//allocation/1/status", "deleted"),
    (f"turn/realm//user/{USER}/allocation/1/status", "deleted"),
    (f"xturn/realm/r/user/{USER}/allocation/1/status", "deleted"),
    (f"{BASE}/status\n", "deleted"),
    (f"turn/realm/r/user/{'x' * 2000}/allocation/1/status", "deleted"),
    (f"{BASE}/status", "new lifetime=1, " + "x" * 1000),
    ("", ""),
])
def test_anything_else_is_refused(channel: str, message: str) -> None:
    assert parse_event(channel, message) is None


@pytest.mark.parametrize(("username", "expected"), [
    ("1796558825:acme/alice", TurnUsername(1796558825, "acme", "alice")),
    ("1:a/b/c d", TurnUsername(1, "a", "b/c d")),
    ("1796558825:acme/ses_abcdEFGH-_12", TurnUsername(1796558825, "acme", "ses_abcdEFGH-_12")),
    ("1796558825:acme/élève", TurnUsername(1796558825, "acme", "élève")),
])
def test_usernames_icegate_signs_are_attributed(username: str, expected: TurnUsername) -> None:
    assert parse_turn_username(username) == expected


@pytest.mark.parametrize("username", [
    "1796558825:acme",                 # no user part
    "1796558825:acme/",                # empty user id
    "1796558825:Acme/alice",           # not a project id
    "1796558825:ac_me/alice",
    "alice:acme/bob",                  # not an expiry
    "1796558825:acme/a:b",             # the separator in the user id
    "1796558825:acme/ alice",          # a leading space
    "1796558825:acme/alice\n",         # a control character
    "1796558825:acme/al\x00ice",
    "1796558825:acme/" + "x" * 257,    # longer than icegate issues
    "-1:acme/alice",
    "1796558825acme/alice",
    "",
])
def test_other_usernames_are_not_attributed(username: str) -> None:
    assert parse_turn_username(username) is None


def test_counters_need_both_byte_counts() -> None:
    assert parse_counters("rcvb=1, sentb=2") == {"rcvb": 1, "sentb": 2}
    assert parse_counters("rcvp=1, sentp=2") is None


def test_status_keys_name_the_allocations_coturn_lists() -> None:
    assert parse_status_key(f"{BASE}/status") == (f"001000000000000003 {USER}", USER)
    assert parse_status_key(f"{BASE}/traffic") is None
    assert parse_status_key("turn/realm/r/user/u/allocation/x/status") is None
