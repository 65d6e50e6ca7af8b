"""What a web backend hands its browser, and the HTTP answer for each icegate error.

    @app.post("/api/realtime-session")
    async def realtime_session(body: SessionRequest) -> dict:
        return icegate.browser_session(await client.create_session(voice=body.voice))

`browser_session` and `browser_call` turn icegate's answers into JSON-ready dicts in the shape
a browser uses as is (`new RTCPeerConnection({iceServers})`, `setRemoteDescription(answer)`);
no icegate key or provider key is ever in them. `http_error` maps every `IcegateError` to an
HTTP status, headers and a JSON body in the shapes the seeds' SDK users know: 402 with `usage`
and `upgrade_url`, 429 with `resetAt` and `Retry-After`, 429 `concurrent_limit_exceeded` with
`current` and `max`; 502 for what the backend's operator must fix (no provider key, a refused
key, icegate refusing the backend's own key), which the browser cannot.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import grpc
from google.rpc import error_details_pb2

from icegate import errors
from icegate.error_reasons import wire_reason
from icegate.ice import iso_timestamp, rtc_ice_servers
from icegate.v1 import credentials_pb2, sessions_pb2
from icegate.v1.errors_pb2 import ErrorReason

log = logging.getLogger("icegate.browser")


class HttpAnswer(NamedTuple):
    """An HTTP answer for the browser: status code, extra headers, JSON body."""

    status: int
    headers: dict[str, str]
    body: dict[str, Any]


BROWSER_OPTIONS = ("voice", "instructions")
"""The session options a browser may choose itself; the rest is the backend's to set."""


def _refused(field: str, description: str) -> errors.InvalidArgumentError:
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
    return errors.InvalidArgumentError(
        f"{field}: {description}", code=grpc.StatusCode.INVALID_ARGUMENT,
        reason=wire_reason(ErrorReason.ERROR_REASON_INVALID_FIELD),
        details=(error_details_pb2.BadRequest(field_violations=[violation]),))


def browser_options(body: bytes | str | Mapping[str, Any] | None) -> dict[str, str]:
    """The session options the browser chose (`voice`, `instructions`), from its request body.

    Args:
        body: The raw JSON body (bytes or text; empty means none), or one already parsed.
            Other keys are ignored.

    Returns:
        The options present, as keyword arguments for `create_session` or `create_call`.

    Raises:
        InvalidArgumentError: The body is not a JSON object, or an option is not a string
            (`http_error` answers 400 naming the field); icegate then checks the values.
    """
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body) if body.strip() else None
        except ValueError:
            raise _refused("body", "is not JSON") from None
    if body is None:
        return {}
    if not isinstance(body, Mapping):
        raise _refused("body", "must be a JSON object")
    options = {}
    for name in BROWSER_OPTIONS:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise _refused(name, "must be a string")
        options[name] = value
    return options


def merged_ice_servers(*lists: Iterable[credentials_pb2.IceServer]) -> list[dict[str, Any]]:
    """One RTCIceServer list from several (icegate's, the provider's...), in order, each
    entry once: an entry whose URLs and credential an earlier one holds already is left out."""
    seen: set[tuple[tuple[str, ...], str, str]] = set()
    unique = []
    for servers in lists:
        for server in servers:
            identity = (tuple(server.urls), server.username, server.credential)
            if server.urls and identity not in seen:
                seen.add(identity)
                unique.append(server)
    return rtc_ice_servers(unique)


def browser_session(created: sessions_pb2.CreateSessionResponse,
                    ice: credentials_pb2.GetIceServersResponse | None = None) -> dict[str, Any]:
    """What a browser needs to open a realtime session with an ephemeral token.

    Args:
        created: `create_session`'s answer.
        ice: A `get_ice_servers` answer whose servers join the list (after the session's
            own, before the provider's), e.g. for a TURN credential of another lifetime.

    Returns:
        `{"sessionId", "ephemeralToken", "expiresAt", "iceServers", "model", "voice"}`:
        `expiresAt` is ISO 8601 in UTC (`2026-01-02T08:04:55.299Z`, None when the provider
        gave no expiry); `iceServers` is one RTCIceServer list (icegate's STUN and TURN
        entries and the provider's, e.g. Orga's), each entry once.
    """
    token = created.ephemeral_token
    return {
        "sessionId": created.session_id,
        "ephemeralToken": token.value,
        "expiresAt": iso_timestamp(token.expire_time) if token.HasField("expire_time")
        else None,
        "iceServers": merged_ice_servers(created.ice_servers,
                                         ice.ice_servers if ice is not None else (),
                                         created.provider_ice_servers),
        "model": created.model,
        "voice": created.voice,
    }


