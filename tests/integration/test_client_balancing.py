"""The client balancing per call over the replicas behind one name (`load_balancing=`).

In Kubernetes, `dns:///icegate-headless.<ns>.svc:50051` resolves to every ready pod's address
(deploy/kubernetes/ has that headless Service). Here the same happens without a hosts file or
a cluster: two real icegate servers listen on the same port at 127.0.0.1 and 127.0.0.2 (both
loopback on Linux), and a small DNS server in this module answers the headless name with
both addresses. The client dials `dns://127.0.0.1:<dns port>/<name>:<port>`, gRPC's own DNS
resolver (c-ares) with the DNS server named in the authority, so the client resolves the name
exactly as in a pod, only from another server than resolv.conf's.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

import icegate
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer
from harness.ports import free_tcp_port

HEADLESS_NAME = "icegate-headless.icegate.svc.cluster.local"
REPLICA_ADDRESSES = ("127.0.0.1", "127.0.0.2")
CALLS = 12
MAX_CALLS = 200
"""round_robin picks among the connections that are ready: the first calls may all go to the
address that connected first, so the balancing tests call until every replica has served one
(a bounded count, not a time)."""


class HeadlessServiceDns:
    """A UDP DNS server that answers A queries for one name with several addresses (as
    Kubernetes' DNS answers a headless Service's name with its pods' addresses), an empty
    answer for its other record types, and NXDOMAIN for any other name."""

    def __init__(self, name: str, addresses: tuple[str, ...]) -> None:
        self.name = name
        self.addresses = addresses
        self.queries: list[tuple[str, int]] = []
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True, name="test-dns")
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self._socket.recvfrom(512)
            except OSError:  # closed
                return
            answer = self.answer(query)
            if answer is not None:
                self._socket.sendto(answer, peer)

    def answer(self, query: bytes) -> bytes | None:
        if len(query) < 17:
            return None
        ident = struct.unpack("!H", query[:2])[0]
        position, labels = 12, []
        while position < len(query) and query[position]:
            length = query[position]
            labels.append(query[position + 1:position + 1 + length].decode("ascii", "replace"))
            position += 1 + length
        if position + 5 > len(query):
            return None
        qtype = struct.unpack("!H", query[position + 1:position + 3])[0]
        question = query[12:position + 5]
        name = ".".join(labels).lower()
        self.queries.append((name, qtype))
        records = b""
        rcode = 0 if name == self.name else 3  # NXDOMAIN
        if rcode == 0 and qtype == 1:  # A
            for address in self.addresses:
                # The name as a pointer to the question's, class IN, TTL 5 s, 4 bytes.
                records += struct.pack("!HHHIH", 0xC00C, 1, 1, 5, 4) + socket.inet_aton(address)
        count = len(self.addresses) if records else 0
        # QR, AA, RD, RA and the rcode; one question, `count` answers.
        header = struct.pack("!HHHHHH", ident, 0x8580 | rcode, 1, count, 0, 0)
        return header + question + records

    def close(self) -> None:
        self._socket.close()


@pytest.fixture(scope="module")
def replicas(module_server_factory, tmp_path_factory) -> list[RunningServer]:
    """Two icegate servers on one port, at 127.0.0.1 and 127.0.0.2 (each its own store)."""
    port = free_tcp_port()
    return [module_server_factory(data_dir=tmp_path_factory.mktemp(f"replica{index}"),
                                  listen=f"{address}:{port}")
            for index, address in enumerate(REPLICA_ADDRESSES)]


@pytest.fixture(scope="module")
def dns() -> Iterator[HeadlessServiceDns]:
    server = HeadlessServiceDns(HEADLESS_NAME, REPLICA_ADDRESSES)
    yield server
    server.close()


def headless_target(dns: HeadlessServiceDns, replicas: list[RunningServer]) -> str:
    return f"dns://127.0.0.1:{dns.port}/{HEADLESS_NAME}:{replicas[0].port}"


def issued(server: RunningServer) -> float:
    """TURN credentials this server has signed, from its own metrics."""
    value = server.server.metrics.registry.get_sample_value(
        "icegate_turn_credentials_issued_total")
    return value or 0.0


def issued_by_each(replicas: list[RunningServer]) -> list[float]:
    return [issued(server) for server in replicas]


def served_since(before: list[float], replicas: list[RunningServer]) -> list[float]:
    return [now - was for now, was in zip(issued_by_each(replicas), before, strict=True)]


def test_round_robin_spreads_calls_over_every_address_of_the_name(dns, replicas):
    before = issued_by_each(replicas)
    calls = 0
    with icegate.Client(headless_target(dns, replicas), TEST_ADMIN_KEY,
                        load_balancing="round_robin", wait_for_ready=True) as client:
        while calls < MAX_CALLS and not all(served_since(before, replicas)):
            assert client.issue_turn_credentials(f"user{calls}").username
            calls += 1
    served = served_since(before, replicas)
    assert sum(served) == calls
    assert all(count > 0 for count in served), served
    assert (HEADLESS_NAME, 1) in dns.queries  # the name was resolved by DNS, not guessed


def test_without_the_option_one_connection_takes_every_call(dns, replicas):
    """gRPC's default (pick_first): why a headless Service needs round_robin."""
    before = issued_by_each(replicas)
    with icegate.Client(headless_target(dns, replicas), TEST_ADMIN_KEY,
                        wait_for_ready=True) as client:
        for index in range(CALLS):
            client.issue_turn_credentials(f"user{index}")
    assert sorted(served_since(before, replicas)) == [0, CALLS]


def test_the_async_client_balances_over_a_list_of_addresses(replicas):
    """gRPC's `ipv4:` target: the addresses listed, no DNS."""
    target = "ipv4:" + ",".join(f"{address}:{replicas[0].port}"
                                for address in REPLICA_ADDRESSES)
    before = issued_by_each(replicas)

    async def calls() -> int:
        made = 0
        async with icegate.AsyncClient(target, TEST_ADMIN_KEY, load_balancing="round_robin",
                                       wait_for_ready=True) as client:
            while made < MAX_CALLS and not all(served_since(before, replicas)):
                await client.issue_turn_credentials(f"user{made}")
                made += 1
        return made

    made = asyncio.run(calls())
    served = served_since(before, replicas)
    assert sum(served) == made and all(count > 0 for count in served), served


def test_round_robin_carries_on_past_an_address_with_no_server(replicas):
    """A pod gone (its address still listed): calls go to the ones that answer."""
    target = f"ipv4:127.0.0.1:{free_tcp_port()},127.0.0.1:{replicas[0].port}"
    before = issued(replicas[0])
    with icegate.Client(target, TEST_ADMIN_KEY, load_balancing="round_robin") as client:
        for index in range(CALLS):
            client.issue_turn_credentials(f"user{index}", timeout=10)
    assert issued(replicas[0]) - before == CALLS


@pytest.mark.parametrize("policy", ["grpclb", "ROUND_ROBIN", "round_robin ", "", "weighted"])
def test_an_unknown_policy_is_refused_before_any_call(policy):
    with pytest.raises(icegate.ConfigurationError, match="load_balancing must be one of"):
        icegate.Client("127.0.0.1:1", TEST_ADMIN_KEY, load_balancing=policy)


def test_balancing_is_refused_for_a_connect_url():
    with pytest.raises(icegate.ConfigurationError, match="gRPC targets"):
        icegate.AsyncClient("http://127.0.0.1:1", TEST_ADMIN_KEY, load_balancing="round_robin")
