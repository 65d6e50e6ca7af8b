"""Structured logs that cannot carry a secret: allow-listed fields, constant messages.

icegate holds secrets (caller keys, provider keys, TURN secrets, the master key) and hands out
tokens and TURN passwords. Its logs keep them out by construction rather than by every log
call remembering to redact:

* Structured fields come only through `fields(...)` (or `RpcLogEvent`), and the formatter
  emits a field only if its name is in `FIELD_RULES` and its value passes that name's rule: a
  gRPC method name, a project id, a key id (the public part of a key), a status code name, an
  ErrorInfo reason, a number, a request id, a peer address, a provider name. Unknown fields
  are dropped; a value that fails its rule is written as `[redacted]`.
* The message is the format string the code passed, a constant in the source: for icegate's
  own loggers, ruff's flake8-logging-format rules (G) reject f-strings and `%`/`+`/`.format`
  in logging calls. A library's message is trusted only as a template, when it comes with
  arguments; one without (libraries such as httpcore format their own text, which can hold
  headers or URLs) is written as `[redacted]`, keeping its logger and level. Arguments are
  interpolated only when they are numbers, booleans, None, enum members (their name),
  paths, or `Safe` strings (text the code vouches for, such as a listen address); any other
  argument, from our code or a library's, is written as `[redacted]`.
* An exception is written as its type name and the file, line and function of each frame of
  its traceback: never its message or arguments, and never local values. A bug's traceback
  can hold anything (a KeyError carries the key it missed, an HTTP error the URL), so the
  message is the part that is left out; the frames are enough to find the line.
* Nothing else of a record reaches the output: no `stack_info`, no other `extra` attributes.

`ICEGATE_LOG_FORMAT=json` (the default) writes one JSON object per line; `text` writes the
same sanitised content as `key=value` text for people. Both go to standard error through a
queue, so a call on the event loop never waits for the write (`configure_logging`).

The call guard writes one line per RPC (`RpcLogEvent`, logger `icegate_server.rpc`); health
checks and reflection are not logged.
"""

from __future__ import annotations

import enum
import json
import logging
import logging.handlers
import math
import queue
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import PurePath
from types import TracebackType
from typing import Any, NamedTuple

import grpc

from icegate_server.projects.records import PROJECT_ID_PATTERN

RPC_LOGGER = logging.getLogger("icegate_server.rpc")
OWN_LOGGERS = ("icegate_server", "icegate")
"""Loggers (and their children) whose messages are lint-checked constants."""
QUIET_LIBRARY_LOGGERS = ("httpx", "httpcore")
"""Set to WARNING by `configure_logging`: a line per upstream request says nothing new."""
FIELDS_ATTRIBUTE = "icegate_fields"
"""The LogRecord attribute structured fields travel in (set through `fields`)."""
REDACTED = "[redacted]"
LOG_FORMATS = ("json", "text")

MAX_REQUEST_ID_LENGTH = 128
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]+")


class Safe(str):
    """A string the code vouches is no secret, so a log message may show it (e.g. an address).

    Wrap values at the call site, never data whose origin you cannot see.
    """

    __slots__ = ()


def valid_request_id(value: str) -> bool:
    """Whether `value` may serve as a request id: 1-128 printable ASCII characters."""
    return 0 < len(value) <= MAX_REQUEST_ID_LENGTH and bool(_PRINTABLE_ASCII.fullmatch(value))


# --- the allow-list ----------------------------------------------------------------------------

Rule = Callable[[object], object]
"""Returns the value to write, or raises ValueError when the value may not be written."""


def _matching(pattern: str) -> Rule:
    compiled = re.compile(pattern)

    def rule(value: object) -> object:
        if isinstance(value, str) and compiled.fullmatch(value):
            return value
        raise ValueError

    return rule


