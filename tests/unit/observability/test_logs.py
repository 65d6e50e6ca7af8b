"""The sanitising log formatters: only allow-listed fields, constant messages, bare tracebacks."""

from __future__ import annotations

import enum
import io
import json
import logging
import sys
from pathlib import Path

import grpc
import pytest

from icegate_server.observability.logs import (
    REDACTED,
    JsonFormatter,
    RpcLogEvent,
    Safe,
    TextFormatter,
    configure_logging,
    fields,
    log_rpc,
    make_formatter,
    stop_logging,
    valid_request_id,
)

SECRET = "sk-live-0123456789abcdef"


class Color(enum.Enum):
    RED = "red-secret-value"


def record(msg: object = "message", *args: object, name: str = "icegate_server.test",
           exc_info=None, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord(name, logging.INFO, __file__, 1, msg, args or None, exc_info)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def as_json(rec: logging.LogRecord) -> dict:
    return json.loads(JsonFormatter().format(rec))


def test_a_line_has_time_level_logger_and_message():
    line = as_json(record("store reachable again"))
    assert line["level"] == "INFO"
    assert line["logger"] == "icegate_server.test"
    assert line["msg"] == "store reachable again"
    assert line["ts"].endswith("Z") and "T" in line["ts"]


def test_allow_listed_fields_are_written():
    event = RpcLogEvent(method="/icegate.v1.CredentialService/GetIceServers",
                        code=grpc.StatusCode.RESOURCE_EXHAUSTED, duration_ms=1.23456,
                        request_id="req 42", peer="ipv6:%5B::1%5D:50000", project="acme",
                        key_id="0a1b2c3d4e5f", reason="RATE_LIMITED")
    line = as_json(record("rpc", **event.extra()))
    assert {k: line[k] for k in ("method", "code", "duration_ms", "request_id", "peer",
                                 "project", "key_id", "reason")} == {
        "method": "/icegate.v1.CredentialService/GetIceServers", "code": "RESOURCE_EXHAUSTED",
        "duration_ms": 1.235, "request_id": "req 42", "peer": "ipv6:%5B::1%5D:50000",
        "project": "acme", "key_id": "0a1b2c3d4e5f", "reason": "RATE_LIMITED"}


def test_unknown_fields_are_dropped():
    line = as_json(record(**fields(api_key=SECRET, token=SECRET, project="acme")))
    assert line["project"] == "acme"
    assert "api_key" not in line and "token" not in line
    assert SECRET not in json.dumps(line)


def test_plain_extra_attributes_never_reach_the_line():
    line = as_json(record(password=SECRET, user_id="alice"))
    assert SECRET not in json.dumps(line) and "alice" not in json.dumps(line)


@pytest.mark.parametrize(("name", "bad"), [
    ("project", "Acme Corp!"),      # not spelled like a project id
    ("key_id", "igk_abc_" + "x" * 60),
    ("method", "not a method"),
    ("code", "SECRET"),
    ("duration_ms", "12"),
    ("duration_ms", float("nan")),
    ("request_id", "x" * 129),
    ("peer", "ipv4:1.2.3.4:5 " + SECRET),
])
def test_a_value_failing_its_rule_is_redacted(name, bad):
    line = as_json(record(**fields(**{name: bad})))
    assert line[name] == REDACTED


def test_string_arguments_are_redacted_and_safe_ones_interpolated():
    line = as_json(record("%s on %s:%d for %s in %s (%s) %s", SECRET, Safe("127.0.0.1"), 8080,
                          Color.RED, Path("/var/lib/icegate"), True, None))
    assert line["msg"] == (f"{REDACTED} on 127.0.0.1:8080 for RED in /var/lib/icegate "
                           "(True) None")


def test_mapping_arguments_are_redacted_too():
    line = as_json(record("%(key)s after %(n)d tries", {"key": SECRET, "n": 3}))
    assert line["msg"] == f"{REDACTED} after 3 tries"


def test_a_redacted_argument_that_breaks_its_placeholder_leaves_the_template():
    line = as_json(record("%d requests from %s", "12", "x"))
    assert line["msg"] == "%d requests from %s"


def test_a_library_message_without_arguments_is_withheld():
    # httpcore and friends format their own text, which can quote headers and URLs.
    line = as_json(record(f"request headers: authorization={SECRET}", name="httpcore.http11"))
    assert line["msg"] == REDACTED
    assert line["logger"] == "httpcore.http11"
    templated = as_json(record("HTTP Request: %s %s", "POST", SECRET, name="httpx"))
    assert templated["msg"] == f"HTTP Request: {REDACTED} {REDACTED}"


def test_a_non_string_message_is_redacted():
    assert as_json(record({"token": SECRET}))["msg"] == REDACTED


def _failing_helper(token: str) -> None:
    raise KeyError(f"no session for token {token}")


def test_an_exception_is_its_type_and_frames_without_its_message():
    # Decision: a traceback of a bug can carry anything in its message (a KeyError holds the
    # missing key), so only the type and the frames' file:line:function are written.
    try:
        _failing_helper(SECRET)
    except KeyError:
        exc_info = sys.exc_info()
    line = as_json(record("rpc failed with an unexpected error", exc_info=exc_info))
    assert line["exc_type"] == "builtins.KeyError"
    assert any(frame.endswith(":_failing_helper") for frame in line["exc_frames"])
    assert any("test_logs.py:" in frame for frame in line["exc_frames"])
    assert SECRET not in json.dumps(line)


def test_text_format_carries_the_same_sanitised_content():
    event = RpcLogEvent(method="/icegate.v1.SessionService/CreateSession",
                        code=grpc.StatusCode.OK, duration_ms=3.5, request_id="abc def",
                        peer="ipv4:127.0.0.1:1234", project="acme")
    given = {**event.extra()["icegate_fields"], "token": SECRET}
    text = TextFormatter().format(record("rpc %s", SECRET, **fields(**given)))
    assert f" INFO icegate_server.test: rpc {REDACTED} " in text
    assert "method=/icegate.v1.SessionService/CreateSession" in text
    assert 'request_id="abc def"' in text and "duration_ms=3.5" in text
    assert SECRET not in text


def test_make_formatter_knows_both_formats():
    assert isinstance(make_formatter("json"), JsonFormatter)
    assert isinstance(make_formatter("text"), TextFormatter)
    with pytest.raises(ValueError, match="json, text"):
        make_formatter("xml")


@pytest.mark.parametrize(("value", "valid"), [
    ("req-1", True), ("a b", True), ("x" * 128, True),
    ("", False), ("x" * 129, False), ("tab\there", False), ("caf\u00e9", False),
])
def test_request_ids_are_short_printable_ascii(value, valid):
    assert valid_request_id(value) is valid


def test_configure_logging_writes_through_the_queue_and_flushes_on_stop():
    stream = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    library_levels = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    try:
        configure_logging("json", "INFO", stream=stream)
        logging.getLogger("icegate_server.test").info("started %s", SECRET)
        logging.getLogger("icegate_server.test").debug("not at INFO")
        logging.getLogger("httpx").info("HTTP Request: %s", "quiet")
        stop_logging()
    finally:
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        for name, level in library_levels.items():
            logging.getLogger(name).setLevel(level)
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["msg"] for line in lines] == [f"started {REDACTED}"]


