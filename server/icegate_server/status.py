"""The one place domain errors become gRPC statuses with google.rpc rich error details.

`ERROR_TABLE` maps each error class to its status code and `ErrorReason` (the enum of
protos/icegate/v1/errors.proto, written on the wire by `icegate.error_reasons.wire_reason`);
`to_grpc_status` adds the details a caller acts on (BadRequest, RetryInfo, QuotaFailure) and
ErrorInfo metadata, under the keys of `icegate.error_metadata`, with the figures the typed
client exposes as attributes.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from icegate import error_metadata
from icegate.error_reasons import wire_reason
from icegate.v1.errors_pb2 import ErrorReason
from icegate_server import errors

ERROR_DOMAIN = "icegate.dev"
"""ErrorInfo.domain of every error icegate raises."""


ERROR_TABLE: dict[type[errors.IcegateError], tuple[grpc.StatusCode, ErrorReason.ValueType]] = {
    errors.InvalidFieldError:
        (grpc.StatusCode.INVALID_ARGUMENT, ErrorReason.ERROR_REASON_INVALID_FIELD),
    errors.MalformedRequestError:
        (grpc.StatusCode.INVALID_ARGUMENT, ErrorReason.ERROR_REASON_MALFORMED_REQUEST),
    errors.InvalidApiKeyError:
        (grpc.StatusCode.UNAUTHENTICATED, ErrorReason.ERROR_REASON_INVALID_API_KEY),
    errors.ProjectForbiddenError:
        (grpc.StatusCode.PERMISSION_DENIED, ErrorReason.ERROR_REASON_PROJECT_FORBIDDEN),
    errors.NotFoundError:
        (grpc.StatusCode.NOT_FOUND, ErrorReason.ERROR_REASON_NOT_FOUND),
    errors.AlreadyExistsError:
        (grpc.StatusCode.ALREADY_EXISTS, ErrorReason.ERROR_REASON_ALREADY_EXISTS),
    errors.RateLimitedError:
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorReason.ERROR_REASON_RATE_LIMITED),
    errors.QuotaExceededError:
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorReason.ERROR_REASON_QUOTA_EXCEEDED),
    errors.ConcurrentLimitError:
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorReason.ERROR_REASON_CONCURRENT_LIMIT),
    errors.TurnAllocationLimitError:
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorReason.ERROR_REASON_TURN_ALLOCATION_LIMIT),
    errors.TurnByteQuotaExceededError:
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorReason.ERROR_REASON_TURN_BYTE_QUOTA_EXCEEDED),
    errors.TurnCredentialsRevokedError:
        (grpc.StatusCode.PERMISSION_DENIED, ErrorReason.ERROR_REASON_TURN_CREDENTIALS_REVOKED),
    errors.StoreUnavailableError:
        (grpc.StatusCode.UNAVAILABLE, ErrorReason.ERROR_REASON_STORE_UNAVAILABLE),
    errors.CoturnCliUnavailableError:
        (grpc.StatusCode.UNAVAILABLE, ErrorReason.ERROR_REASON_COTURN_CLI_UNAVAILABLE),
    errors.CoturnCliNotConfiguredError:
        (grpc.StatusCode.FAILED_PRECONDITION,
         ErrorReason.ERROR_REASON_COTURN_CLI_NOT_CONFIGURED),
    errors.CoturnOutOfStepError:
        (grpc.StatusCode.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_COTURN_OUT_OF_STEP),
    errors.SessionPolicyError:
        (grpc.StatusCode.PERMISSION_DENIED, ErrorReason.ERROR_REASON_SESSION_POLICY),
    errors.UpstreamNotConfiguredError:
        (grpc.StatusCode.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_UPSTREAM_NOT_CONFIGURED),
    errors.UpstreamAuthFailedError:
        (grpc.StatusCode.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_UPSTREAM_AUTH_FAILED),
    errors.UpstreamRejectedError:
        (grpc.StatusCode.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_UPSTREAM_REJECTED),
    errors.UpstreamQuotaError:
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorReason.ERROR_REASON_UPSTREAM_QUOTA_EXCEEDED),
    errors.UpstreamUnavailableError:
        (grpc.StatusCode.UNAVAILABLE, ErrorReason.ERROR_REASON_UPSTREAM_UNAVAILABLE),
    errors.UpstreamTimeoutError:
        (grpc.StatusCode.DEADLINE_EXCEEDED, ErrorReason.ERROR_REASON_UPSTREAM_UNAVAILABLE),
}
"""Each domain error class's status code and ErrorInfo reason; a subclass without its own row
takes its nearest base's."""

INTERNAL_REASON = wire_reason(ErrorReason.ERROR_REASON_INTERNAL)
"""The ErrorInfo reason of a bug: any exception that is not an `IcegateError`."""


def lookup(error: errors.IcegateError) -> tuple[grpc.StatusCode, str]:
    """The status code and ErrorInfo reason string of `error`, from its class or its nearest
    mapped base."""
    for cls in type(error).__mro__:
        if cls in ERROR_TABLE:
            code, reason = ERROR_TABLE[cls]
            return code, wire_reason(reason)
    return grpc.StatusCode.INTERNAL, INTERNAL_REASON


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = math.ceil(max(seconds, 0.0))
    return duration_pb2.Duration(seconds=whole)


