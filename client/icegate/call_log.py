"""The `debug=True` line of each call: method, target, status and duration, never a secret.

    12:04:55 icegate: CreateSession 127.0.0.1:50051 OK 41.3 ms
    12:04:56 icegate: CreateSession 127.0.0.1:50051 RESOURCE_EXHAUSTED RATE_LIMITED 2.1 ms

Like the seeds' SDK debug switch, it shows on the console without the caller configuring
logging: the first client made with `debug=True` gives the `icegate` logger a handler on
standard error unless logging is configured already (then the lines go to the handlers the
application set up), and lets its DEBUG lines through.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO
from urllib.parse import urlsplit

from icegate.errors import IcegateError

log = logging.getLogger("icegate")


class _ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to `sys.stderr` as it is at each line, so later redirections apply."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def enable() -> None:
    """Makes the `icegate` logger's DEBUG lines show, on stderr if nothing else is set up."""
    if log.getEffectiveLevel() > logging.DEBUG:
        log.setLevel(logging.DEBUG)
    if not log.hasHandlers():  # neither on `icegate` nor on the root: logging is unset
        log.addHandler(_ConsoleHandler())


def shown_target(target: str) -> str:
    """The target as a log may show it: without a user name or password in it."""
    if "@" not in target:
        return target
    parts = urlsplit(target)
    if not parts.netloc:  # host:port, or a gRPC name such as dns:///host
        return target.rpartition("@")[2]
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


MESSAGE_LIMIT = 200
"""The most characters of an error message a debug line shows."""


def record(request: Any, target: str, started: float, error: IcegateError | None) -> None:
    """Logs one finished call (`started` from `time.perf_counter()`)."""
    method = type(request).__name__.removesuffix("Request")
    elapsed = (time.perf_counter() - started) * 1e3
    if error is None:
        log.debug("%s %s OK %.1f ms", method, shown_target(target), elapsed)
        return
    status = f"{error.code.name} {error.reason}".rstrip()
    message = error.message if len(error.message) <= MESSAGE_LIMIT \
        else error.message[:MESSAGE_LIMIT] + "…"
    log.debug("%s %s %s %.1f ms: %s", method, shown_target(target), status, elapsed,
              message.replace("\n", " "))
