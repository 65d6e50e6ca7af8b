"""The exceptions the icegate client raises: one class per situation a caller handles differently.

    IcegateError
    ├── AuthenticationError          UNAUTHENTICATED (INVALID_API_KEY)
    ├── PermissionDeniedError        PERMISSION_DENIED
    │   ├── ProjectForbiddenError        PROJECT_FORBIDDEN
    │   └── SessionPolicyError           SESSION_POLICY (.field)
    │   └── TurnCredentialsRevokedError  TURN_CREDENTIALS_REVOKED (.revoked_until)
    ├── InvalidArgumentError         INVALID_ARGUMENT (INVALID_FIELD; .field_violations)
    ├── NotFoundError                NOT_FOUND
    ├── AlreadyExistsError           ALREADY_EXISTS
    ├── ResourceExhaustedError       RESOURCE_EXHAUSTED
    │   ├── RateLimitedError             RATE_LIMITED (.reset_at, .retry_after, .limit)
    │   ├── QuotaExceededError           QUOTA_EXCEEDED (.usage, .upgrade_url, .plan)
    │   ├── ConcurrentLimitError         CONCURRENT_LIMIT (.current, .max_sessions)
    │   ├── TurnAllocationLimitError     TURN_ALLOCATION_LIMIT (.current, .max_allocations)
    │   ├── TurnByteQuotaExceededError   TURN_BYTE_QUOTA_EXCEEDED (.bytes_used, .byte_quota,
    │   │                                    .upgrade_url, .resets_at)
    │   └── UpstreamQuotaError           UPSTREAM_QUOTA_EXCEEDED
    ├── FailedPreconditionError      FAILED_PRECONDITION
    │   ├── UpstreamNotConfiguredError   UPSTREAM_NOT_CONFIGURED
    │   ├── UpstreamAuthFailedError      UPSTREAM_AUTH_FAILED (.provider, .upstream_request_id)
    │   ├── UpstreamRejectedError        UPSTREAM_REJECTED
    │   ├── CoturnOutOfStepError         COTURN_OUT_OF_STEP (a rotation coturn would not follow)
    │   └── CoturnCliNotConfiguredError  COTURN_CLI_NOT_CONFIGURED
    ├── UnavailableError             UNAVAILABLE (safe to retry)
    │   ├── UpstreamUnavailableError     UPSTREAM_UNAVAILABLE
    │   └── CoturnCliUnavailableError    COTURN_CLI_UNAVAILABLE
    ├── DeadlineExceededError        DEADLINE_EXCEEDED
    │   └── UpstreamTimeoutError         UPSTREAM_UNAVAILABLE within the deadline
    ├── CancelledError               CANCELLED
    ├── InternalError                INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED ...

`from_rpc_error` (gRPC's `RpcError`) and `from_connect_error` (Connect's `ConnectError`) are
the one place a failed call becomes one of these, the same one whichever transport carried
it: by the ErrorInfo reason (an `ErrorReason` of protos/icegate/v1/errors.proto) where icegate
sent one, else by the status code. The rich details are the same google.rpc messages on both
(trailers on gRPC, Connect error details over HTTP). The attributes read ErrorInfo metadata
under the keys of `icegate.error_metadata`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from icegate import error_metadata
from icegate.error_reasons import reason_from_wire
from icegate.v1.errors_pb2 import ErrorReason

if TYPE_CHECKING:  # the Connect runtime is imported only by clients that call over it
    from connectrpc.errors import ConnectError


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field, as the server described it."""

    field: str
    description: str


@dataclass(frozen=True)
class QuotaUsage:
    """A project's monthly session quota at the moment it ran out."""

    plan: str
    sessions_included: int
    sessions_used: int
    sessions_remaining: int


