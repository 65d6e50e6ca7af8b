"""Domain errors -> gRPC status with rich details -> the typed client exception callers catch."""

from __future__ import annotations

import ast
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

import icegate.errors as client_errors
from icegate import error_metadata
from icegate.error_reasons import wire_reason
from icegate.v1.errors_pb2 import ErrorReason
from icegate_server import errors, status
from icegate_server.observability.metrics import LIMIT_REASONS

RESET_AT = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
ROOT = Path(__file__).resolve().parents[2]


def all_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(all_subclasses(sub))
    return found


def concrete_error_classes() -> list[type[errors.IcegateError]]:
    """Every error class domain code raises: the leaves, plus any class mapped in its own right.

    A class with subclasses and no row of its own (UpstreamError) is a base: the one raised is
    always a subclass.
    """
    return [cls for cls in all_subclasses(errors.IcegateError)
            if cls.__module__ == errors.__name__
            and (not cls.__subclasses__() or cls in status.ERROR_TABLE)]


def sample(cls: type[errors.IcegateError]) -> errors.IcegateError:
    """An instance of `cls` as domain code would raise it."""
    if issubclass(cls, errors.InvalidFieldError):
        return cls("user_id", "must not contain ':'")
    if issubclass(cls, errors.SessionPolicyError):
        return cls("voice", "must be one of marin, cedar")
    if issubclass(cls, errors.RateLimitedError):
        return cls(limit=100, window_seconds=900, reset_at=RESET_AT, retry_after_seconds=41.2)
    if issubclass(cls, errors.QuotaExceededError):
        return cls(plan="starter", included=1000, used=1000,
                   upgrade_url="https://icegate.example.test/upgrade", resets_at=RESET_AT)
    if issubclass(cls, errors.ConcurrentLimitError):
        return cls(current=5, maximum=5)
    if issubclass(cls, errors.TurnAllocationLimitError):
        return cls(current=40, maximum=40)
    if issubclass(cls, errors.TurnByteQuotaExceededError):
        return cls(plan="starter", used=10**9 + 5, quota=10**9,
                   upgrade_url="https://icegate.example.test/upgrade", resets_at=RESET_AT)
    if issubclass(cls, errors.TurnCredentialsRevokedError):
        return cls(subject="alice", revoked_until=RESET_AT)
    if issubclass(cls, errors.UpstreamError):
        return cls("the provider did not mint a token", provider="openai", upstream_status=503,
                   upstream_request_id="req_123", retry_after_seconds=7.0)
    return cls(f"{cls.__name__} happened")


# The client class a caller catches for each server error. A new server error class fails
# test_every_error_class_has_a_client_class until it is added here.
CLIENT_CLASS: dict[type[errors.IcegateError], type[client_errors.IcegateError]] = {
    errors.InvalidFieldError: client_errors.InvalidArgumentError,
    errors.MalformedRequestError: client_errors.InvalidArgumentError,
    errors.InvalidApiKeyError: client_errors.AuthenticationError,
    errors.ProjectForbiddenError: client_errors.ProjectForbiddenError,
    errors.NotFoundError: client_errors.NotFoundError,
    errors.AlreadyExistsError: client_errors.AlreadyExistsError,
    errors.RateLimitedError: client_errors.RateLimitedError,
    errors.QuotaExceededError: client_errors.QuotaExceededError,
    errors.ConcurrentLimitError: client_errors.ConcurrentLimitError,
    errors.StoreUnavailableError: client_errors.UnavailableError,
    errors.CoturnOutOfStepError: client_errors.CoturnOutOfStepError,
    errors.SessionPolicyError: client_errors.SessionPolicyError,
    errors.UpstreamNotConfiguredError: client_errors.UpstreamNotConfiguredError,
    errors.UpstreamAuthFailedError: client_errors.UpstreamAuthFailedError,
    errors.UpstreamRejectedError: client_errors.UpstreamRejectedError,
    errors.UpstreamQuotaError: client_errors.UpstreamQuotaError,
    errors.UpstreamUnavailableError: client_errors.UpstreamUnavailableError,
    errors.UpstreamTimeoutError: client_errors.UpstreamTimeoutError,
    errors.TurnAllocationLimitError: client_errors.TurnAllocationLimitError,
    errors.TurnByteQuotaExceededError: client_errors.TurnByteQuotaExceededError,
    errors.TurnCredentialsRevokedError: client_errors.TurnCredentialsRevokedError,
    errors.CoturnCliUnavailableError: client_errors.CoturnCliUnavailableError,
    errors.CoturnCliNotConfiguredError: client_errors.CoturnCliNotConfiguredError,
}