RPC_EVENTS = [
    RpcLogEvent(method="/icegate.v1.CredentialService/IssueTurnCredentials",
                code=grpc.StatusCode.OK, duration_ms=0.41234, request_id="a" * 32,
                peer="ipv4:127.0.0.1:5000", project="acme", key_id="0a1b2c3d"),
    RpcLogEvent(method="/icegate.v1.CredentialService/GetIceServers",
                code=grpc.StatusCode.RESOURCE_EXHAUSTED, duration_ms=12.0,
                request_id='quote " and \\ backslash', peer="ipv6:%5B::1%5D:50000",
                project="acme", key_id="0a1b2c3d", reason="RATE_LIMITED"),
    # Hostile values: each must come out redacted or dropped exactly as the formatter does.
    RpcLogEvent(method="/bad method/" + SECRET, code=grpc.StatusCode.UNAUTHENTICATED,
                duration_ms=float("nan"), request_id="tab\there", peer='peer"with quote',
                project=SECRET + "/x", key_id=SECRET + "!", reason="lower_case"),
    RpcLogEvent(method="/icegate.v1.UsageService/GetUsage", code=grpc.StatusCode.OK,
                duration_ms=1e-7, request_id="", peer=""),
]


@pytest.mark.parametrize("event", RPC_EVENTS)
def test_the_fast_rpc_line_says_what_the_formatter_says(event):
    # Production logs RPCs without a LogRecord (logs._FastRpcLines): the line must carry
    # exactly the content the sanitising formatter would write for the same event.
    stream = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        configure_logging("json", "INFO", stream=stream)
        for _ in range(2):  # the second line comes from the remembered fragments
            log_rpc(event)
    finally:
        stop_logging()
        root.handlers[:], root.level = saved_handlers, saved_level
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    expected = as_json(record("rpc", name="icegate_server.rpc", **event.extra()))
    assert len(lines) == 2
    for line in lines:
        assert line.pop("ts").endswith("Z")
        assert line == {k: v for k, v in expected.items() if k != "ts"}
    assert SECRET not in stream.getvalue()
