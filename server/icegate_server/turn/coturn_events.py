"""What coturn's `redis-statsdb` publishes about allocations, parsed as hostile text.

coturn 4.6.1 (`src/apps/relay/ns_ioalib_engine_impl.c`, seen on the wire here) publishes, for
each allocation, on channels named after the realm, the username and the allocation id:

    turn/realm/<realm>/user/<username>/allocation/<id>/status
        "new lifetime=600, type=UDP, local=..., remote=..., ssl=NONE, cipher=NONE"
        "refreshed lifetime=600, ..." ("refreshed lifetime=0, ..." when the client ends it)
        "deleted"
    .../allocation/<id>/traffic        "rcvp=13, rcvb=1484, sentp=13, sentb=1228"
    .../allocation/<id>/traffic/peer   the same counters on the relay (peer) side
    .../allocation/<id>/total_traffic  (and /peer) the allocation's totals, once, at deletion

(`turn/user/<username>/...` without the realm when coturn has none.) `<id>` is 18 decimal
digits. A `traffic` message counts what passed since the previous one: coturn sends one every
4096 packets of the session and a last one as the allocation is deleted, then `deleted`, then
the totals. The status text is also kept under the same name as a Redis key while the
allocation lives (coturn deletes every such key when it starts), which is how a meter that
was away finds the allocations alive now.

Everything here is text from outside: the channel is matched whole, the username must be one
icegate signs (`<expiry>:<project>/<user>`, each part by its own rule), the message is split
into `name=value` pairs whose values must be decimal numbers. Anything else is reported as
malformed or unattributed, never attributed to a project.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from icegate_server.errors import InvalidFieldError
from icegate_server.projects.records import PROJECT_ID_PATTERN
from icegate_server.turn.credentials import PROJECT_SEPARATOR, SEPARATOR, validate_user_id

MAX_CHANNEL_CHARS = 1024
"""coturn builds the channel name in a 1024-byte buffer: anything longer is not coturn's."""
MAX_MESSAGE_CHARS = 512
MAX_COUNTER = 2**62
"""The largest counter value believed; coturn's are unsigned longs, far below this in practice."""

STATS_CHANNEL_PATTERNS = ("turn/realm/*/user/*/allocation/*", "turn/user/*/allocation/*")
"""What icegate subscribes to (PSUBSCRIBE): every allocation event, with a realm or without."""
STATUS_KEY_PATTERN = "turn/*/allocation/*/status"
"""The keys coturn keeps while an allocation lives (SCAN MATCH), as coturn itself clears them."""

_CHANNEL = re.compile(
    r"turn/(?:realm/(?P<realm>[^/]{1,255})/)?user/(?P<username>.{1,600})"
    r"/allocation/(?P<id>[0-9]{1,20})"
    r"/(?P<topic>status|traffic|traffic/peer|total_traffic|total_traffic/peer)",
    re.DOTALL)
# The username is taken greedily, so an `/allocation/` inside it cannot end it early: the
# allocation id and the topic are always the channel's last two parts.
_STATUS = re.compile(r"(?P<status>new|refreshed) lifetime=(?P<lifetime>[0-9]{1,12})(?:,.*)?",
                     re.DOTALL)
_COUNTER = re.compile(r"(?P<name>[a-z]{1,8})=(?P<value>[0-9]{1,19})")
_USERNAME = re.compile(
    rf"(?P<expiry>[0-9]{{1,12}}){re.escape(SEPARATOR)}(?P<project>[^{re.escape(PROJECT_SEPARATOR)}]"
    rf"{{1,63}}){re.escape(PROJECT_SEPARATOR)}(?P<user>.+)", re.DOTALL)


