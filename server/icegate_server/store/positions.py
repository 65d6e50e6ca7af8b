"""Where the SQLite store keeps its projects' GCRA positions between two write-backs.

A position (the project's theoretical arrival time, `limits.py`) moves on every counted call,
so it is kept out of the database file, which gets it back every second (`sqlite.py`):

- `ProcessPositions`, a dict, when one process owns the file;
- `SharedPositions`, a table in a memory-mapped file beside the database
  (`<db>.positions`), when the workers of `icegate-server --workers N` share it. A worker
  reads and moves a position under an exclusive `flock` on that file, held for a few
  microseconds of pure computation, so all the workers move one position and the limit
  stays exact across them, with two system calls a call instead of a SQL write
  transaction (which cost a worker some 175 us of CPU per call, against 4 us).

Both take `seed`, which reads a position from the database the first time it is needed in
this process (for `SharedPositions`: the first time any worker needs it), and both answer
`None` for a project that has no position yet.

The shared table is open-addressed: a project's slot is found from the CRC-32 of its id
(the same in every process), probing at most `_MAX_PROBES` slots; a removed project leaves
a tombstone so that the probes of others still find them. A project that finds no free
slot within its probes (tens of thousands of projects) has no shared position: `step`
answers `None`, and the store counts that project's calls in SQL as before. A flock is
released by the kernel when its holder dies, so a killed worker never leaves the table
locked; one that is stopped (SIGSTOP) while it holds the lock stalls the others until it
runs again, as it would by holding SQLite's write lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import zlib
from collections.abc import Callable
from typing import NamedTuple

from icegate_server.access.rate_limit import RateLimitPolicy, gcra_admit

Seed = Callable[[str], "int | None"]
"""Reads a project's position from the database (raises what the database raises)."""


class Step(NamedTuple):
    """The outcome of one counted call on a position."""

    admitted: bool
    tat_ms: int | None
    """The position after the call (unchanged when refused)."""


class ProcessPositions:
    """Positions in this process's memory: for a process that owns its database file."""

    def __init__(self) -> None:
        self._tats: dict[str, int | None] = {}

    def step(self, project_id: str, now_ms: int, policy: RateLimitPolicy,
             seed: Seed) -> Step:
        tat = self.peek(project_id, seed)
        admitted = gcra_admit(tat, now_ms, policy)
        if admitted is None:
            return Step(False, tat)
        self._tats[project_id] = admitted
        return Step(True, admitted)

    def peek(self, project_id: str, seed: Seed) -> int | None:
        tats = self._tats
        if project_id in tats:
            return tats[project_id]
        tat = tats[project_id] = seed(project_id)
        return tat

    def known(self, project_id: str) -> tuple[bool, int | None]:
        """Whether this process holds a position for the project, and which."""
        return project_id in self._tats, self._tats.get(project_id)

    def forget(self, project_id: str) -> None:
        self._tats.pop(project_id, None)

    def close(self) -> None:
        self._tats.clear()


_MAGIC = b"igpos\x00\x00\x01"
_HEADER = struct.Struct("<8sQ")
_SLOT = struct.Struct("<qB63s")
"""A slot: the position (0: none yet), its state, the project id (at most 63 bytes)."""
_EMPTY, _USED, _TOMBSTONE = 0, 1, 2
SLOTS = 1 << 16
_MAX_PROBES = 256
_SPINS = 200
"""Non-blocking attempts at the lock before waiting for it (its holders keep it for us)."""


