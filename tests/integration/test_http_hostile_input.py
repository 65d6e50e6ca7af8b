"""Hostile input on the HTTP listener (Connect and gRPC-Web), against a real server.

Bodies that do not parse (binary and JSON), wrong content types, oversized bodies and
headers, slow clients, unknown paths, garbage instead of HTTP: each is answered with a clear
error (never OK), none leaks a key or a secret, none stops the server, which answers a good
call after every one of them.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from google.rpc import error_details_pb2

import icegate
from harness.icegate_server import TEST_ADMIN_KEY, TEST_TURN_SECRET, RunningServer, ServerFactory
from icegate.v1 import credentials_pb2

ISSUE = "/icegate.v1.CredentialService/IssueTurnCredentials"
ICE = "/icegate.v1.CredentialService/GetIceServers"
READ_TIMEOUT = 1.0
AUTH = {"authorization": f"Bearer {TEST_ADMIN_KEY}"}


@pytest.fixture(scope="module")
def server(module_server_factory: ServerFactory) -> Iterator[RunningServer]:
    yield module_server_factory(http_read_timeout=READ_TIMEOUT)


def post(server: RunningServer, path: str, body: bytes, headers: dict[str, str],
         *, method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a fresh connection: status, headers (lower-case), body."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        connection.close()


def still_serves(server: RunningServer) -> None:
    with icegate.Client(server.http_url, TEST_ADMIN_KEY) as client:
        assert client.issue_turn_credentials("after").username.endswith(":default/after")


def assert_no_secret(*texts: bytes | str) -> None:
    for text in texts:
        raw = text if isinstance(text, bytes) else text.encode()
        assert TEST_ADMIN_KEY.encode() not in raw
        assert TEST_TURN_SECRET.encode() not in raw


def connect_error(body: bytes) -> dict[str, Any]:
    error = json.loads(body)
    assert isinstance(error, dict)
    return error


def error_info(error: dict[str, Any]) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo among a Connect error's details (unpadded base64, as Connect sends)."""
    for detail in error["details"]:
        if detail["type"] == "google.rpc.ErrorInfo":
            return error_details_pb2.ErrorInfo.FromString(
                base64.b64decode(detail["value"] + "=" * (-len(detail["value"]) % 4)))
    raise AssertionError("no ErrorInfo in the Connect error")


@pytest.mark.parametrize(("content_type", "body"), [
    ("application/proto", b"\xff\xff\xff\xff\x0f"),
    ("application/proto", b"\x0a\x05ab"),  # a string field cut short
    ("application/json", b'{"userId": '),
    ("application/json", b'{"userId": 12'),
    ("application/json", b'{"ttl": "forever"}'),
    ("application/json", "{\"userId\": \"\udcff\"}".encode("utf-8", "surrogatepass")),
], ids=["proto-garbage", "proto-truncated", "json-cut", "json-unterminated",
        "json-bad-duration", "json-bad-utf8"])
def test_a_body_that_does_not_parse_is_invalid_argument(server, content_type, body):
    status, headers, answer = post(server, ISSUE, body, {**AUTH, "content-type": content_type})
    assert status == 400
    error = connect_error(answer)
    assert error["code"] == "invalid_argument"
    assert error["message"] == "the request body is not a valid message"
    assert headers["x-request-id"]
    assert error_info(error).reason == "MALFORMED_REQUEST"
    still_serves(server)


def test_a_json_value_that_is_not_a_request_is_invalid_argument(server):
    status, _, answer = post(server, ISSUE, b'["not", "an", "object"]',
                             {**AUTH, "content-type": "application/json"})
    assert status == 400
    assert connect_error(answer)["code"] == "invalid_argument"


def test_json_is_served_as_documented_for_curl(server):
    status, headers, answer = post(server, ICE, b'{"userId": "alice", "ttl": "600s"}',
                                   {**AUTH, "content-type": "application/json"})
    assert status == 200 and headers["content-type"] == "application/json"
    servers = json.loads(answer)["iceServers"]
    assert servers[1]["username"].endswith(":default/alice")
    assert servers[1]["credential"]


@pytest.mark.parametrize("content_type", [
    "", "text/plain", "application/xml", "application/x-www-form-urlencoded",
    "application/protobuf; charset=ebcdic", "application/connect+json"])
def test_a_content_type_it_does_not_speak_is_refused(server, content_type):
    request = credentials_pb2.IssueTurnCredentialsRequest(user_id="alice").SerializeToString()
    headers = {**AUTH, "content-type": content_type} if content_type else dict(AUTH)
    status, _, answer = post(server, ISSUE, request, headers)
    assert status in (400, 415)
    assert_no_secret(answer)
    still_serves(server)


def test_native_grpc_on_the_http_port_is_refused_not_served(server):
    request = credentials_pb2.IssueTurnCredentialsRequest(user_id="alice").SerializeToString()
    framed = b"\x00" + len(request).to_bytes(4, "big") + request
    status, headers, answer = post(server, ISSUE, framed,
                                   {**AUTH, "content-type": "application/grpc"})
    assert status != 200 or headers.get("grpc-status", "0") != "0"
    assert_no_secret(answer, json.dumps(headers))
    still_serves(server)