class EventKind(enum.Enum):
    """What one coturn message says about an allocation."""

    NEW = "status_new"
    REFRESHED = "status_refreshed"
    DELETED = "status_deleted"
    TRAFFIC = "traffic"
    """Client-side counters since the last report (not what icegate meters)."""
    PEER_TRAFFIC = "traffic_peer"
    """Relay-side counters since the last report: bytes relayed to and from peers."""
    TOTAL = "total_traffic"
    PEER_TOTAL = "total_traffic_peer"
    """Relay-side totals of the whole allocation, sent once as it is deleted."""


EVENT_KINDS = tuple(kind.value for kind in EventKind)
"""Every kind's name (a metric label value)."""


@dataclass(frozen=True)
class TurnUsername:
    """A TURN username icegate signs, read back: `<expiry>:<project id>/<user id>`."""

    expiry: int
    project_id: str
    user_id: str


@dataclass(frozen=True)
class AllocationEvent:
    """One parsed coturn message.

    `allocation` names the allocation uniquely enough to count it once: coturn's id with the
    username (ids start again at each coturn start; a username holds its expiry).
    `relayed_bytes` is received plus sent bytes for traffic messages, 0 otherwise.
    """

    kind: EventKind
    allocation: str
    username: str
    relayed_bytes: int = 0
    lifetime: int = 0


def parse_turn_username(username: str) -> TurnUsername | None:
    """The parts of a username icegate signs, or None for any other username.

    The user id must pass the same rules as when it was issued (`validate_user_id`), so no
    username icegate would refuse to sign is ever attributed.
    """
    match = _USERNAME.fullmatch(username)
    if match is None or not PROJECT_ID_PATTERN.fullmatch(match["project"]):
        return None
    user_id = match["user"]
    try:
        validate_user_id(user_id)
    except InvalidFieldError:
        return None
    return TurnUsername(int(match["expiry"]), match["project"], user_id)


def parse_counters(message: str) -> dict[str, int] | None:
    """`rcvp=1, rcvb=2, sentp=3, sentb=4` as a dict; None unless every part is `name=number`
    and both byte counters are there."""
    counters: dict[str, int] = {}
    for part in message.split(","):
        match = _COUNTER.fullmatch(part.strip())
        if match is None:
            return None
        value = int(match["value"])
        if value > MAX_COUNTER:
            return None
        counters[match["name"]] = value
    if "rcvb" not in counters or "sentb" not in counters:
        return None
    return counters


def parse_event(channel: str, message: str) -> AllocationEvent | None:
    """One pub/sub message as an `AllocationEvent`, or None when it is not one coturn sends.

    The username is not checked here (see `parse_turn_username`): an event of a username
    icegate did not sign is still an event, counted apart.
    """
    if len(channel) > MAX_CHANNEL_CHARS or len(message) > MAX_MESSAGE_CHARS:
        return None
    match = _CHANNEL.fullmatch(channel)
    if match is None:
        return None
    username, topic = match["username"], match["topic"]
    allocation = f"{match['id']} {username}"
    if topic == "status":
        if message == "deleted":
            return AllocationEvent(EventKind.DELETED, allocation, username)
        status = _STATUS.fullmatch(message)
        if status is None:
            return None
        kind = EventKind.NEW if status["status"] == "new" else EventKind.REFRESHED
        return AllocationEvent(kind, allocation, username, lifetime=int(status["lifetime"]))
    counters = parse_counters(message)
    if counters is None:
        return None
    kind = {"traffic": EventKind.TRAFFIC, "traffic/peer": EventKind.PEER_TRAFFIC,
            "total_traffic": EventKind.TOTAL, "total_traffic/peer": EventKind.PEER_TOTAL}[topic]
    return AllocationEvent(kind, allocation, username,
                           relayed_bytes=counters["rcvb"] + counters["sentb"])


def parse_status_key(key: str) -> tuple[str, str] | None:
    """(allocation, username) of a status key coturn keeps while an allocation lives."""
    if len(key) > MAX_CHANNEL_CHARS:
        return None
    match = _CHANNEL.fullmatch(key)
    if match is None or match["topic"] != "status":
        return None
    return f"{match['id']} {match['username']}", match["username"]
