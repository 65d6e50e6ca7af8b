"""icegate: the typed Python client for the icegate service (sync and asyncio).

    from icegate import Client
    with Client() as icegate:                 # ICEGATE_TARGET / ICEGATE_API_KEY
        servers = icegate.get_ice_servers("alice", ttl=600)
        ice_servers = rtc_ice_servers(servers.ice_servers)   # JSON for the browser
"""

from icegate.aio import AsyncClient
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
    "rtc_ice_servers",
]