def browser_call(created: sessions_pb2.CreateCallResponse) -> dict[str, Any]:
    """What a browser needs to finish a call icegate started for its SDP offer (no token:
    the provider key stayed in icegate).

    Returns:
        `{"sessionId", "callId", "answer", "iceServers", "model"}`, where `answer` is the
        RTCSessionDescriptionInit for `setRemoteDescription` (`{"type": "answer", "sdp"}`).
    """
    return {
        "sessionId": created.session_id,
        "callId": created.call_id,
        "answer": {"type": "answer", "sdp": created.sdp_answer},
        "iceServers": merged_ice_servers(created.ice_servers),
        "model": created.model,
    }


def _retry_after(delay: timedelta | None) -> dict[str, str]:
    """The Retry-After header (whole seconds, at least 1) when the server said when."""
    if delay is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(delay.total_seconds())))}


def _iso(value: datetime | None) -> str | None:
    return None if value is None else iso_timestamp(value)


def _rate_limited(error: errors.RateLimitedError) -> HttpAnswer:
    reset_at = error.reset_at
    return HttpAnswer(429, _retry_after(error.retry_after),
                      {"error": "rate_limited", "resetAt": _iso(reset_at), "limit": error.limit})


def _quota_exceeded(error: errors.QuotaExceededError) -> HttpAnswer:
    return HttpAnswer(402, {}, {"error": "quota_exceeded", "usage": asdict(error.usage),
                                "upgrade_url": error.upgrade_url,
                                "resetsAt": _iso(error.resets_at)})


def _byte_quota_exceeded(error: errors.TurnByteQuotaExceededError) -> HttpAnswer:
    return HttpAnswer(402, {}, {
        "error": "turn_byte_quota_exceeded",
        "usage": {"plan": error.plan, "bytes_used": error.bytes_used,
                  "byte_quota": error.byte_quota},
        "upgrade_url": error.upgrade_url, "resetsAt": _iso(error.resets_at)})


def _concurrent_limit(error: errors.ConcurrentLimitError) -> HttpAnswer:
    return HttpAnswer(429, {}, {"error": "concurrent_limit_exceeded", "current": error.current,
                                "max": error.max_sessions})


def _allocation_limit(error: errors.TurnAllocationLimitError) -> HttpAnswer:
    return HttpAnswer(429, {}, {"error": "turn_allocation_limit_exceeded",
                                "current": error.current, "max": error.max_allocations})


def _invalid_argument(error: errors.InvalidArgumentError) -> HttpAnswer:
    return HttpAnswer(400, {}, {"error": "invalid_argument", "fields": [
        {"field": v.field, "description": v.description} for v in error.field_violations]})


def _session_policy(error: errors.SessionPolicyError) -> HttpAnswer:
    return HttpAnswer(403, {}, {"error": "session_policy", "field": error.field})


def _revoked(error: errors.TurnCredentialsRevokedError) -> HttpAnswer:
    return HttpAnswer(403, {}, {"error": "turn_credentials_revoked",
                                "revokedUntil": _iso(error.revoked_until)})


def _not_found(error: errors.NotFoundError) -> HttpAnswer:
    return HttpAnswer(404, {}, {"error": "session_not_found"})


def _busy(error: errors.IcegateError) -> HttpAnswer:
    delay = error.retry_after if isinstance(error, errors.UnavailableError) else None
    return HttpAnswer(503, _retry_after(delay), {"error": "temporarily_unavailable"})