CONCRETE = concrete_error_classes()


class FakeRpcError(grpc.RpcError):
    """A failed call as grpc presents it, answered with `answer` (what the server sent)."""

    def __init__(self, answer: grpc.Status) -> None:
        self._answer = answer

    def code(self) -> grpc.StatusCode:
        return self._answer.code

    def details(self) -> str:
        return self._answer.details

    def trailing_metadata(self):
        return self._answer.trailing_metadata


def unpack(rpc_status, cls):
    found = []
    for packed in rpc_status.details:
        if packed.Is(cls.DESCRIPTOR):
            message = cls()
            packed.Unpack(message)
            found.append(message)
    return found


def error_info(error: errors.IcegateError) -> error_details_pb2.ErrorInfo:
    (info,) = unpack(status.to_rpc_status(error), error_details_pb2.ErrorInfo)
    return info


def test_discovery_finds_the_error_classes():
    # Guards the parametrisation below against silently testing nothing.
    assert errors.InvalidFieldError in CONCRETE
    assert errors.UpstreamTimeoutError in CONCRETE
    assert len(CONCRETE) >= len(CLIENT_CLASS)


@pytest.mark.parametrize("cls", CONCRETE, ids=lambda cls: cls.__name__)
def test_every_error_class_is_mapped_and_never_internal(cls):
    code, reason = status.lookup(sample(cls))
    assert code is not grpc.StatusCode.INTERNAL
    assert code is not grpc.StatusCode.UNKNOWN
    assert reason and reason != "INTERNAL"
    assert any(issubclass(cls, mapped) for mapped in status.ERROR_TABLE)


@pytest.mark.parametrize("cls", CONCRETE, ids=lambda cls: cls.__name__)
def test_every_error_class_has_a_client_class(cls):
    assert cls in CLIENT_CLASS, f"say which client exception {cls.__name__} becomes"


@pytest.mark.parametrize("cls", CONCRETE, ids=lambda cls: cls.__name__)
def test_status_carries_code_message_and_error_info(cls):
    error = sample(cls)
    code, reason = status.lookup(error)
    rpc_status = status.to_rpc_status(error)
    assert rpc_status.code == code.value[0]
    assert rpc_status.message == error.message == str(error)
    info = error_info(error)
    assert info.reason == reason
    assert info.domain == status.ERROR_DOMAIN
    # ErrorInfo comes first: clients that read only one detail read the reason.
    assert rpc_status.details[0].Is(error_details_pb2.ErrorInfo.DESCRIPTOR)


def test_subclass_without_its_own_row_maps_through_its_base():
    class SlowDownError(errors.RateLimitedError):
        pass

    error = SlowDownError(limit=1, window_seconds=1, reset_at=RESET_AT, retry_after_seconds=1)
    assert status.lookup(error) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")


def test_invalid_field_becomes_bad_request_with_the_field():
    rpc_status = status.to_rpc_status(errors.InvalidFieldError("ttl", "must be at least 60"))
    assert rpc_status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    (bad_request,) = unpack(rpc_status, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("ttl", "must be at least 60")]


def test_rate_limited_carries_retry_info_and_reset_time():
    error = sample(errors.RateLimitedError)
    rpc_status = status.to_rpc_status(error)
    (retry,) = unpack(rpc_status, error_details_pb2.RetryInfo)
    # Rounded up: retrying after a rounded-down delay would be refused again.
    assert retry.retry_delay.ToTimedelta() == timedelta(seconds=42)
    metadata = error_info(error).metadata
    assert datetime.fromisoformat(metadata["reset_at"]) == RESET_AT
    assert metadata["limit"] == "100"
    assert metadata["window_seconds"] == "900"