def test_grpc_web_is_served(server):
    request = credentials_pb2.IssueTurnCredentialsRequest(user_id="web").SerializeToString()
    framed = b"\x00" + len(request).to_bytes(4, "big") + request
    status, headers, answer = post(server, ISSUE, framed,
                                   {**AUTH, "content-type": "application/grpc-web+proto"})
    assert status == 200 and headers["content-type"].startswith("application/grpc-web")
    assert answer[0] == 0  # a data frame first, then the trailers frame
    size = int.from_bytes(answer[1:5], "big")
    response = credentials_pb2.IssueTurnCredentialsResponse.FromString(answer[5:5 + size])
    assert response.username.endswith(":default/web")
    assert b"grpc-status:0" in answer[5 + size:].replace(b" ", b"")


def test_an_oversized_body_is_resource_exhausted(server):
    request = credentials_pb2.IssueTurnCredentialsRequest(user_id="a" * 70_000)
    status, _, answer = post(server, ISSUE, request.SerializeToString(),
                             {**AUTH, "content-type": "application/proto"})
    assert status == 429
    assert connect_error(answer)["code"] == "resource_exhausted"
    still_serves(server)


def test_a_gzip_bomb_is_resource_exhausted(server):
    bomb = gzip.compress(b"\x0a" + b"\xff" * 10_000_000)
    status, _, answer = post(server, ISSUE, bomb, {**AUTH, "content-type": "application/proto",
                                                   "content-encoding": "gzip"})
    assert status == 429
    assert connect_error(answer)["code"] == "resource_exhausted"
    still_serves(server)


def test_oversized_headers_are_refused_and_the_connection_closed(server):
    status, _, _ = post(server, ISSUE, b"", {**AUTH, "content-type": "application/proto",
                                             "x-padding": "p" * 20_000})
    assert status == 400
    still_serves(server)


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("POST", "/icegate.v1.CredentialService/NoSuchMethod", 404),
    ("POST", "/icegate.v1.NoSuchService/IssueTurnCredentials", 404),
    ("POST", "/", 404),
    ("POST", "/../../etc/passwd", 404),
    ("GET", ISSUE, 405),
    ("PUT", ISSUE, 405),
    ("POST", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", 404),
    ("POST", "/grpc.health.v1.Health/Watch", 404),
])
def test_unknown_paths_and_methods_are_refused(server, method, path, expected):
    status, _, answer = post(server, path, b"{}", {**AUTH, "content-type": "application/json"},
                             method=method)
    assert status == expected
    assert_no_secret(answer)


@pytest.mark.parametrize("headers", [
    {"connect-timeout-ms": "soon"},
    {"connect-timeout-ms": "-5"},
    {"connect-timeout-ms": "9" * 40},
    {"connect-protocol-version": "7"},
    {"content-encoding": "brotli-of-the-future"},
], ids=["timeout-word", "timeout-negative", "timeout-long", "protocol-version", "encoding"])
def test_bad_protocol_headers_are_refused(server, headers):
    status, _, answer = post(server, ISSUE, b"{}",
                             {**AUTH, "content-type": "application/json", **headers})
    assert status != 200
    assert_no_secret(answer)
    still_serves(server)


@pytest.mark.parametrize("key", ["", "Basic dXNlcjpwYXNz", f"Bearer {TEST_ADMIN_KEY}x",
                                 "Bearer " + "k" * 5000])
def test_a_bad_key_is_unauthenticated_and_not_echoed(server, key):
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = key
    status, _, answer = post(server, ISSUE, b'{"userId": "alice"}', headers)
    assert status == 401
    assert connect_error(answer)["code"] == "unauthenticated"
    assert_no_secret(answer)
    assert b"kkkkkkkk" not in answer


def raw_exchange(server: RunningServer, data: bytes, *, wait: float = 5.0) -> bytes:
    """Sends `data` on a fresh connection and reads until the server closes it."""
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=wait) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


@pytest.mark.parametrize("data", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS ClientHello
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 prior knowledge
    b"GARBAGE\x00\xff\r\n\r\n",
    b"POST " + ISSUE.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST " + ISSUE.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 5\r\n\r\nzz\r\n",
    b"POST " + ISSUE.encode() + b" HTTP/1.1\r\nHost: x\r\nx-bad: \xff\xfe\r\n"
    b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
], ids=["tls-hello", "h2-preface", "garbage", "negative-length", "smuggling", "non-utf8"])
def test_what_is_not_http_is_answered_and_hung_up_on(server, data):
    answer = raw_exchange(server, data)
    assert not answer.startswith(b"HTTP/1.1 200")
    assert_no_secret(answer)
    still_serves(server)


def test_a_slow_client_is_disconnected_and_others_are_served(server):
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=10) as slow:
        slow.sendall(b"POST " + ISSUE.encode() + b" HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        still_serves(server)  # meanwhile
        # It trickles a header byte by byte, never finishing: hung up on at the deadline.
        closed = False
        while time.monotonic() - started < READ_TIMEOUT * 10:
            try:
                slow.sendall(b"x")
                if slow.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            time.sleep(0.05)
        assert closed


def test_a_body_that_never_arrives_is_hung_up_on(server):
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=10) as slow:
        slow.sendall(b"POST " + ISSUE.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                     b"content-type: application/proto\r\ncontent-length: 1000\r\n\r\nab")
        slow.settimeout(READ_TIMEOUT * 10)
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
    assert not answer.startswith(b"HTTP/1.1 200")
    still_serves(server)


def test_an_idle_connection_that_never_speaks_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=10) as idle:
        idle.settimeout(READ_TIMEOUT * 10)
        assert idle.recv(1) == b""
