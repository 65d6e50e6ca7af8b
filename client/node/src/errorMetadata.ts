/**
 * The ErrorInfo metadata keys icegate's server writes: the same spelling as the Python
 * client's `icegate.error_metadata` (a test compares the two). Every value is a string:
 * numbers in decimal, times in ISO 8601 with a UTC offset. Which reason carries which keys is
 * documented on each value of `ErrorReason` (protos/icegate/v1/errors.proto).
 */
export const ErrorMetadata = {
  /** RATE_LIMITED: the project's requests per rate-limit window. */
  LIMIT: "limit",
  /** RATE_LIMITED: the length of the rate-limit window, in seconds. */
  WINDOW_SECONDS: "window_seconds",
  /** RATE_LIMITED: when the refused request would next be admitted. */
  RESET_AT: "reset_at",
  /** QUOTA_EXCEEDED, TURN_BYTE_QUOTA_EXCEEDED: the project's plan name. */
  PLAN: "plan",
  /** QUOTA_EXCEEDED: the sessions the plan includes per month. */
  SESSIONS_INCLUDED: "sessions_included",
  /** QUOTA_EXCEEDED: the sessions created this month. */
  SESSIONS_USED: "sessions_used",
  /** QUOTA_EXCEEDED: the sessions left this month (never negative). */
  SESSIONS_REMAINING: "sessions_remaining",
  /** QUOTA_EXCEEDED, TURN_BYTE_QUOTA_EXCEEDED: where the plan is upgraded (may be empty). */
  UPGRADE_URL: "upgrade_url",
  /** QUOTA_EXCEEDED, TURN_BYTE_QUOTA_EXCEEDED: when the monthly quota starts again. */
  RESETS_AT: "resets_at",
  /** CONCURRENT_LIMIT, TURN_ALLOCATION_LIMIT: the live sessions (allocations) now. */
  CURRENT: "current",
  /** CONCURRENT_LIMIT, TURN_ALLOCATION_LIMIT: the most the project may hold. */
  MAX: "max",
  /** TURN_BYTE_QUOTA_EXCEEDED: the bytes relayed this month. */
  BYTES_USED: "bytes_used",
  /** TURN_BYTE_QUOTA_EXCEEDED: the monthly TURN byte quota. */
  BYTE_QUOTA: "byte_quota",
  /** TURN_CREDENTIALS_REVOKED: until when the credentials are refused. */
  REVOKED_UNTIL: "revoked_until",
  /** UPSTREAM_*: the provider's short name (`openai`, `gemini`, ...). */
  PROVIDER: "provider",
  /** UPSTREAM_*: the HTTP status the provider answered; `0` when no answer came. */
  UPSTREAM_STATUS: "upstream_status",
  /** UPSTREAM_*: the provider's request id, only when it sent one. */
  UPSTREAM_REQUEST_ID: "upstream_request_id",
  /** SESSION_POLICY: the SessionOptions field outside the project's session policy. */
  FIELD: "field",
} as const;
