"""Free loopback ports for the servers the tests start.

Single ports come from the kernel (bind to port 0, read the number, close). That leaves a short
window in which another process could take the port; the servers in this harness notice a
failed start and the callers retry with a new port.

coturn also needs a range of UDP relay ports, which it binds only when an allocation starts, so
asking the kernel is not enough: two coturns started side by side (pytest-xdist, or two fixtures
in one test) could pick the same range and steal each other's relays. `reserve_relay_range`
therefore takes an exclusive `flock` on a per-block lock file for as long as the range is in
use; any other process running this harness skips a locked block.
"""

from __future__ import annotations

import contextlib
import fcntl
import random
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

LOOPBACK = "127.0.0.1"

# Relay blocks sit below Linux's ephemeral range (32768-60999), so the ports the kernel hands
# out for port 0 (free_tcp_port and every client socket) never land in them.
_RELAY_FIRST_PORT = 20000
_RELAY_LAST_PORT = 32767
_RELAY_BLOCK_SIZE = 32
_LOCK_DIR = Path(tempfile.gettempdir()) / "icegate-test-ports"


def free_tcp_port(host: str = LOOPBACK) -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_udp_port(host: str = LOOPBACK) -> int:
    """A UDP port on `host` that nothing is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _is_free(port: int, kind: socket.SocketKind, host: str) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_tcp_udp_port(host: str = LOOPBACK, attempts: int = 50) -> int:
    """A port free for both TCP and UDP on `host` (STUN/TURN listen on both)."""
    for _ in range(attempts):
        port = free_tcp_port(host)
        if _is_free(port, socket.SOCK_DGRAM, host):
            return port
    raise RuntimeError(f"no port free for both TCP and UDP on {host} after {attempts} tries")


@dataclass
class RelayPortRange:
    """An inclusive UDP port range held for one coturn until `release()`."""

    min_port: int
    max_port: int
    _lock_file: IO[bytes] | None = field(default=None, repr=False)

    def release(self) -> None:
        """Gives the range back to other test processes."""
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None


def reserve_relay_range(host: str = LOOPBACK, attempts: int = 200) -> RelayPortRange:
    """Reserves a block of UDP relay ports not used by any other coturn of this harness.

    Raises:
        RuntimeError: no free block was found in `attempts` tries.
    """
    _LOCK_DIR.mkdir(parents=True, exist_ok=True)
    blocks = list(range(_RELAY_FIRST_PORT, _RELAY_LAST_PORT - _RELAY_BLOCK_SIZE + 2,
                        _RELAY_BLOCK_SIZE))
    random.shuffle(blocks)
    for first in blocks[:attempts]:
        lock_file = (_LOCK_DIR / f"relay-{first}.lock").open("wb")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            continue
        last = first + _RELAY_BLOCK_SIZE - 1
        # Something outside the harness may sit in the block; a quick look at both ends is
        # cheap and catches the common case of a long-running service.
        if _is_free(first, socket.SOCK_DGRAM, host) and _is_free(last, socket.SOCK_DGRAM, host):
            return RelayPortRange(first, last, lock_file)
        fcntl.flock(lock_file, fcntl.LOCK_UN)
        lock_file.close()
    raise RuntimeError(f"no free block of {_RELAY_BLOCK_SIZE} relay ports on {host}")