class SharedPositions:
    """Positions in a file mapped by every worker process of one database file."""

    def __init__(self, fd: int, table: mmap.mmap, slots: int) -> None:
        self._fd = fd
        self._table = table
        self._slots = slots
        self._where: dict[str, int] = {}
        """Slot offsets found before (checked against the slot's id on every use)."""

    @classmethod
    def open(cls, database_path: str) -> SharedPositions:
        """Maps `<database_path>.positions`, creating it (mode 0600) when absent.

        Raises:
            OSError: The file cannot be created or mapped, or it holds another format.
        """
        fd = os.open(f"{database_path}.positions", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = _HEADER.size + SLOTS * _SLOT.size
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)  # zeros: every slot empty
                header = os.pread(fd, _HEADER.size, 0)
                magic, slots = _HEADER.unpack(header)
                if magic == b"\x00" * len(_MAGIC):
                    os.pwrite(fd, _HEADER.pack(_MAGIC, SLOTS), 0)
                    magic, slots = _MAGIC, SLOTS
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            if magic != _MAGIC or slots != SLOTS:
                raise OSError(f"{database_path}.positions is not an icegate positions table "
                              "of this version (remove it while no server runs)")
            table = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, table, slots)

    @staticmethod
    def reset(database_path: str) -> None:
        """Empties the table, for a process that takes the database file for itself: with
        no worker left, whatever the table holds is at most as recent as the file."""
        with contextlib.suppress(FileNotFoundError):
            os.truncate(f"{database_path}.positions", 0)

    def step(self, project_id: str, now_ms: int, policy: RateLimitPolicy,
             seed: Seed) -> Step | None:
        """The call counted on the shared position; None when the project has no slot."""
        self._lock()
        try:
            offset = self._slot_of(project_id, seed)
            if offset is None:
                return None
            tat = _SLOT.unpack_from(self._table, offset)[0] or None
            admitted = gcra_admit(tat, now_ms, policy)
            if admitted is None:
                return Step(False, tat)
            struct.pack_into("<q", self._table, offset, admitted)
            return Step(True, admitted)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def peek(self, project_id: str, seed: Seed) -> int | None:
        held, tat = self.known(project_id)
        return tat if held else seed(project_id)

    def known(self, project_id: str) -> tuple[bool, int | None]:
        self._lock()
        try:
            offset = self._find(project_id)
            if offset is None:
                return False, None
            return True, _SLOT.unpack_from(self._table, offset)[0] or None
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def forget(self, project_id: str) -> None:
        """Removes the project's position for every worker (the project is gone)."""
        self._lock()
        try:
            offset = self._find(project_id)
            if offset is not None:
                _SLOT.pack_into(self._table, offset, 0, _TOMBSTONE, b"")
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._where.pop(project_id, None)

    def close(self) -> None:
        self._table.close()
        os.close(self._fd)

    # -- under the lock ------------------------------------------------------------------

    def _lock(self) -> None:
        for _ in range(_SPINS):
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                continue
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # a holder that was descheduled: wait for it

    def _find(self, project_id: str) -> int | None:
        return self._probe(project_id)[0]

    def _slot_of(self, project_id: str, seed: Seed) -> int | None:
        found, free = self._probe(project_id)
        if found is not None or free is None:
            return found
        _SLOT.pack_into(self._table, free, seed(project_id) or 0, _USED, project_id.encode())
        self._where[project_id] = free
        return free

    def _probe(self, project_id: str) -> tuple[int | None, int | None]:
        """The project's slot if it has one, else the first slot it may take (if any)."""
        offset = self._where.get(project_id)
        name = project_id.encode()
        if offset is not None and self._holds(offset, name):
            return offset, None
        free = None
        for offset in self._probes(name):
            state = self._table[offset + 8]
            if state == _USED:
                if self._holds(offset, name):
                    self._where[project_id] = offset
                    return offset, None
            elif free is None:
                free = offset  # an empty slot, or a tombstone to reuse
            if state == _EMPTY:
                break  # nothing of this project's probes lies beyond an empty slot
        return None, free

    def _holds(self, offset: int, name: bytes) -> bool:
        start = offset + 9
        table = self._table
        return (table[offset + 8] == _USED and table[start:start + len(name)] == name
                and (len(name) == 63 or table[start + len(name)] == 0))

    def _probes(self, name: bytes) -> range:
        home = zlib.crc32(name) % self._slots
        last = min(home + _MAX_PROBES, self._slots)
        # Wrapping would make two ranges; a probe sequence that meets the end just stops
        # there, which only shortens it for the last slots.
        return range(_HEADER.size + home * _SLOT.size, _HEADER.size + last * _SLOT.size,
                     _SLOT.size)