def _number(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError
        return round(value, 3)
    return value


def _request_id(value: object) -> object:
    if isinstance(value, str) and valid_request_id(value):
        return value
    raise ValueError


_STATUS_NAMES = frozenset(code.name for code in grpc.StatusCode)


def _status_name(value: object) -> object:
    if value in _STATUS_NAMES:
        return value
    raise ValueError


FIELD_RULES: dict[str, Rule] = {
    "method": _matching(r"/[A-Za-z0-9_.]{1,200}/[A-Za-z0-9_]{1,100}"),
    "project": _matching(PROJECT_ID_PATTERN.pattern),
    "key_id": _matching(r"[A-Za-z0-9_-]{1,64}"),
    "code": _status_name,
    "reason": _matching(r"[A-Z][A-Z0-9_]{0,63}"),
    "duration_ms": _number,
    "request_id": _request_id,
    "peer": _matching(r"[A-Za-z0-9:.\[\]%/_-]{1,128}"),
    "provider": _matching(r"[a-z][a-z0-9_]{0,31}"),
    "listen": _matching(r"[A-Za-z0-9.\[\]:_-]{1,255}"),
    "count": _number,
}
"""Every structured field a log line may carry, with the rule its value must pass."""


def fields(**values: object) -> dict[str, Any]:
    """Structured fields for a logging call: `log.info("msg", extra=fields(project=...))`."""
    return {FIELDS_ATTRIBUTE: values}


class RpcLogEvent(NamedTuple):
    """The one log line of one RPC.

    `project` is the admitted project, else the id the request named if it is spelled like
    one (a refused call still shows what it asked for); `key_id` is the public id of the
    caller's key once it is recognised, never anything of an unrecognised key.
    """

    method: str
    code: grpc.StatusCode
    duration_ms: float
    request_id: str
    peer: str
    project: str = ""
    key_id: str = ""
    reason: str = ""

    def extra(self) -> dict[str, Any]:
        return fields(method=self.method, project=self.project, key_id=self.key_id,
                      code=self.code.name, reason=self.reason,
                      duration_ms=self.duration_ms, request_id=self.request_id,
                      peer=self.peer)


def log_rpc(event: RpcLogEvent, error: BaseException | None = None) -> None:
    """Writes `event` at INFO, or at ERROR with the error's traceback frames for a bug."""
    if error is not None:
        RPC_LOGGER.error("rpc failed with an unexpected error", extra=event.extra(),
                         exc_info=(type(error), error, error.__traceback__))
    elif RPC_LOGGER.isEnabledFor(logging.INFO):
        fast, handlers = _fast_rpc_lines, logging.root.handlers
        if fast is not None and len(handlers) == 1 and handlers[0] is fast.handler:
            fast.put(event)
        else:
            RPC_LOGGER.info("rpc", extra=event.extra())


QueuedLine = logging.LogRecord | str
"""What the writer is handed: a record formatted by the QueueHandler, or a per-RPC line."""


class _FastRpcLines:
    """The per-RPC line without the logging machinery, when nothing but icegate's own JSON
    handler listens (production): the same allow-listed fields under the same rules, the
    same JSON, at a fraction of the cost of a LogRecord per call.

    Apart from the time, the duration and the request id, a line repeats from call to call
    (a handful of methods, projects, keys, codes and connections), so each distinct
    combination of those fields is checked against the rules and turned into its JSON once,
    then remembered (at most `_MEMO_SIZE` combinations; a full memo starts over).

    Measured, not assumed (`bench/instructions.py`, IssueTurnCredentials, two targets at a
    time, 2026-12-06): the same server writing this line through `RPC_LOGGER.info` (LogRecord,
    QueueHandler, `JsonFormatter`) executed 754k instructions a call against 575k with this
    class: the stock path costs 179k more, 24 % of a call (in process: 18 us a line against
    2 us; dropping the LogRecord's caller, thread and process look-ups saves only 0.6 us). So
    it stays, beside `JsonFormatter`; every field still passes `FIELD_RULES`
    (`checked_fields`), and `test_the_fast_rpc_line_says_what_the_formatter_says` holds the
    two lines equal, hostile values included.
    """

    _MEMO_SIZE = 4096

    def __init__(self, handler: logging.Handler, records: queue.SimpleQueue[QueuedLine]) -> None:
        self.handler = handler
        self._records = records
        self._memo: dict[tuple[str, str, str, grpc.StatusCode, str, str], str] = {}
        self._logger = json.dumps(RPC_LOGGER.name)

    def _new_constant_part(self, event: RpcLogEvent,
                           key: tuple[str, str, str, grpc.StatusCode, str, str]) -> str:
        shown = checked_fields({"method": event.method, "project": event.project,
                                "key_id": event.key_id, "code": event.code.name,
                                "reason": event.reason, "peer": event.peer})
        part = "".join(f',"{name}":{json.dumps(value, ensure_ascii=True)}'
                       for name, value in shown.items())
        if len(self._memo) >= self._MEMO_SIZE:
            self._memo.clear()
        self._memo[key] = part
        return part

    def put(self, event: RpcLogEvent) -> None:
        # The memo is looked up here, and the line queued as a plain string: every call pays
        # for this method.
        method, code, duration, request_id, peer, project, key_id, reason = event
        key = (method, project, key_id, code, reason, peer)
        constant = self._memo.get(key)
        if constant is None:
            constant = self._new_constant_part(event, key)
        ts = _timestamp(time.time())
        if not math.isfinite(duration):
            shown_duration = f'"{REDACTED}"'
        else:
            shown_duration = repr(round(duration, 3))
        if not request_id:
            shown_request_id = ""
        elif valid_request_id(request_id):
            shown_request_id = f',"request_id":{_json_string(request_id)}'
        else:
            shown_request_id = f',"request_id":"{REDACTED}"'
        self._records.put(f'{{"ts":"{ts}","level":"INFO","logger":{self._logger},'
                          f'"msg":"rpc"{constant},"duration_ms":{shown_duration}'
                          f'{shown_request_id}}}')


_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii


_fast_rpc_lines: _FastRpcLines | None = None


# --- the formatters ----------------------------------------------------------------------------


def _safe_argument(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, Safe)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, PurePath):
        return str(value)
    return REDACTED