def test_quota_exceeded_carries_quota_failure_usage_and_upgrade_url():
    error = errors.QuotaExceededError(plan="starter", included=1000, used=1003,
                                      upgrade_url="https://icegate.example.test/upgrade",
                                      resets_at=RESET_AT)
    rpc_status = status.to_rpc_status(error)
    (failure,) = unpack(rpc_status, error_details_pb2.QuotaFailure)
    assert len(failure.violations) == 1
    metadata = error_info(error).metadata
    assert metadata["plan"] == "starter"
    assert metadata["sessions_included"] == "1000"
    assert metadata["sessions_used"] == "1003"
    assert metadata["sessions_remaining"] == "0"  # never negative
    assert metadata["upgrade_url"] == "https://icegate.example.test/upgrade"
    (help_,) = unpack(rpc_status, error_details_pb2.Help)
    assert [link.url for link in help_.links] == ["https://icegate.example.test/upgrade"]


def test_concurrent_limit_carries_current_and_max():
    metadata = error_info(errors.ConcurrentLimitError(current=4, maximum=5)).metadata
    assert (metadata["current"], metadata["max"]) == ("4", "5")


@pytest.mark.parametrize(
    "cls", [c for c in CONCRETE if issubclass(c, errors.UpstreamError)],
    ids=lambda cls: cls.__name__,
)
def test_upstream_error_names_provider_and_request_but_never_a_key(cls):
    error = cls("the provider refused the request", provider="gemini", upstream_status=401,
                upstream_request_id="req_abc")
    # Exactly these: nothing that could carry the project's provider key reaches the caller.
    assert dict(error_info(error).metadata) == {
        "provider": "gemini", "upstream_status": "401", "upstream_request_id": "req_abc"}


