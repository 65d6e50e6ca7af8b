"""The domain errors icegate raises, independent of gRPC.

Domain code raises these; `icegate_server.status` maps each class to a gRPC status code,
an ErrorInfo reason (an `ErrorReason` of protos/icegate/v1/errors.proto, sent as the name
below) and the rich details callers read. Messages are shown to callers, so
they never contain a secret, a key or a token.

    IcegateError
    ├── InvalidFieldError            INVALID_ARGUMENT     INVALID_FIELD
    ├── MalformedRequestError        INVALID_ARGUMENT     MALFORMED_REQUEST
    ├── InvalidApiKeyError           UNAUTHENTICATED      INVALID_API_KEY
    ├── ProjectForbiddenError        PERMISSION_DENIED    PROJECT_FORBIDDEN
    ├── NotFoundError                NOT_FOUND            NOT_FOUND
    ├── AlreadyExistsError           ALREADY_EXISTS       ALREADY_EXISTS
    ├── RateLimitedError             RESOURCE_EXHAUSTED   RATE_LIMITED
    ├── QuotaExceededError           RESOURCE_EXHAUSTED   QUOTA_EXCEEDED
    ├── ConcurrentLimitError         RESOURCE_EXHAUSTED   CONCURRENT_LIMIT
    ├── TurnAllocationLimitError     RESOURCE_EXHAUSTED   TURN_ALLOCATION_LIMIT
    ├── TurnByteQuotaExceededError   RESOURCE_EXHAUSTED   TURN_BYTE_QUOTA_EXCEEDED
    ├── TurnCredentialsRevokedError  PERMISSION_DENIED    TURN_CREDENTIALS_REVOKED
    ├── StoreUnavailableError        UNAVAILABLE          STORE_UNAVAILABLE
    ├── CoturnOutOfStepError         FAILED_PRECONDITION  COTURN_OUT_OF_STEP
    ├── SessionPolicyError           PERMISSION_DENIED    SESSION_POLICY
    ├── CoturnCliUnavailableError    UNAVAILABLE          COTURN_CLI_UNAVAILABLE
    ├── CoturnCliNotConfiguredError  FAILED_PRECONDITION  COTURN_CLI_NOT_CONFIGURED
    └── UpstreamError
        ├── UpstreamNotConfiguredError   FAILED_PRECONDITION  UPSTREAM_NOT_CONFIGURED
        ├── UpstreamAuthFailedError      FAILED_PRECONDITION  UPSTREAM_AUTH_FAILED
        ├── UpstreamRejectedError        FAILED_PRECONDITION  UPSTREAM_REJECTED
        ├── UpstreamQuotaError           RESOURCE_EXHAUSTED   UPSTREAM_QUOTA_EXCEEDED
        ├── UpstreamUnavailableError     UNAVAILABLE          UPSTREAM_UNAVAILABLE
        └── UpstreamTimeoutError         DEADLINE_EXCEEDED    UPSTREAM_UNAVAILABLE
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


class IcegateError(Exception):
    """Base of every error icegate reports to a caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: its name (as in the proto) and what is wrong with it."""

    field: str
    description: str


class InvalidFieldError(IcegateError):
    """A request field breaks a rule; carries one violation per bad field."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.violations = (FieldViolation(field, description),)


class MalformedRequestError(IcegateError):
    """The request body does not parse as the RPC's request message."""


class InvalidApiKeyError(IcegateError):
    """The caller sent no key, a malformed one, or one icegate does not know."""


class ProjectForbiddenError(IcegateError):
    """The caller's key is valid but not for the project the call names."""


class NotFoundError(IcegateError):
    """The named resource (project, key, session) does not exist."""


class AlreadyExistsError(IcegateError):
    """A resource with that identity exists already."""


class RateLimitedError(IcegateError):
    """The project has used its requests for the current window."""

    def __init__(self, *, limit: int, window_seconds: int, reset_at: datetime,
                 retry_after_seconds: float) -> None:
        super().__init__(
            f"rate limit of {limit} requests per {window_seconds} s reached; "
            f"retry after {reset_at.isoformat()}"
        )
        self.limit = limit
        self.window_seconds = window_seconds
        self.reset_at = reset_at
        self.retry_after_seconds = retry_after_seconds