def _own_logger(name: str) -> bool:
    return any(name == own or name.startswith(own + ".") for own in OWN_LOGGERS)


def safe_message(record: logging.LogRecord) -> str:
    """The record's constant message with only its safe arguments interpolated."""
    template = record.msg
    if not isinstance(template, str):
        return REDACTED
    args = record.args
    if not args:
        return template if _own_logger(record.name) else REDACTED
    safe_args: object
    if isinstance(args, Mapping):
        safe_args = {key: _safe_argument(value) for key, value in args.items()}
    else:
        safe_args = tuple(_safe_argument(value) for value in args)
    try:
        return template % safe_args
    except (TypeError, ValueError, KeyError):
        # A redacted argument may not fit its placeholder (%d): show the template alone.
        return template


def safe_fields(record: logging.LogRecord) -> dict[str, object]:
    """The record's allow-listed fields that pass their rule; others are dropped or redacted."""
    given = getattr(record, FIELDS_ATTRIBUTE, None)
    if not isinstance(given, Mapping):
        return {}
    return checked_fields(given)


def checked_fields(given: Mapping[Any, object]) -> dict[str, object]:
    """The allow-listed `given` fields that pass their rule; others are dropped or redacted."""
    shown: dict[str, object] = {}
    for name, value in given.items():
        rule = FIELD_RULES.get(name) if isinstance(name, str) else None
        if rule is None or value in ("", None):
            continue
        try:
            shown[name] = rule(value)
        except ValueError:
            shown[name] = REDACTED
    return shown


def safe_exception(
    exc_info: tuple[type[BaseException], BaseException, TracebackType | None] | None,
) -> dict[str, object]:
    """The exception's type and traceback frames, without its message or arguments."""
    if not exc_info or exc_info[0] is None:
        return {}
    cls, _, tb = exc_info
    frames = [f"{frame.filename}:{frame.lineno}:{frame.name}"
              for frame in traceback.extract_tb(tb)]
    return {"exc_type": f"{cls.__module__}.{cls.__qualname__}", "exc_frames": frames}


_second_prefix: tuple[int, str] = (0, "")


def _timestamp(created: float) -> str:
    global _second_prefix  # one strftime per second, not per line
    whole = int(created)
    if _second_prefix[0] != whole:
        _second_prefix = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second_prefix[1]}.{int((created - whole) * 1000):03d}Z"


