"""A small TURN client (RFC 5389/5766/6156) that reports coturn's answers code by code.

`turnutils_uclient` says whether a whole allocate-and-relay run worked; the deploy tests need
to know what coturn answered to one request: that an Allocate over TLS succeeded, that a
CreatePermission towards a peer in a denied range got 403 (Forbidden IP). This client does
exactly that and nothing more:

- `TurnClient.allocate(username, password)`: Allocate (UDP relay, IPv4 or IPv6), answering the
  401 challenge with the long-term credential (MESSAGE-INTEGRITY over MD5(user:realm:pass)),
  and once more on 438 (stale nonce);
- `TurnClient.create_permission(peer_ip)`: 0 when coturn installed it, else its error code.

A CreatePermission sends nothing to the peer: coturn only records (or refuses) the permission,
so asking about any address is safe; this client never sends data through the relay.

Transports: UDP, or TLS over TCP (`tls_context`), both on loopback.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

MAGIC_COOKIE = 0x2112A442
ALLOCATE, CREATE_PERMISSION = 0x0003, 0x0008
SUCCESS_CLASS, ERROR_CLASS = 0x0100, 0x0110
ATTR_USERNAME, ATTR_MESSAGE_INTEGRITY, ATTR_ERROR_CODE = 0x0006, 0x0008, 0x0009
ATTR_XOR_PEER_ADDRESS, ATTR_REALM, ATTR_NONCE = 0x0012, 0x0014, 0x0015
ATTR_REQUESTED_ADDRESS_FAMILY = 0x0017
ATTR_REQUESTED_TRANSPORT = 0x0019
_UDP = 17


class TurnError(Exception):
    """coturn answered something this client cannot use (not a STUN answer, no error code)."""


@dataclass(frozen=True)
class Answer:
    """One STUN answer: 0 for a success, else the ERROR-CODE; and its attributes."""

    code: int
    reason: str
    attributes: dict[int, bytes]


def _attribute(kind: int, value: bytes) -> bytes:
    padding = b"\0" * (-len(value) % 4)
    return struct.pack("!HH", kind, len(value)) + value + padding


def _xor_address(ip: str, port: int, transaction_id: bytes) -> bytes:
    address = ipaddress.ip_address(ip)
    cookie = struct.pack("!I", MAGIC_COOKIE)
    mask = cookie if address.version == 4 else cookie + transaction_id
    packed = bytes(a ^ b for a, b in zip(address.packed, mask, strict=True))
    family = 0x01 if address.version == 4 else 0x02
    return struct.pack("!BBH", 0, family, port ^ (MAGIC_COOKIE >> 16)) + packed


def _parse(message: bytes, transaction_id: bytes) -> Answer:
    if len(message) < 20:
        raise TurnError("short STUN message")
    kind, length = struct.unpack("!HH", message[:4])
    if message[8:20] != transaction_id:
        raise TurnError("answer to another transaction")
    attributes: dict[int, bytes] = {}
    offset = 20
    while offset + 4 <= 20 + length:
        attr_type, attr_length = struct.unpack("!HH", message[offset:offset + 4])
        attributes.setdefault(attr_type, message[offset + 4:offset + 4 + attr_length])
        offset += 4 + attr_length + (-attr_length % 4)
    if kind & 0x0110 == SUCCESS_CLASS:
        return Answer(0, "", attributes)
    if kind & 0x0110 != ERROR_CLASS:
        raise TurnError(f"unexpected STUN message type {kind:#06x}")
    error = attributes.get(ATTR_ERROR_CODE)
    if error is None or len(error) < 4:
        raise TurnError("error answer without an ERROR-CODE")
    return Answer((error[2] & 0x7) * 100 + error[3], error[4:].decode(errors="replace"),
                  attributes)


class TurnClient:
    """One TURN client connection to coturn on host:port.

    Args:
        host, port: coturn's address.
        tls_context: speak TLS over TCP with this context (server name `server_name`);
            None: UDP.
        timeout: seconds to wait for each answer (UDP requests are sent again meanwhile).
    """

    def __init__(self, host: str, port: int, *, tls_context: ssl.SSLContext | None = None,
                 server_name: str | None = None, timeout: float = 3.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if tls_context is None:
            self._sock: socket.socket = socket.socket(family, socket.SOCK_DGRAM)
            self._sock.settimeout(timeout / 4)
            self._stream = False
        else:
            raw = socket.create_connection((host, port), timeout=timeout)
            self._sock = tls_context.wrap_socket(raw, server_hostname=server_name or host)
            self._stream = True
        self._key = b""
        self._username = b""
        self._realm = b""
        self._nonce = b""

    # -- one request ----------------------------------------------------------------------

    def _exchange(self, request: bytes, transaction_id: bytes) -> Answer:
        if self._stream:
            self._sock.sendall(request)
            header = self._read_exactly(20)
            (length,) = struct.unpack("!H", header[2:4])
            return _parse(header + self._read_exactly(length), transaction_id)
        for _ in range(4):  # UDP: a lost request is sent again
            self._sock.sendto(request, (self.host, self.port))
            try:
                while True:
                    reply, _ = self._sock.recvfrom(4096)
                    if reply[8:20] == transaction_id:
                        return _parse(reply, transaction_id)
            except TimeoutError:
                continue
        raise TimeoutError(f"no TURN answer from {self.host}:{self.port}")

    def _read_exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self._sock.recv(count - len(data))
            if not chunk:
                raise TurnError("coturn closed the connection")
            data += chunk
        return data

    def _request(self, method: int, build: Callable[[bytes], bytes], *,
                 authenticated: bool) -> Answer:
        """Sends one request whose attributes `build` makes from its transaction id (an IPv6
        XOR address depends on it)."""
        transaction_id = os.urandom(12)
        attributes = build(transaction_id)
        if authenticated:
            attributes += (_attribute(ATTR_USERNAME, self._username)
                           + _attribute(ATTR_REALM, self._realm)
                           + _attribute(ATTR_NONCE, self._nonce))
            # MESSAGE-INTEGRITY covers the header with a length that already counts it.
            header = struct.pack("!HHI", method, len(attributes) + 24, MAGIC_COOKIE)
            digest = hmac.new(self._key, header + transaction_id + attributes,
                              hashlib.sha1).digest()
            attributes += _attribute(ATTR_MESSAGE_INTEGRITY, digest)
        header = struct.pack("!HHI", method, len(attributes), MAGIC_COOKIE)
        return self._exchange(header + transaction_id + attributes, transaction_id)

    def _authenticated(self, method: int, build: Callable[[bytes], bytes]) -> Answer:
        answer = self._request(method, build, authenticated=True)
        if answer.code == 438:  # stale nonce: coturn sends a fresh one to use
            self._nonce = answer.attributes.get(ATTR_NONCE, self._nonce)
            answer = self._request(method, build, authenticated=True)
        return answer

    # -- what the tests ask ---------------------------------------------------------------

    def allocate(self, username: str, password: str, *, family: int = 4) -> Answer:
        """Allocates a UDP relay (IPv4, or IPv6 with `family=6`) with a TURN REST credential.

        Returns the answer to the authenticated Allocate (code 0: allocated). A first
        answer other than 401 (coturn asking for credentials) is returned as it is.
        """
        attributes = _attribute(ATTR_REQUESTED_TRANSPORT, bytes([_UDP, 0, 0, 0]))
        if family == 6:
            attributes += _attribute(ATTR_REQUESTED_ADDRESS_FAMILY, bytes([0x02, 0, 0, 0]))
        challenge = self._request(ALLOCATE, lambda _: attributes, authenticated=False)
        if challenge.code != 401:
            return challenge
        self._username = username.encode()
        self._realm = challenge.attributes.get(ATTR_REALM, b"")
        self._nonce = challenge.attributes.get(ATTR_NONCE, b"")
        self._key = hashlib.md5(  # noqa: S324 - RFC 5389's long-term key is MD5
            self._username + b":" + self._realm + b":" + password.encode()).digest()
        return self._authenticated(ALLOCATE, lambda _: attributes)

    def create_permission(self, peer_ip: str) -> int:
        """0 when coturn installed a permission for `peer_ip`, else the error code it answered
        (403: Forbidden IP, the peer is in a denied range)."""
        return self._authenticated(CREATE_PERMISSION, lambda transaction_id: _attribute(
            ATTR_XOR_PEER_ADDRESS, _xor_address(peer_ip, 0, transaction_id))).code

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> TurnClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()



def wait_until_answering(host: str, port: int, *, timeout: float = 10.0) -> None:
    """Waits until coturn on host:port (UDP) answers an Allocate without credentials (401).

    Raises:
        TimeoutError: Nothing answered within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with TurnClient(host, port, timeout=0.4) as client:
                if client.allocate("", "").code == 401:
                    return
        except (TimeoutError, ConnectionRefusedError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"coturn never answered on {host}:{port}")
        time.sleep(0.05)