def _quota_failure(description: str) -> any_pb2.Any:
    return _pack(error_details_pb2.QuotaFailure(violations=[
        error_details_pb2.QuotaFailure.Violation(subject="project", description=description)
    ]))


def _upgrade_help(url: str) -> any_pb2.Any:
    return _pack(error_details_pb2.Help(links=[
        error_details_pb2.Help.Link(description="Upgrade plan", url=url)
    ]))


def to_rpc_status(error: errors.IcegateError) -> status_pb2.Status:
    """The google.rpc.Status for `error`: code, message, ErrorInfo and the details that apply."""
    code, reason = lookup(error)
    metadata: dict[str, str] = {}
    details: list[any_pb2.Any] = []

    if isinstance(error, errors.InvalidFieldError):
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ])))
    elif isinstance(error, errors.RateLimitedError):
        metadata.update({
            error_metadata.LIMIT: str(error.limit),
            error_metadata.WINDOW_SECONDS: str(error.window_seconds),
            error_metadata.RESET_AT: error.reset_at.isoformat(),
        })
        details.append(_pack(error_details_pb2.RetryInfo(
            retry_delay=_duration(error.retry_after_seconds))))
    elif isinstance(error, errors.QuotaExceededError):
        remaining = max(error.included - error.used, 0)
        metadata.update({
            error_metadata.PLAN: error.plan,
            error_metadata.SESSIONS_INCLUDED: str(error.included),
            error_metadata.SESSIONS_USED: str(error.used),
            error_metadata.SESSIONS_REMAINING: str(remaining),
            error_metadata.UPGRADE_URL: error.upgrade_url,
            error_metadata.RESETS_AT: error.resets_at.isoformat(),
        })
        details.append(_quota_failure(error.message))
        if error.upgrade_url:
            details.append(_upgrade_help(error.upgrade_url))
    elif isinstance(error, errors.ConcurrentLimitError):
        metadata.update({
            error_metadata.CURRENT: str(error.current),
            error_metadata.MAX: str(error.maximum),
        })
    elif isinstance(error, errors.SessionPolicyError):
        metadata[error_metadata.FIELD] = error.field
    elif isinstance(error, errors.TurnAllocationLimitError):
        metadata.update({
            error_metadata.CURRENT: str(error.current),
            error_metadata.MAX: str(error.maximum),
        })
        details.append(_quota_failure(error.message))
    elif isinstance(error, errors.TurnByteQuotaExceededError):
        metadata.update({
            error_metadata.PLAN: error.plan,
            error_metadata.BYTES_USED: str(error.used),
            error_metadata.BYTE_QUOTA: str(error.quota),
            error_metadata.UPGRADE_URL: error.upgrade_url,
            error_metadata.RESETS_AT: error.resets_at.isoformat(),
        })
        details.append(_quota_failure(error.message))
        if error.upgrade_url:
            details.append(_upgrade_help(error.upgrade_url))
    elif isinstance(error, errors.TurnCredentialsRevokedError):
        metadata[error_metadata.REVOKED_UNTIL] = error.revoked_until.isoformat()
    elif isinstance(error, errors.UpstreamError):
        metadata.update({
            error_metadata.PROVIDER: error.provider,
            error_metadata.UPSTREAM_STATUS: str(error.upstream_status),
        })
        if error.upstream_request_id:
            metadata[error_metadata.UPSTREAM_REQUEST_ID] = error.upstream_request_id
        if error.retry_after_seconds is not None:
            details.append(_pack(error_details_pb2.RetryInfo(
                retry_delay=_duration(error.retry_after_seconds))))

    details.insert(0, _pack(error_details_pb2.ErrorInfo(
        reason=reason, domain=ERROR_DOMAIN, metadata=metadata)))
    return status_pb2.Status(code=code.value[0], message=_bounded(error.message),
                             details=details)


MAX_MESSAGE_CHARS = 512
"""Longer error messages are cut: a message may quote caller input, and status details
travel in trailers that clients cap (grpc: 8 KiB soft, 16 KiB hard)."""


def _bounded(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "…"


def to_grpc_status(error: errors.IcegateError) -> grpc.Status:
    """`to_rpc_status` in the form `ServicerContext.abort_with_status` takes."""
    return rpc_status.to_status(to_rpc_status(error))  # type: ignore[no-any-return]


INTERNAL_RPC_STATUS = status_pb2.Status(
    code=code_pb2.INTERNAL,
    message="internal error; the server log has the details",
    details=[_pack(error_details_pb2.ErrorInfo(reason=INTERNAL_REASON, domain=ERROR_DOMAIN))],
)
"""What a caller sees for a bug: nothing of the exception, which may hold anything."""

INTERNAL_STATUS = rpc_status.to_status(INTERNAL_RPC_STATUS)
"""`INTERNAL_RPC_STATUS` in the form `ServicerContext.abort` takes."""