def _sanitised(record: logging.LogRecord) -> dict[str, object]:
    entry: dict[str, object] = {
        "ts": _timestamp(record.created),
        "level": record.levelname,
        "logger": record.name,
        "msg": safe_message(record),
    }
    entry.update(safe_fields(record))
    entry.update(safe_exception(record.exc_info))  # type: ignore[arg-type]
    return entry


class JsonFormatter(logging.Formatter):
    """One JSON object per record, made only of the allow-listed content (module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_sanitised(record), ensure_ascii=True, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """The same content as `JsonFormatter`, as `ts LEVEL logger: msg key=value ...`."""

    def format(self, record: logging.LogRecord) -> str:
        entry = _sanitised(record)
        head = f"{entry.pop('ts')} {entry.pop('level')} {entry.pop('logger')}: {entry.pop('msg')}"
        tail = " ".join(f"{name}={_text_value(value)}" for name, value in entry.items())
        return f"{head} {tail}" if tail else head


def _text_value(value: object) -> str:
    if isinstance(value, str) and value and all(c.isalnum() or c in "/._:-[]%" for c in value):
        return value
    return json.dumps(value, ensure_ascii=True)


def make_formatter(log_format: str) -> logging.Formatter:
    """The formatter for `ICEGATE_LOG_FORMAT` (json or text)."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")


WRITE_INTERVAL_SECONDS = 0.05
"""How often the writer thread wakes up to write what was logged meanwhile, in one write."""


class BatchWriter:
    """Writes queued (already formatted) records to a stream, a batch per wake-up.

    A writer woken per record costs a GIL hand-off and a flushed write per RPC, which under
    load costs more than the logging itself; waking every `WRITE_INTERVAL_SECONDS` and
    writing everything queued at once bounds that to a few wake-ups a second, and the loop
    never waits on the stream.
    """

    def __init__(self, records: queue.SimpleQueue[QueuedLine], stream: Any) -> None:
        self._records = records
        self._stream = stream
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="icegate-log-writer",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _drain(self) -> None:
        lines = []
        while True:
            try:
                item = self._records.get_nowait()
                lines.append(item if isinstance(item, str) else item.getMessage())
            except queue.Empty:
                break
        if lines:
            try:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: logs are best effort
                pass

    def _run(self) -> None:
        while not self._stopped.wait(WRITE_INTERVAL_SECONDS):
            self._drain()
        self._drain()

    def stop(self) -> None:
        """Writes out everything queued, then ends the thread."""
        self._stopped.set()
        self._thread.join(timeout=5)


class LoggingSetup:
    """The root logger's handler as `configure_logging` installed it; `stop` flushes."""

    def __init__(self, writer: BatchWriter, handler: logging.Handler) -> None:
        self._writer = writer
        self.handler = handler

    def stop(self) -> None:
        """Writes out what is queued and detaches the handler."""
        logging.getLogger().removeHandler(self.handler)
        self._writer.stop()


_installed: list[LoggingSetup] = []


def stop_logging() -> None:
    """Stops what `configure_logging` installed, writing out the queued lines."""
    global _fast_rpc_lines
    _fast_rpc_lines = None
    while _installed:
        _installed.pop().stop()


def configure_logging(log_format: str, level: str | int, *,
                      stream: Any = None) -> LoggingSetup:
    """Routes every log record through the sanitising formatter to `stream` (stderr).

    Replaces the root logger's handlers (and a previous `configure_logging`). The record is
    formatted on the thread that logs (cheap, and before its arguments can change), and
    written by a listener thread, so the event loop never blocks on a slow standard error.
    """
    stop_logging()
    records: queue.SimpleQueue[QueuedLine] = queue.SimpleQueue()
    handler = logging.handlers.QueueHandler(records)
    handler.setFormatter(make_formatter(log_format))
    writer = BatchWriter(records, sys.stderr if stream is None else stream)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    writer.start()
    setup = LoggingSetup(writer, handler)
    global _fast_rpc_lines
    _fast_rpc_lines = _FastRpcLines(handler, records) if log_format == "json" else None
    _installed.append(setup)
    return setup
