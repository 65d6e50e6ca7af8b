"""One contract, two transports, one server: what a caller sees is the same over gRPC and over
Connect, and what the server keeps (limits, metrics, log lines) counts both together."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import icegate
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer, ServerFactory
from harness.server_process import ServerProcess, free_port
from icegate.v1 import credentials_pb2

ISSUE = "/icegate.v1.CredentialService/IssueTurnCredentials"
RPC_LOGGER = "icegate_server.rpc"
BIN = Path(sys.executable).parent


@pytest.fixture
def server(server_factory: ServerFactory, store_url: str) -> RunningServer:
    return server_factory(store=store_url)


def test_a_rate_limit_is_exact_across_both_transports_at_once(server):
    with icegate.Client(server.grpc_target, TEST_ADMIN_KEY) as admin:
        admin.create_project("shared", rate_limit_requests=20, rate_limit_window=3600)
        key = admin.create_api_key("shared").secret
    outcomes: list[str] = []
    lock = threading.Lock()

    def hammer(target: str) -> None:
        with icegate.Client(target, key) as client:
            for _ in range(15):
                try:
                    client.issue_turn_credentials("u")
                    outcome = "ok"
                except icegate.IcegateError as error:
                    outcome = error.reason or error.code.name
                with lock:
                    outcomes.append(outcome)

    threads = [threading.Thread(target=hammer, args=(target,))
               for target in (server.grpc_target, server.http_url) * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("ok") == 20
    assert outcomes.count("RATE_LIMITED") == 40
    with icegate.Client(server.http_url, key) as client, \
            pytest.raises(icegate.RateLimitedError) as caught:
        client.issue_turn_credentials("u")
    assert caught.value.limit == 20 and caught.value.retry_after is not None


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_both_transports_are_counted_and_logged_alike(server, caplog):
    caplog.set_level(logging.INFO, logger=RPC_LOGGER)
    for target in (server.grpc_target, server.http_url):
        with icegate.Client(target, TEST_ADMIN_KEY) as client:
            client.issue_turn_credentials("alice")
        with icegate.Client(target, "igk_unknown_" + "x" * 30) as stranger, \
                pytest.raises(icegate.AuthenticationError):
            stranger.issue_turn_credentials("alice")
    registry = server.server.metrics.registry
    for code in ("OK", "UNAUTHENTICATED"):
        assert registry.get_sample_value("icegate_rpcs_total",
                                         {"method": ISSUE, "code": code}) == 2
    lines = [record for record in caplog.records if record.name == RPC_LOGGER]
    fields = [record.icegate_fields for record in lines]
    assert [(f["method"], f["code"]) for f in fields] == [
        (ISSUE, "OK"), (ISSUE, "UNAUTHENTICATED")] * 2
    assert [f["key_id"] for f in fields] == ["static-0", ""] * 2


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_the_request_id_comes_back_as_a_header_and_is_logged(server, caplog):
    caplog.set_level(logging.INFO, logger=RPC_LOGGER)
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=10)
    ids = []
    try:
        for given, key in (("trace-42", TEST_ADMIN_KEY), (None, TEST_ADMIN_KEY),
                           ("trace-43", "wrong-key-0123456789"), ("x" * 200, TEST_ADMIN_KEY)):
            headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
            if given is not None:
                headers["x-request-id"] = given
            connection.request("POST", ISSUE, body=b'{"userId": "a"}', headers=headers)
            answer = connection.getresponse()
            answer.read()
            ids.append((given, answer.getheader("x-request-id")))
    finally:
        connection.close()
    assert ids[0] == ("trace-42", "trace-42")
    assert ids[2] == ("trace-43", "trace-43")  # on an error too
    assert len(ids[1][1]) == len(ids[3][1]) == 32 and ids[1][1] != ids[3][1]
    logged = [record.icegate_fields["request_id"] for record in caplog.records
              if record.name == RPC_LOGGER]
    assert logged == [answer for _, answer in ids]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_rich_details_are_connect_error_details(server):
    refusals = []
    for target in (server.grpc_target, server.http_url):
        with icegate.Client(target, TEST_ADMIN_KEY) as client, \
                pytest.raises(icegate.InvalidArgumentError) as caught:
            client.issue_turn_credentials("a:b")
        error = caught.value
        refusals.append((error.code, error.reason, error.message, error.field_violations))
    assert refusals[0] == refusals[1]  # the same typed error, whichever transport
    assert refusals[1][3][0].field == "user_id"
    # The same answer, read as JSON by a caller without the typed client.
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=10)
    try:
        connection.request("POST", ISSUE, body=b'{"userId": "a:b"}', headers={
            "content-type": "application/json", "authorization": f"Bearer {TEST_ADMIN_KEY}"})
        answer = connection.getresponse()
        error = json.loads(answer.read())
    finally:
        connection.close()
    assert answer.status == 400 and error["code"] == "invalid_argument"
    assert [detail["type"] for detail in error["details"]] == [
        "google.rpc.ErrorInfo", "google.rpc.BadRequest"]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_binary_and_json_calls_are_refused_alike(server):
    # A binary call takes icegate's own unary path, a JSON one connectrpc's application: the
    # same Connect error either way.
    from icegate.v1 import credentials_pb2

    def refused(content_type: str, body: bytes) -> tuple[int, dict[str, object]]:
        connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port,
                                                timeout=10)
        try:
            connection.request("POST", ISSUE, body=body, headers={
                "content-type": content_type, "authorization": "Bearer igk_" + "z" * 40})
            answer = connection.getresponse()
            error = json.loads(answer.read())
        finally:
            connection.close()
        return answer.status, error

    binary = refused("application/proto", credentials_pb2.IssueTurnCredentialsRequest(
        user_id="alice").SerializeToString())
    text = refused("application/json", b'{"userId": "alice"}')
    assert binary == text
    assert binary[0] == 401 and binary[1]["code"] == "unauthenticated"


def test_a_taken_http_port_stops_the_server_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = ServerProcess(tmp_path, http_listen=f"127.0.0.1:{port}")
        result = subprocess.run([str(BIN / "icegate-server")], cwd=tmp_path, env=process.env,
                                capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "icegate-server:" in line]
    assert lines == [f"icegate-server: cannot listen on 127.0.0.1:{port} "
                     "(ICEGATE_HTTP_LISTEN): address in use"]


def test_the_http_listener_serves_a_real_process_and_stops_on_sigterm(tmp_path):
    http_port = free_port()
    process = ServerProcess(tmp_path, http_listen=f"127.0.0.1:{http_port}").start()
    try:
        with icegate.Client(f"http://127.0.0.1:{http_port}", TEST_ADMIN_KEY) as client:
            assert client.health() == "SERVING"
            assert client.get_ice_servers("alice").ice_servers[1].username
    finally:
        assert process.stop() == 0


def _request(user: str, extra: bytes = b"") -> bytes:
    body = credentials_pb2.IssueTurnCredentialsRequest(user_id=user).SerializeToString()
    return (b"POST " + ISSUE.encode() + b" HTTP/1.1\r\nHost: icegate\r\n"
            b"content-type: application/proto\r\n"
            b"authorization: Bearer " + TEST_ADMIN_KEY.encode() + b"\r\n" + extra +
            b"content-length: %d\r\n\r\n" % len(body)) + body


def _read_responses(sock: socket.socket, count: int) -> list[tuple[bytes, bytes]]:
    """`count` HTTP/1.1 responses (status line, body) read off `sock`, framed by their
    content-length."""
    buffered, answers = b"", []
    while len(answers) < count:
        head_end = buffered.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buffered[:head_end].decode("latin-1").split("\r\n")
            length = next(int(line.split(":", 1)[1]) for line in head
                          if line.lower().startswith("content-length:"))
            end = head_end + 4 + length
            if len(buffered) >= end:
                answers.append((head[0].encode(), buffered[head_end + 4:end]))
                buffered = buffered[end:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {len(answers)} of {count} answers"
        buffered += chunk
    return answers


def test_pipelined_calls_on_one_connection_are_answered_in_order(server):
    users = [f"piped-{n}" for n in range(5)]
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=10) as sock:
        sock.sendall(b"".join(_request(user) for user in users))
        answers = _read_responses(sock, len(users))
    for user, (status, body) in zip(users, answers, strict=True):
        assert status == b"HTTP/1.1 200 OK"
        issued = credentials_pb2.IssueTurnCredentialsResponse.FromString(body)
        assert issued.username.endswith(f":default/{user}")


def test_a_client_that_waits_for_100_continue_gets_it_and_its_answer(server):
    # curl sends `Expect: 100-continue` before a body over 1 KiB and waits for the interim
    # answer before sending the body.
    request = _request("patient", b"expect: 100-continue\r\n")
    head, body = request.split(b"\r\n\r\n", 1)
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=10) as sock:
        sock.sendall(head + b"\r\n\r\n")
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            chunk = sock.recv(1)
            assert chunk, "closed before the interim answer"
            interim += chunk
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        [(status, answer)] = _read_responses(sock, 1)
    assert status == b"HTTP/1.1 200 OK"
    assert credentials_pb2.IssueTurnCredentialsResponse.FromString(answer).username.endswith(
        ":default/patient")