class IcegateError(Exception):
    """Base of every error the client raises; carries the status and ErrorInfo of the answer."""

    def __init__(self, message: str, *, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
                 reason: str = "", metadata: dict[str, str] | None = None,
                 details: tuple[Any, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.details = details

    @property
    def error_reason(self) -> ErrorReason.ValueType:
        """`reason` as the contract's `icegate.ErrorReason` (ERROR_REASON_UNSPECIFIED when the
        answer named none, or one this client does not know)."""
        return reason_from_wire(self.reason)

    def __str__(self) -> str:
        # NOT_FOUND NOT_FOUND says nothing twice: the reason only where it adds to the code.
        reason = f" {self.reason}" if self.reason and self.reason != self.code.name else ""
        return f"{self.code.name}{reason}: {self.message}"


class AuthenticationError(IcegateError):
    """The server did not accept the API key (missing, malformed, unknown or revoked)."""


class PermissionDeniedError(IcegateError):
    """The key is valid but may not do this."""


class ProjectForbiddenError(PermissionDeniedError):
    """The key is valid but not for the project the call names."""


class SessionPolicyError(PermissionDeniedError):
    """An option lies outside the project's session policy; `field` names it."""

    @property
    def field(self) -> str:
        return self.metadata.get(error_metadata.FIELD, "")


class TurnCredentialsRevokedError(PermissionDeniedError):
    """TURN credentials for this user or session were revoked; refused until `revoked_until`."""

    @property
    def revoked_until(self) -> datetime | None:
        value = self.metadata.get(error_metadata.REVOKED_UNTIL)
        return datetime.fromisoformat(value) if value else None


class InvalidArgumentError(IcegateError):
    """A request field is invalid; `field_violations` says which and why."""

    @property
    def field_violations(self) -> tuple[FieldViolation, ...]:
        return tuple(
            FieldViolation(v.field, v.description)
            for detail in self.details if isinstance(detail, error_details_pb2.BadRequest)
            for v in detail.field_violations
        )


class NotFoundError(IcegateError):
    """The named project, key or session does not exist."""


class AlreadyExistsError(IcegateError):
    """A resource with that identity exists already."""


class ResourceExhaustedError(IcegateError):
    """A limit was reached."""


def _retry_delay(details: tuple[Any, ...]) -> timedelta | None:
    for detail in details:
        if isinstance(detail, error_details_pb2.RetryInfo):
            return detail.retry_delay.ToTimedelta()  # type: ignore[no-any-return]
    return None


class RateLimitedError(ResourceExhaustedError):
    """The project used its requests for the current window; retry at `reset_at`."""

    @property
    def reset_at(self) -> datetime | None:
        value = self.metadata.get(error_metadata.RESET_AT)
        return datetime.fromisoformat(value) if value else None

    @property
    def retry_after(self) -> timedelta | None:
        return _retry_delay(self.details)

    @property
    def limit(self) -> int | None:
        value = self.metadata.get(error_metadata.LIMIT)
        return int(value) if value else None


class QuotaExceededError(ResourceExhaustedError):
    """The project created every session its plan includes this month."""

    @property
    def usage(self) -> QuotaUsage:
        return QuotaUsage(
            plan=self.metadata.get(error_metadata.PLAN, ""),
            sessions_included=int(self.metadata.get(error_metadata.SESSIONS_INCLUDED, 0)),
            sessions_used=int(self.metadata.get(error_metadata.SESSIONS_USED, 0)),
            sessions_remaining=int(self.metadata.get(error_metadata.SESSIONS_REMAINING, 0)),
        )

    @property
    def plan(self) -> str:
        return self.metadata.get(error_metadata.PLAN, "")

    @property
    def upgrade_url(self) -> str:
        return self.metadata.get(error_metadata.UPGRADE_URL, "")

    @property
    def resets_at(self) -> datetime | None:
        value = self.metadata.get(error_metadata.RESETS_AT)
        return datetime.fromisoformat(value) if value else None


class ConcurrentLimitError(ResourceExhaustedError):
    """The project holds as many live sessions as it may; end one first."""

    @property
    def current(self) -> int:
        return int(self.metadata.get(error_metadata.CURRENT, 0))

    @property
    def max_sessions(self) -> int:
        return int(self.metadata.get(error_metadata.MAX, 0))


class TurnAllocationLimitError(ResourceExhaustedError):
    """The project holds as many live TURN allocations as it may; wait for some to end."""

    @property
    def current(self) -> int:
        return int(self.metadata.get(error_metadata.CURRENT, 0))

    @property
    def max_allocations(self) -> int:
        return int(self.metadata.get(error_metadata.MAX, 0))


class TurnByteQuotaExceededError(ResourceExhaustedError):
    """The project's TURN allocations relayed every byte its plan includes this month."""

    @property
    def bytes_used(self) -> int:
        return int(self.metadata.get(error_metadata.BYTES_USED, 0))

    @property
    def byte_quota(self) -> int:
        return int(self.metadata.get(error_metadata.BYTE_QUOTA, 0))

    @property
    def plan(self) -> str:
        return self.metadata.get(error_metadata.PLAN, "")

    @property
    def upgrade_url(self) -> str:
        return self.metadata.get(error_metadata.UPGRADE_URL, "")

    @property
    def resets_at(self) -> datetime | None:
        value = self.metadata.get(error_metadata.RESETS_AT)
        return datetime.fromisoformat(value) if value else None


class _UpstreamDetails:
    """What the server says about a failed upstream provider call."""

    metadata: dict[str, str]

    @property
    def provider(self) -> str:
        return self.metadata.get(error_metadata.PROVIDER, "")

    @property
    def upstream_status(self) -> int:
        return int(self.metadata.get(error_metadata.UPSTREAM_STATUS, 0))

    @property
    def upstream_request_id(self) -> str:
        return self.metadata.get(error_metadata.UPSTREAM_REQUEST_ID, "")


class UpstreamQuotaError(_UpstreamDetails, ResourceExhaustedError):
    """The provider account behind the project is out of quota or credit."""


class FailedPreconditionError(IcegateError):
    """The system is not in a state where the call can succeed; fix it before retrying."""


class UpstreamNotConfiguredError(_UpstreamDetails, FailedPreconditionError):
    """The project has no key for the provider it asked for."""


class UpstreamAuthFailedError(_UpstreamDetails, FailedPreconditionError):
    """The provider refused the project's key."""


class UpstreamRejectedError(_UpstreamDetails, FailedPreconditionError):
    """The provider refused the request itself."""


class CoturnOutOfStepError(FailedPreconditionError):
    """A TURN secret rotation refused: icegate keeps no coturn database coturn would follow."""


class CoturnCliNotConfiguredError(FailedPreconditionError):
    """Ending TURN allocations needs coturn's admin CLI, which the server has not configured."""


class UnavailableError(IcegateError):
    """The server or something it depends on is unavailable; safe to retry with backoff."""

    @property
    def retry_after(self) -> timedelta | None:
        return _retry_delay(self.details)


class CoturnCliUnavailableError(UnavailableError):
    """coturn's admin CLI could not be used to end allocations; safe to retry."""


class UpstreamUnavailableError(_UpstreamDetails, UnavailableError):
    """The provider was down, slow or failing."""


class DeadlineExceededError(IcegateError):
    """The call did not finish before its deadline."""


class UpstreamTimeoutError(_UpstreamDetails, DeadlineExceededError):
    """The provider did not answer in time."""


class CancelledError(IcegateError):
    """The call was cancelled."""


class InternalError(IcegateError):
    """The server failed in a way it does not explain (a bug, or an unknown status)."""


_BY_REASON: dict[ErrorReason.ValueType, type[IcegateError]] = {
    ErrorReason.ERROR_REASON_INVALID_FIELD: InvalidArgumentError,
    ErrorReason.ERROR_REASON_MALFORMED_REQUEST: InvalidArgumentError,
    ErrorReason.ERROR_REASON_INVALID_API_KEY: AuthenticationError,
    ErrorReason.ERROR_REASON_PROJECT_FORBIDDEN: ProjectForbiddenError,
    ErrorReason.ERROR_REASON_NOT_FOUND: NotFoundError,
    ErrorReason.ERROR_REASON_ALREADY_EXISTS: AlreadyExistsError,
    ErrorReason.ERROR_REASON_RATE_LIMITED: RateLimitedError,
    ErrorReason.ERROR_REASON_QUOTA_EXCEEDED: QuotaExceededError,
    ErrorReason.ERROR_REASON_CONCURRENT_LIMIT: ConcurrentLimitError,
    ErrorReason.ERROR_REASON_STORE_UNAVAILABLE: UnavailableError,
    ErrorReason.ERROR_REASON_COTURN_OUT_OF_STEP: CoturnOutOfStepError,
    ErrorReason.ERROR_REASON_SESSION_POLICY: SessionPolicyError,
    ErrorReason.ERROR_REASON_UPSTREAM_NOT_CONFIGURED: UpstreamNotConfiguredError,
    ErrorReason.ERROR_REASON_UPSTREAM_AUTH_FAILED: UpstreamAuthFailedError,
    ErrorReason.ERROR_REASON_UPSTREAM_REJECTED: UpstreamRejectedError,
    ErrorReason.ERROR_REASON_UPSTREAM_QUOTA_EXCEEDED: UpstreamQuotaError,
    ErrorReason.ERROR_REASON_UPSTREAM_UNAVAILABLE: UpstreamUnavailableError,
    ErrorReason.ERROR_REASON_INTERNAL: InternalError,
    ErrorReason.ERROR_REASON_TURN_ALLOCATION_LIMIT: TurnAllocationLimitError,
    ErrorReason.ERROR_REASON_TURN_BYTE_QUOTA_EXCEEDED: TurnByteQuotaExceededError,
    ErrorReason.ERROR_REASON_TURN_CREDENTIALS_REVOKED: TurnCredentialsRevokedError,
    ErrorReason.ERROR_REASON_COTURN_CLI_UNAVAILABLE: CoturnCliUnavailableError,
    ErrorReason.ERROR_REASON_COTURN_CLI_NOT_CONFIGURED: CoturnCliNotConfiguredError,
}
"""The class for each reason icegate sends; an empty or unknown reason falls back on the code."""

_BY_REASON_AND_CODE: dict[tuple[ErrorReason.ValueType, grpc.StatusCode], type[IcegateError]] = {
    # One reason, two codes: the provider failed, or did not answer before the deadline.
    (ErrorReason.ERROR_REASON_UPSTREAM_UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        UpstreamTimeoutError,
}

_BY_CODE: dict[grpc.StatusCode, type[IcegateError]] = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


_DETAIL_CLASSES = {cls.DESCRIPTOR.full_name: cls for cls in (
    error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo,
    error_details_pb2.QuotaFailure, error_details_pb2.Help)}
"""The detail messages icegate sends, by their full name (`type.googleapis.com/<name>`)."""


def _typed_details(packed: Iterable[tuple[str, bytes]]
                   ) -> tuple[str, dict[str, str], tuple[Any, ...]]:
    """The reason, ErrorInfo metadata and known detail messages of (type name, bytes) pairs;
    unknown or undecodable details are left out."""
    details: list[Any] = []
    reason, metadata = "", {}
    for type_name, value in packed:
        cls = _DETAIL_CLASSES.get(type_name)
        if cls is None:
            continue
        try:
            message = cls.FromString(value)
        except DecodeError:
            continue
        details.append(message)
        if isinstance(message, error_details_pb2.ErrorInfo):
            reason, metadata = message.reason, dict(message.metadata)
    return reason, metadata, tuple(details)


def _unpack_details(error: grpc.Call) -> tuple[str, dict[str, str], tuple[Any, ...]]:
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # status and details disagree: trust the status, drop the details
        status = None
    if status is None:
        return "", {}, ()
    return _typed_details((packed.type_url.rpartition("/")[2], packed.value)
                          for packed in status.details)


def _typed(code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str],
           details: tuple[Any, ...]) -> IcegateError:
    known = reason_from_wire(reason)
    cls = (_BY_REASON_AND_CODE.get((known, code)) or _BY_REASON.get(known)
           or _BY_CODE.get(code, InternalError))
    return cls(message, code=code, reason=reason, metadata=metadata, details=details)


def from_rpc_error(error: grpc.RpcError) -> IcegateError:
    """The typed exception for a call that failed over gRPC, with its rich details as
    attributes."""
    call: Any = error
    code: grpc.StatusCode = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    message: str = (call.details() if hasattr(call, "details") else None) or code.name
    reason, metadata, details = _unpack_details(call) if hasattr(call, "trailing_metadata") \
        else ("", {}, ())
    return _typed(code, message, reason, metadata, details)


_STATUS_OF_CONNECT_CODE = {"CANCELED": grpc.StatusCode.CANCELLED, **{
    code.name: code for code in grpc.StatusCode if code is not grpc.StatusCode.OK}}
"""The gRPC status code of each Connect code, by name (the same names; gRPC spells
CANCELLED)."""


def from_connect_error(error: ConnectError) -> IcegateError:
    """The typed exception for a call that failed over Connect, with its rich details (the
    Connect error details) as attributes: the same exception gRPC would have given."""
    code = _STATUS_OF_CONNECT_CODE.get(error.code.name, grpc.StatusCode.UNKNOWN)
    reason, metadata, details = _typed_details(
        (detail.type_name, detail.message_bytes) for detail in error.details)
    return _typed(code, error.message or code.name, reason, metadata, details)
