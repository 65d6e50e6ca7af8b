"""The ErrorInfo metadata keys icegate's server writes and its client reads: one spelling.

Every value is a string: numbers in decimal, times in ISO 8601 with a UTC offset. Which
reason carries which keys is documented on each value of `ErrorReason`
(`protos/icegate/v1/errors.proto`).
"""

from __future__ import annotations

from typing import Final

# RATE_LIMITED
LIMIT: Final = "limit"
"""The project's requests per rate-limit window."""
WINDOW_SECONDS: Final = "window_seconds"
"""The length of the rate-limit window, in seconds."""
RESET_AT: Final = "reset_at"
"""When the refused request would next be admitted."""

# QUOTA_EXCEEDED
PLAN: Final = "plan"
"""The project's plan name."""
SESSIONS_INCLUDED: Final = "sessions_included"
"""The sessions the plan includes per month."""
SESSIONS_USED: Final = "sessions_used"
"""The sessions created this month."""
SESSIONS_REMAINING: Final = "sessions_remaining"
"""The sessions left this month (never negative)."""
UPGRADE_URL: Final = "upgrade_url"
"""Where the project's plan is upgraded (empty when the project has none)."""
RESETS_AT: Final = "resets_at"
"""When the monthly quota starts again (the first of the next month, UTC)."""

# CONCURRENT_LIMIT
CURRENT: Final = "current"
"""The project's live sessions."""
MAX: Final = "max"
"""The most live sessions the project may hold."""

# TURN_ALLOCATION_LIMIT: CURRENT and MAX (live allocations). TURN_BYTE_QUOTA_EXCEEDED: PLAN,
# UPGRADE_URL, RESETS_AT and
BYTES_USED: Final = "bytes_used"
"""The bytes the project's TURN allocations relayed this month."""
BYTE_QUOTA: Final = "byte_quota"
"""The project's monthly TURN byte quota."""

# TURN_CREDENTIALS_REVOKED
REVOKED_UNTIL: Final = "revoked_until"
"""Until when the user's or session's TURN credentials are refused."""

# UPSTREAM_*
PROVIDER: Final = "provider"
"""The provider's short name (`openai`, `gemini`, ...)."""
UPSTREAM_STATUS: Final = "upstream_status"
"""The HTTP status the provider answered; `0` when no answer came."""
UPSTREAM_REQUEST_ID: Final = "upstream_request_id"
"""The provider's request id, only when it sent one."""

# SESSION_POLICY
FIELD: Final = "field"
"""The SessionOptions field outside the project's session policy."""