class QuotaExceededError(IcegateError):
    """The project has created all the sessions its plan includes this month."""

    def __init__(self, *, plan: str, included: int, used: int, upgrade_url: str,
                 resets_at: datetime) -> None:
        super().__init__(
            f"monthly session quota of {included} used up ({used} used) on plan {plan!r}"
        )
        self.plan = plan
        self.included = included
        self.used = used
        self.upgrade_url = upgrade_url
        self.resets_at = resets_at


class ConcurrentLimitError(IcegateError):
    """The project holds as many live sessions as it may."""

    def __init__(self, *, current: int, maximum: int) -> None:
        super().__init__(f"concurrent session limit reached ({current} of {maximum} active)")
        self.current = current
        self.maximum = maximum


class TurnAllocationLimitError(IcegateError):
    """The project holds as many live TURN allocations as its `max_allocations` allows."""

    def __init__(self, *, current: int, maximum: int) -> None:
        super().__init__(f"TURN allocation limit reached ({current} of {maximum} live)")
        self.current = current
        self.maximum = maximum


class TurnByteQuotaExceededError(IcegateError):
    """The project's TURN allocations relayed its monthly byte quota."""

    def __init__(self, *, plan: str, used: int, quota: int, upgrade_url: str,
                 resets_at: datetime) -> None:
        super().__init__(f"monthly TURN byte quota of {quota} bytes used up ({used} relayed) "
                         f"on plan {plan!r}")
        self.plan = plan
        self.used = used
        self.quota = quota
        self.upgrade_url = upgrade_url
        self.resets_at = resets_at


class TurnCredentialsRevokedError(IcegateError):
    """TURN credentials for this user or session were revoked, until `revoked_until`."""

    def __init__(self, *, subject: str, revoked_until: datetime) -> None:
        super().__init__(f"TURN credentials for {subject!r} are revoked until "
                         f"{revoked_until.isoformat()}")
        self.revoked_until = revoked_until


class StoreUnavailableError(IcegateError):
    """The state store (SQLite file or Redis) cannot be reached or written."""


class CoturnOutOfStepError(IcegateError):
    """A TURN secret rotation coturn would not follow: icegate keeps no coturn userdb."""


class SessionPolicyError(IcegateError):
    """An option of the call lies outside the project's session policy; `field` names it."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description} (the project's session policy)")
        self.field = field


class CoturnCliUnavailableError(IcegateError):
    """coturn's admin CLI could not be used to end allocations (unreachable, refused)."""


class CoturnCliNotConfiguredError(IcegateError):
    """Ending allocations needs coturn's admin CLI, and none is configured."""


class UpstreamError(IcegateError):
    """An upstream AI provider could not mint a token.

    `provider` is the provider's short name, `upstream_status` the HTTP status it answered
    (0 when no answer came), `upstream_request_id` its request id where it sent one.
    """

    def __init__(self, message: str, *, provider: str, upstream_status: int = 0,
                 upstream_request_id: str = "", retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.upstream_status = upstream_status
        self.upstream_request_id = upstream_request_id
        self.retry_after_seconds = retry_after_seconds


class UpstreamNotConfiguredError(UpstreamError):
    """The project has no key for the provider it asked for."""


class UpstreamAuthFailedError(UpstreamError):
    """The provider refused the project's key (401/403)."""


class UpstreamRejectedError(UpstreamError):
    """The provider refused the request itself (400/404/422): retrying will not help."""


class UpstreamQuotaError(UpstreamError):
    """The provider account is out of quota or credit: retrying will not help."""


class UpstreamUnavailableError(UpstreamError):
    """The provider was down, refused the connection, rate limited us or answered 5xx."""


class UpstreamTimeoutError(UpstreamError):
    """The provider did not answer before the caller's deadline or icegate's timeout."""