def test_upstream_retry_after_becomes_retry_info():
    error = errors.UpstreamUnavailableError("down", provider="openai", upstream_status=503,
                                            retry_after_seconds=2.5)
    (retry,) = unpack(status.to_rpc_status(error), error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToTimedelta() == timedelta(seconds=3)


@pytest.mark.parametrize("cls", CONCRETE, ids=lambda cls: cls.__name__)
def test_round_trip_to_the_typed_client_exception(cls):
    error = sample(cls)
    answer = status.to_grpc_status(error)
    typed = client_errors.from_rpc_error(FakeRpcError(answer))

    assert type(typed) is CLIENT_CLASS[cls]
    assert isinstance(typed, client_errors.IcegateError)
    assert typed.code is answer.code
    assert typed.message == error.message
    assert typed.reason == status.lookup(error)[1]

    if isinstance(error, errors.InvalidFieldError):
        assert typed.field_violations == (
            client_errors.FieldViolation("user_id", "must not contain ':'"),)
    if isinstance(error, errors.RateLimitedError):
        assert typed.reset_at == RESET_AT
        assert typed.retry_after == timedelta(seconds=42)
        assert typed.limit == 100
    if isinstance(error, errors.QuotaExceededError):
        assert typed.usage == client_errors.QuotaUsage(
            plan="starter", sessions_included=1000, sessions_used=1000, sessions_remaining=0)
        assert typed.upgrade_url == "https://icegate.example.test/upgrade"
        assert typed.resets_at == RESET_AT
    if isinstance(error, errors.ConcurrentLimitError):
        assert (typed.current, typed.max_sessions) == (5, 5)
    if isinstance(error, errors.UpstreamError):
        assert typed.provider == "openai"
        assert typed.upstream_status == 503
        assert typed.upstream_request_id == "req_123"
        if isinstance(typed, client_errors.UnavailableError):
            assert typed.retry_after == timedelta(seconds=7)


def test_client_trusts_the_code_when_details_disagree_with_it():
    answer = status.to_grpc_status(sample(errors.RateLimitedError))

    class Mismatch(FakeRpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

    typed = client_errors.from_rpc_error(Mismatch(answer))
    assert type(typed) is client_errors.UnavailableError
    assert typed.details == ()


# --- The ErrorReason enum is the one list of reasons -------------------------------------------

REASONS = [value for value in ErrorReason.values() if value != ErrorReason.ERROR_REASON_UNSPECIFIED]

# What callers match on (README, docs/SECURITY.md, the DESIGN table): renaming an ErrorReason
# value changes the wire, and this list is what catches it.
PUBLISHED_REASONS = {
    "INVALID_FIELD", "MALFORMED_REQUEST", "INVALID_API_KEY", "PROJECT_FORBIDDEN", "NOT_FOUND",
    "ALREADY_EXISTS", "RATE_LIMITED", "QUOTA_EXCEEDED", "CONCURRENT_LIMIT", "STORE_UNAVAILABLE",
    "COTURN_OUT_OF_STEP", "UPSTREAM_NOT_CONFIGURED", "UPSTREAM_AUTH_FAILED", "UPSTREAM_REJECTED",
    "UPSTREAM_QUOTA_EXCEEDED", "UPSTREAM_UNAVAILABLE", "INTERNAL", "SESSION_POLICY",
    "TURN_ALLOCATION_LIMIT", "TURN_BYTE_QUOTA_EXCEEDED", "TURN_CREDENTIALS_REVOKED",
    "COTURN_CLI_UNAVAILABLE", "COTURN_CLI_NOT_CONFIGURED",
}


def test_wire_reasons_are_the_published_strings():
    assert {wire_reason(value) for value in REASONS} == PUBLISHED_REASONS


def test_every_reason_is_sent_by_some_error_class():
    sent = {status.lookup(sample(cls))[1] for cls in CONCRETE}
    # INTERNAL alone belongs to no error class: it is the answer to a bug.
    assert sent == {wire_reason(value) for value in REASONS} - {status.INTERNAL_REASON}
    assert status.lookup(errors.IcegateError("unmapped")) == (
        grpc.StatusCode.INTERNAL, status.INTERNAL_REASON)
    (info,) = unpack(rpc_status.from_call(FakeRpcError(status.INTERNAL_STATUS)),
                     error_details_pb2.ErrorInfo)
    assert info.reason == wire_reason(ErrorReason.ERROR_REASON_INTERNAL) == "INTERNAL"


def packed(message: object) -> any_pb2.Any:
    any_message = any_pb2.Any()
    any_message.Pack(message)
    return any_message


def sent_pairs() -> list[tuple[grpc.StatusCode, int]]:
    """Every (status code, reason) pair icegate's server answers."""
    return sorted({*status.ERROR_TABLE.values(),
                   (grpc.StatusCode.INTERNAL, ErrorReason.ERROR_REASON_INTERNAL)},
                  key=lambda pair: (pair[1], pair[0].value[0]))


@pytest.mark.parametrize(("code", "reason"), sent_pairs(),
                         ids=lambda value: getattr(value, "name", None) or wire_reason(value))
def test_client_has_a_class_for_every_reason_that_refines_the_code(code, reason):
    answer = rpc_status.to_status(status_pb2.Status(
        code=code.value[0], message="refused", details=[packed(
            error_details_pb2.ErrorInfo(reason=wire_reason(reason), domain=status.ERROR_DOMAIN))]))
    typed = client_errors.from_rpc_error(FakeRpcError(answer))
    assert typed.reason == wire_reason(reason)
    # A caller that catches by status code catches this reason too.
    assert isinstance(typed, client_errors._BY_CODE.get(code, client_errors.InternalError))


def test_every_reason_is_understood_by_the_client():
    assert set(client_errors._BY_REASON) == set(REASONS)


def test_an_unknown_reason_falls_back_on_the_code():
    for reason in ("A_REASON_FROM_A_NEWER_SERVER", "ERROR_REASON_RATE_LIMITED"):
        answer = rpc_status.to_status(status_pb2.Status(
            code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="refused",
            details=[packed(error_details_pb2.ErrorInfo(reason=reason))]))
        typed = client_errors.from_rpc_error(FakeRpcError(answer))
        assert type(typed) is client_errors.ResourceExhaustedError
        assert typed.reason == reason


def test_limit_refusal_labels_are_the_reasons_of_the_project_limits():
    # icegate_limit_refusals_total{reason}: the label values dashboards already query.
    assert LIMIT_REASONS == ("RATE_LIMITED", "QUOTA_EXCEEDED", "CONCURRENT_LIMIT",
                             "TURN_ALLOCATION_LIMIT", "TURN_BYTE_QUOTA_EXCEEDED")
    limits = (errors.RateLimitedError, errors.QuotaExceededError, errors.ConcurrentLimitError,
              errors.TurnAllocationLimitError, errors.TurnByteQuotaExceededError)
    assert {status.lookup(sample(cls))[1] for cls in limits} == set(LIMIT_REASONS)


# --- ErrorInfo metadata keys are the constants of icegate.error_metadata ----------------------

METADATA_KEYS = {value for name, value in vars(error_metadata).items()
                 if name.isupper() and isinstance(value, str)}


# What the typed client's attributes and other clients read: renaming a constant's value
# changes the wire.
PUBLISHED_METADATA_KEYS = {
    "limit", "window_seconds", "reset_at", "plan", "sessions_included", "sessions_used",
    "sessions_remaining", "upgrade_url", "resets_at", "current", "max", "provider",
    "upstream_status", "upstream_request_id", "field", "bytes_used", "byte_quota",
    "revoked_until",
}


def test_metadata_keys_are_the_published_strings():
    assert METADATA_KEYS == PUBLISHED_METADATA_KEYS


@pytest.mark.parametrize("cls", CONCRETE, ids=lambda cls: cls.__name__)
def test_server_writes_only_declared_metadata_keys(cls):
    assert set(error_info(sample(cls)).metadata) <= METADATA_KEYS


# --- No reason or metadata key spelled by hand in server/ or client/ --------------------------

def _is_metadata(node: ast.expr) -> bool:
    """`metadata` or `<anything>.metadata`: the ErrorInfo metadata as both sides name it."""
    return (isinstance(node, ast.Name) and node.id == "metadata") or (
        isinstance(node, ast.Attribute) and node.attr == "metadata")


def _literal(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def hand_spelled(source: str) -> list[tuple[int, str]]:
    """(line, what) for every reason and every ErrorInfo metadata key spelled as a literal.

    A reason is any string literal equal to a wire reason or an ErrorReason value name: they
    come from the enum only. A metadata key is a literal key where ErrorInfo metadata is read or
    written (`metadata[...]`, `metadata.get(...)`, `metadata.update(...)`, `metadata = {...}`,
    `ErrorInfo(metadata=...)`); words such as `plan` or `provider` mean other things elsewhere.
    """
    reasons = PUBLISHED_REASONS | {ErrorReason.Name(value) for value in ErrorReason.values()}
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if _literal(node) and node.value in reasons:  # type: ignore[attr-defined]
            found.append((node.lineno, f"reason {node.value!r}"))  # type: ignore[attr-defined]
        keys: list[ast.expr | None] = []
        if isinstance(node, ast.Subscript) and _is_metadata(node.value):
            keys.append(node.slice)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and _is_metadata(node.func.value)):
            if node.func.attr in ("get", "pop", "setdefault") and node.args:
                keys.append(node.args[0])
            if node.func.attr == "update":
                found.extend((node.lineno, f"metadata key {kw.arg!r}")
                             for kw in node.keywords if kw.arg)
                keys.extend(key for arg in node.args if isinstance(arg, ast.Dict)
                            for key in arg.keys)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
                _is_metadata(target) for target in node.targets):
            keys.extend(node.value.keys)
        elif isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "metadata" and isinstance(kw.value, ast.Dict):
                    keys.extend(kw.value.keys)
        found.extend((node.lineno, f"metadata key {key.value!r}")  # type: ignore[union-attr]
                     for key in keys if _literal(key))
    return found


@pytest.mark.parametrize("source", [
    'ErrorInfo(reason="RATE_LIMITED")',
    'if reason == "UPSTREAM_UNAVAILABLE": pass',
    'TABLE = {"ERROR_REASON_QUOTA_EXCEEDED": 1}',
    'metadata.update(limit="100")',
    'metadata.update({"plan": plan})',
    'metadata["upstream_request_id"] = request_id',
    'value = self.metadata.get("reset_at")',
    'metadata = {"current": "1"}',
    'ErrorInfo(reason=reason, metadata={"max": "5"})',
])
def test_the_scan_finds_a_hand_spelled_reason_or_key(source):
    assert hand_spelled(source)


def test_no_reason_or_metadata_key_is_spelled_by_hand():
    sources = [path for package in (ROOT / "server", ROOT / "client" / "icegate")
               for path in package.rglob("*.py") if "/icegate/v1/" not in path.as_posix()]
    assert ROOT / "server" / "icegate_server" / "status.py" in sources
    assert ROOT / "client" / "icegate" / "errors.py" in sources
    offenders = [f"{path.relative_to(ROOT)}:{line}: {what}" for path in sources
                 for line, what in hand_spelled(path.read_text(encoding="utf-8"))]
    assert offenders == [], "use ErrorReason / icegate.error_metadata"