def _ours_to_fix(error: errors.IcegateError) -> HttpAnswer:
    # The browser did nothing wrong and cannot fix it: say so (502) with the reason only,
    # and tell the operator in the log (the message is icegate's, scrubbed of secrets).
    log.error("icegate refused the backend: %s", error)
    return HttpAnswer(502, {}, {"error": "session_unavailable", "reason": error.reason})


_ANSWERS: dict[type[errors.IcegateError], Callable[[Any], HttpAnswer]] = {
    # What the browser asked for, or its user's limits: the browser's to hear.
    errors.InvalidArgumentError: _invalid_argument,
    errors.SessionPolicyError: _session_policy,
    errors.TurnCredentialsRevokedError: _revoked,
    errors.NotFoundError: _not_found,
    errors.RateLimitedError: _rate_limited,
    errors.QuotaExceededError: _quota_exceeded,
    errors.ConcurrentLimitError: _concurrent_limit,
    errors.TurnAllocationLimitError: _allocation_limit,
    errors.TurnByteQuotaExceededError: _byte_quota_exceeded,
    # Passing trouble: try again later.
    errors.UnavailableError: _busy,
    errors.UpstreamUnavailableError: _busy,
    errors.CoturnCliUnavailableError: _busy,
    errors.DeadlineExceededError: _busy,
    errors.UpstreamTimeoutError: _busy,
    errors.CancelledError: _busy,
    # The backend's set-up (its icegate key, the project's provider key or account, the
    # TURN deployment) or a fault: the operator's to fix, not the browser's.
    errors.IcegateError: _ours_to_fix,
    errors.AuthenticationError: _ours_to_fix,
    errors.PermissionDeniedError: _ours_to_fix,
    errors.ProjectForbiddenError: _ours_to_fix,
    errors.AlreadyExistsError: _ours_to_fix,
    errors.ResourceExhaustedError: _ours_to_fix,
    errors.UpstreamQuotaError: _ours_to_fix,
    errors.FailedPreconditionError: _ours_to_fix,
    errors.UpstreamNotConfiguredError: _ours_to_fix,
    errors.UpstreamAuthFailedError: _ours_to_fix,
    errors.UpstreamRejectedError: _ours_to_fix,
    errors.CoturnOutOfStepError: _ours_to_fix,
    errors.CoturnCliNotConfiguredError: _ours_to_fix,
    errors.InternalError: _ours_to_fix,
}
"""The answer for each error class; a class not listed takes its nearest listed base's."""


def http_error(error: errors.IcegateError) -> HttpAnswer:
    """The HTTP answer to the browser for an icegate error: never a key, never internals.

    | error | status | body |
    |---|---|---|
    | InvalidArgumentError | 400 | `{"error": "invalid_argument", "fields": [{field, description}]}` |
    | SessionPolicyError | 403 | `{"error": "session_policy", "field"}` |
    | TurnCredentialsRevokedError | 403 | `{"error": "turn_credentials_revoked", "revokedUntil"}` |
    | NotFoundError | 404 | `{"error": "session_not_found"}` |
    | QuotaExceededError | 402 | `{"error": "quota_exceeded", "usage", "upgrade_url", "resetsAt"}` |
    | TurnByteQuotaExceededError | 402 | `{"error": "turn_byte_quota_exceeded", "usage", "upgrade_url", "resetsAt"}` |
    | RateLimitedError | 429 + Retry-After | `{"error": "rate_limited", "resetAt", "limit"}` |
    | ConcurrentLimitError | 429 | `{"error": "concurrent_limit_exceeded", "current", "max"}` |
    | TurnAllocationLimitError | 429 | `{"error": "turn_allocation_limit_exceeded", "current", "max"}` |
    | Unavailable, DeadlineExceeded, Cancelled (icegate's or the provider's) | 503 (+ Retry-After when known) | `{"error": "temporarily_unavailable"}` |
    | anything else (keys, provider set-up, internal) | 502, logged | `{"error": "session_unavailable", "reason"}` |
    """  # noqa: E501 - a table reads better whole
    for cls in type(error).__mro__:
        answer = _ANSWERS.get(cls)
        if answer is not None:
            return answer(error)
    raise TypeError(f"not an icegate error: {type(error).__name__}")
