"""icegate: the typed Python client for the icegate service (sync and asyncio).

    import icegate
    with icegate.Client() as client:          # ICEGATE_TARGET / ICEGATE_API_KEY
        session = icegate.browser_session(client.create_session(voice="echo"))  # JSON
    # in a web handler: except icegate.IcegateError as error: icegate.http_error(error)
"""

from icegate.aio import AsyncClient
from icegate.browser import (
    HttpAnswer,
    browser_call,
    browser_options,
    browser_session,
    http_error,
)
from icegate.client import Client
from icegate.connection import ConfigurationError, TlsConfig
from icegate.errors import (
    AlreadyExistsError,
    AuthenticationError,
    CancelledError,
    ConcurrentLimitError,
    CoturnCliNotConfiguredError,
    CoturnCliUnavailableError,
    CoturnOutOfStepError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    IcegateError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ProjectForbiddenError,
    QuotaExceededError,
    QuotaUsage,
    RateLimitedError,
    ResourceExhaustedError,
    SessionPolicyError,
    TurnAllocationLimitError,
    TurnByteQuotaExceededError,
    TurnCredentialsRevokedError,
    UnavailableError,
    UpstreamAuthFailedError,
    UpstreamNotConfiguredError,
    UpstreamQuotaError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from icegate.ice import rtc_ice_servers
from icegate.v1.errors_pb2 import ErrorReason

__all__ = [
    "AlreadyExistsError",
    "AsyncClient",
    "AuthenticationError",
    "CancelledError",
    "Client",
    "ConcurrentLimitError",
    "ConfigurationError",
    "CoturnCliNotConfiguredError",
    "CoturnCliUnavailableError",
    "CoturnOutOfStepError",
    "DeadlineExceededError",
    "ErrorReason",
    "FailedPreconditionError",
    "FieldViolation",
    "HttpAnswer",
    "IcegateError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProjectForbiddenError",
    "QuotaExceededError",
    "QuotaUsage",
    "RateLimitedError",
    "ResourceExhaustedError",
    "SessionPolicyError",
    "TlsConfig",
    "TurnAllocationLimitError",
    "TurnByteQuotaExceededError",
    "TurnCredentialsRevokedError",
    "UnavailableError",
    "UpstreamAuthFailedError",
    "UpstreamNotConfiguredError",
    "UpstreamQuotaError",
    "UpstreamRejectedError",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
    "browser_call",
    "browser_options",
    "browser_session",
    "http_error",
    "rtc_ice_servers",
]
