"""The provider interface, the data it trades in, and the one HTTP path every adapter uses.

An adapter turns `SessionOptions` into one provider's request, sends it through `UpstreamHttp`
(deadline, retries, error mapping) and turns the answer into a `MintedToken`. Nothing outside
an adapter module knows a provider's URL, header or JSON shape.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from random import random as _system_random
from typing import Any, Protocol

import httpx

from icegate_server.clock import Clock, SystemClock
from icegate_server.errors import (
    InvalidFieldError,
    UpstreamAuthFailedError,
    UpstreamError,
    UpstreamNotConfiguredError,
    UpstreamQuotaError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from icegate_server.observability.logs import Safe
from icegate_server.observability.metrics import IcegateMetrics, upstream_outcome
from icegate_server.sessions.providers.upstream_text import (
    MODEL_PATTERN,
    UpstreamField,
    upstream_text,
)
from icegate_server.turn.ice_servers import IceServer as IceServer

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
RandomSource = Callable[[], float]
JsonObject = dict[str, Any]

MAX_INSTRUCTIONS_BYTES = 32 * 1024
# Model and deployment names end up in JSON bodies and logs; a tight charset keeps both sane.
_MODEL_NAME = re.compile(MODEL_PATTERN)
# Visible ASCII only: a key with a newline or space would otherwise reach the HTTP layer, whose
# error text can quote header values.
_API_KEY = re.compile(r"[\x21-\x7e]{1,4096}")
# The largest instant a google.protobuf.Timestamp holds (9999-12-31T23:59:59Z).
_MAX_UNIX_SECONDS = 253_402_300_799


class ProviderKind(str, Enum):
    """The upstream token APIs icegate can mint from; the value is the provider's short name."""

    OPENAI = "openai"
    OPENAI_BETA = "openai_beta"
    AZURE = "azure"
    AZURE_LEGACY = "azure_legacy"
    ORGA = "orga"
    GEMINI = "gemini"


@dataclass(frozen=True)
class TurnDetection:
    """Voice activity detection (see `icegate.v1.TurnDetection`); None fields are unset."""

    type: str
    threshold: float | None = None
    prefix_padding_ms: int | None = None
    silence_duration_ms: int | None = None
    eagerness: str = ""
    create_response: bool | None = None
    interrupt_response: bool | None = None


@dataclass(frozen=True)
class InputTranscription:
    """A transcript of the user's audio: model, language (ISO 639-1) and prompt."""

    model: str = ""
    language: str = ""
    prompt: str = ""


@dataclass(frozen=True)
class Tracing:
    """The session's trace at the provider; all empty means the provider's `auto`."""

    workflow_name: str = ""
    group_id: str = ""
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PromptReference:
    """A prompt stored at the provider: id, version ("" for its current one), variables."""

    id: str
    version: str = ""
    variables: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SessionOptions:
    """What the caller asks the realtime session to be; unset fields take the provider default.

    Attributes:
        model: Model name; for Azure the deployment name. Empty means the adapter's default
            (Azure has none and requires it).
        voice: Output voice from the provider's list; empty means the provider default.
        instructions: System instructions, at most 32 KiB of UTF-8.
        temperature: Sampling temperature, only where the provider takes one.
        speed: Speech speed (OpenAI GA and beta: 0.25..1.5).
        token_ttl_seconds: Lifetime of the minted token, where the provider lets us choose.
        modalities: Output modalities, e.g. ("audio",) or ("text",); empty means default.
        email: Orga only: the end user's e-mail address sent with the client-secret request.
        tools: Tools in the provider's JSON shape (a session policy fixes them).
        instruction_variables: (name, value) pairs filling the project's instructions
            template; `sessions.policy.apply_policy` turns them into `instructions`.
        locked: Whether a session policy fixed these options: a provider that can lock a
            token's session (Gemini) locks every field sent.
        session_type: "realtime" or "transcription" ("" for the default, realtime).
        input_audio_format: `audio/pcm`, `audio/pcmu` or `audio/pcma`; "" for the default.
        output_audio_format: The same, for what the session speaks.
        turn_detection: Voice activity detection; None keeps the provider's default.
        input_transcription: A transcript of the user's audio; None for none.
        noise_reduction: `near_field` or `far_field`; "" for none.
        tool_choice: `auto`, `none`, `required` or a function name; "" for the default.
        max_output_tokens: The most output tokens of a response; None for no limit.
        tracing: The session's trace; None for none.
        prompt: A prompt stored at the provider; None for none.
    """

    model: str = ""
    voice: str = ""
    instructions: str = ""
    temperature: float | None = None
    speed: float | None = None
    token_ttl_seconds: int | None = None
    modalities: tuple[str, ...] = ()
    email: str = ""
    tools: tuple[JsonObject, ...] = field(default=(), hash=False)
    instruction_variables: tuple[tuple[str, str], ...] = ()
    locked: bool = False
    session_type: str = ""
    input_audio_format: str = ""
    output_audio_format: str = ""
    turn_detection: TurnDetection | None = None
    input_transcription: InputTranscription | None = None
    noise_reduction: str = ""
    tool_choice: str = ""
    max_output_tokens: int | None = None
    tracing: Tracing | None = None
    prompt: PromptReference | None = None


@dataclass(frozen=True)
class MintedToken:
    """An ephemeral token a browser can use, with what the provider said about it.

    Attributes:
        value: The token itself (kept out of repr).
        expires_at: Expiry as Unix seconds (float), as the provider stated it or as computed
            from the TTL icegate asked for.
        upstream_session_id: The provider's session id, "" when it gives none.
        model: The model (or deployment) the session runs.
        voice: The voice the session speaks with, "" when not known.
        ice_servers: ICE servers the provider wants the browser to use (Orga only).
        upstream_request_id: The provider's request id of the answer, for support tickets.
    """

    value: str = field(repr=False)
    expires_at: float
    upstream_session_id: str
    model: str
    voice: str
    ice_servers: tuple[IceServer, ...] = ()
    upstream_request_id: str = ""


@dataclass(frozen=True)
class CreatedCall:
    """A WebRTC call the provider started for a browser's SDP offer.

    Attributes:
        sdp_answer: The provider's SDP answer (checked by `upstream_sdp`).
        call_id: The provider's call id ("" when its answer named none).
        model: The model the session runs.
        upstream_request_id: The provider's request id of the answer.
    """

    sdp_answer: str = field(repr=False)
    call_id: str
    model: str
    upstream_request_id: str = ""


class CallingProvider(Protocol):
    """A provider that starts calls server-side (OpenAI and Azure GA)."""

    @property
    def kind(self) -> ProviderKind:
        ...

    async def create_call(self, api_key: str, options: SessionOptions, sdp_offer: str, *,
                          timeout: float | None) -> CreatedCall:
        """Posts the browser's offer with the session to the provider's calls endpoint.

        Raises:
            InvalidFieldError: bad options (no request was sent).
            UpstreamError: a subclass telling why the provider did not answer the offer.
        """
        ...

    async def hang_up(self, api_key: str, call_id: str, *, timeout: float | None) -> None:
        """Ends a call the provider started (`/calls/{call_id}/hangup`).

        Raises:
            UpstreamError: a subclass telling why the provider did not end it.
        """
        ...


class Provider(Protocol):
    """One upstream token API."""

    @property
    def kind(self) -> ProviderKind:
        """Which provider this adapter talks to."""
        ...

    @property
    def default_token_ttl_seconds(self) -> int | None:
        """The token lifetime icegate asks for when the caller names none; None where the
        provider does not let icegate choose one."""
        ...

    def validate(self, options: SessionOptions) -> None:
        """Checks the options against the provider's rules without any network call.

        Raises:
            InvalidFieldError: naming the first bad field (proto field names).
        """
        ...

    async def mint(
        self, api_key: str, options: SessionOptions, *, timeout: float | None
    ) -> MintedToken:
        """Mints one ephemeral token with the project's provider key.

        Args:
            api_key: The provider key; never logged nor put in an error.
            options: The session the token is for; validated first.
            timeout: Seconds left before the caller's deadline, None for no deadline.

        Raises:
            InvalidFieldError: bad options (no request was sent).
            UpstreamError: a subclass telling why the provider did not mint.
        """
        ...


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry a failing upstream (the OpenAI SDK's defaults)."""

    max_retries: int = 2
    initial_backoff_seconds: float = 0.5
    max_backoff_seconds: float = 8.0
    # A provider asking us to come back later than this gets its answer passed to the caller.
    max_retry_after_seconds: float = 60.0


@dataclass(frozen=True)
class ProviderRuntime:
    """What every adapter shares: the pooled HTTP client and the injected non-determinism."""

    http: httpx.AsyncClient
    clock: Clock = field(default_factory=SystemClock)
    sleep: Sleep = asyncio.sleep
    random: RandomSource = _system_random
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    metrics: IcegateMetrics | None = None
    """Where upstream calls are counted (`icegate_upstream_*`); None counts nothing."""


# --- validation -------------------------------------------------------------------------------


def check_model(model: str, *, required: bool = False) -> None:
    """Rejects an empty (when required) or oddly spelled model name."""
    if not model:
        if required:
            raise InvalidFieldError("model", "is required for this provider")
        return
    if not _MODEL_NAME.fullmatch(model):
        raise InvalidFieldError(
            "model", "must be 1-128 characters of letters, digits and . _ : / -"
        )


def check_choice(field_name: str, value: str, allowed: Collection[str]) -> None:
    """Rejects a non-empty value outside `allowed`."""
    if value and value not in allowed:
        raise InvalidFieldError(field_name, f"must be one of {', '.join(sorted(allowed))}")


def check_range(field_name: str, value: float | None, low: float, high: float) -> None:
    """Rejects a set value outside [low, high] (NaN included)."""
    if value is not None and not low <= value <= high:
        raise InvalidFieldError(field_name, f"must be between {low:g} and {high:g}")


def check_instructions(instructions: str) -> None:
    """Rejects instructions longer than 32 KiB of UTF-8."""
    if len(instructions.encode("utf-8")) > MAX_INSTRUCTIONS_BYTES:
        raise InvalidFieldError("instructions", f"must be at most {MAX_INSTRUCTIONS_BYTES} bytes")


def check_modalities(
    modalities: Sequence[str], allowed: Collection[frozenset[str]]
) -> None:
    """Rejects a modality combination the provider does not offer (empty means default)."""
    if not modalities:
        return
    if len(set(modalities)) != len(modalities) or frozenset(modalities) not in allowed:
        choices = " or ".join(sorted("+".join(sorted(combo)) for combo in allowed))
        raise InvalidFieldError("modalities", f"must be {choices}")


MAX_TOOLS = 128
MAX_TOOLS_JSON_BYTES = 32 * 1024
"""Tools beside 32 KiB of instructions still fit the server's 64 KiB request limit."""


def check_tools(tools: Sequence[JsonObject]) -> None:
    """Rejects more than `MAX_TOOLS` tools, more than 64 KiB of them as JSON, or a tool that
    is not a JSON object (its shape is the provider's to judge)."""
    if not tools:
        return
    if len(tools) > MAX_TOOLS:
        raise InvalidFieldError("tools", f"must be at most {MAX_TOOLS} tools")
    try:
        size = len(json.dumps(list(tools), allow_nan=False).encode())
    except (TypeError, ValueError):
        raise InvalidFieldError("tools", "must be JSON objects") from None
    if size > MAX_TOOLS_JSON_BYTES:
        raise InvalidFieldError("tools", f"must be at most {MAX_TOOLS_JSON_BYTES} bytes of JSON")
    for tool in tools:
        if not isinstance(tool, dict):
            raise InvalidFieldError("tools", "must be JSON objects")


def reject_if_set(field_name: str, value: object, provider: ProviderKind) -> None:
    """Rejects an option the provider cannot honour, rather than silently dropping it."""
    if value not in (None, "", ()):
        raise InvalidFieldError(field_name, f"is not supported by provider {provider.value}")


def check_api_key(api_key: str, provider: ProviderKind) -> None:
    """Refuses to send a missing or unprintable key (the error never quotes it)."""
    if not api_key:
        raise UpstreamNotConfiguredError(
            f"no {provider.value} key is configured", provider=provider.value
        )
    if not _API_KEY.fullmatch(api_key):
        raise UpstreamAuthFailedError(
            f"the stored {provider.value} key is malformed (unprintable characters)",
            provider=provider.value,
        )


# --- answers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorDetail:
    """What an adapter read from a provider's error body."""

    message: str = ""
    code: str = ""
    auth_failure: bool = False
    quota_exhausted: bool = False


ErrorParser = Callable[[object], ErrorDetail]


def parse_openai_style_error(body: object) -> ErrorDetail:
    """Reads `{"error": {"message", "type", "code"}}` (OpenAI, Azure) tolerantly."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str):
        message = body.get("message") if isinstance(body, dict) else None
        return ErrorDetail(message=str(message or error), code=error)
    if not isinstance(error, dict):
        return ErrorDetail()
    message = error.get("message")
    codes = [str(error[k]) for k in ("code", "type", "status") if error.get(k) is not None]
    return ErrorDetail(
        message=message if isinstance(message, str) else "",
        code=codes[0] if codes else "",
        quota_exhausted="insufficient_quota" in codes,
    )


@dataclass(frozen=True)
class UpstreamAnswer:
    """A 2xx JSON object answer."""

    provider: ProviderKind
    status: int
    body: JsonObject
    request_id: str
    """Already through `upstream_text` (REQUEST_ID): "" when absent or unfit."""
    secrets: tuple[str, ...] = field(default=(), repr=False)
    """What `text` keeps out of every string it returns (the provider key...)."""
    raw_text: str = field(default="", repr=False)
    """The body as text, for an answer that is not JSON (a call's SDP): not yet checked,
    the adapter passes it through `upstream_sdp`."""
    location: str = field(default="", repr=False)
    """The Location header as sent, not yet checked (a call's `/calls/{id}`)."""

    def malformed(self, what: str) -> UpstreamUnavailableError:
        """The error for a 2xx answer that lacks what the adapter needs."""
        return UpstreamUnavailableError(
            f"{self.provider.value} sent a malformed answer: {what}",
            provider=self.provider.value,
            upstream_status=self.status,
            upstream_request_id=self.request_id,
        )

    def get(self, *path: str) -> object:
        """The value at a key path of the body, None where any step is missing."""
        node: object = self.body
        for key in path:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node

    def text(self, shape: UpstreamField, *path: str, default: str = "") -> str:
        """The string at `path` through `upstream_text`; `default` when absent or unfit."""
        return upstream_text(self.get(*path), shape, self.secrets) or default

    def require_text(self, shape: UpstreamField, *path: str) -> str:
        """The string at `path` through `upstream_text`, or a malformed-answer error when it
        is absent, not of its shape, or holds a secret (a token that is the key, say)."""
        value = self.text(shape, *path)
        if not value:
            raise self.malformed(f"no usable {'.'.join(path)}")
        return value

    def require_unix_time(self, *path: str) -> float:
        """The instant (Unix seconds) at `path`, or a malformed-answer error when it is not a
        finite number a protobuf Timestamp can hold."""
        value = plausible_unix_time(self.get(*path))
        if value is None:
            raise self.malformed(f"no usable {'.'.join(path)}")
        return value


def plausible_unix_time(value: object) -> float | None:
    """`value` as Unix seconds when it is a finite number from 1970 to year 9999, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    seconds = float(value)
    return seconds if math.isfinite(seconds) and 0 <= seconds <= _MAX_UNIX_SECONDS else None


# --- the HTTP call ----------------------------------------------------------------------------


class Deadline:
    """The caller's deadline on the monotonic clock."""

    def __init__(self, clock: Clock, timeout: float | None) -> None:
        self._clock = clock
        self._timeout = timeout
        self._at = None if timeout is None else clock.monotonic() + timeout

    @property
    def timeout(self) -> float | None:
        """The seconds the caller gave at the start."""
        return self._timeout

    def remaining(self) -> float | None:
        """Seconds left (may be negative), None when there is no deadline."""
        return None if self._at is None else self._at - self._clock.monotonic()


@dataclass(frozen=True)
class _Failure:
    """One failed attempt, as much as is needed to retry it or to report it."""

    error: UpstreamError
    retryable: bool
    retry_after: float | None = None


@dataclass(frozen=True)
class _Body:
    """What a request sends besides method, URL and headers, and what its answer is."""

    json_body: JsonObject | None
    params: Mapping[str, str] | None
    files: Mapping[str, tuple[None, str, str]] | None
    json_answer: bool


_RETRYABLE_STATUSES = frozenset({408, 429})
_MAX_RETRY_AFTER_SECONDS = 86_400.0


def _bounded_wait(seconds: float) -> float | None:
    """An upstream's retry-after within [0, a day], None when it is not a finite number."""
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), _MAX_RETRY_AFTER_SECONDS)


class UpstreamHttp:
    """Sends one logical request to a provider: deadline, retries and error mapping.

    Retries connection errors, 408, 429 (not out-of-quota) and 5xx at most
    `RetryPolicy.max_retries` times; `x-should-retry` overrides the status. Waits
    `retry-after-ms`, then `retry-after`, else min(0.5 * 2^n, 8) s less up to 25 % jitter,
    and never past the caller's deadline.
    """

    def __init__(
        self,
        runtime: ProviderRuntime,
        provider: ProviderKind,
        *,
        request_id_headers: Sequence[str] = ("x-request-id",),
        parse_error: ErrorParser = parse_openai_style_error,
    ) -> None:
        self._runtime = runtime
        self._provider = provider
        self._request_id_headers = tuple(request_id_headers)
        self._parse_error = parse_error

    def deadline(self, timeout: float | None) -> Deadline:
        """A deadline `timeout` seconds from now on the runtime's clock."""
        return Deadline(self._runtime.clock, timeout)

    async def call(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        deadline: Deadline,
        secrets: Sequence[str],
        json_body: JsonObject | None = None,
        params: Mapping[str, str] | None = None,
        files: Mapping[str, tuple[None, str, str]] | None = None,
        json_answer: bool = True,
    ) -> UpstreamAnswer:
        """Sends the request until it succeeds, fails for good, or the deadline comes.

        Args:
            method: HTTP method.
            url: Absolute URL without query.
            headers: Request headers, auth included (never logged).
            deadline: The caller's deadline; retries and their waits stay inside it.
            secrets: Strings to scrub from any upstream text put into an error.
            json_body: The JSON body, if any.
            params: Query parameters, if any.
            files: A multipart/form-data body instead: name -> (None, text, content type).
            json_answer: False for an answer that is not JSON (its text in `raw_text`).

        Returns:
            The 2xx answer: a JSON object, or its text (`json_answer` False).

        Raises:
            UpstreamError: a subclass; see `icegate_server.errors`.
        """
        metrics = self._runtime.metrics
        extra = _Body(json_body, params, files, json_answer)
        if metrics is None:
            return await self._call(method, url, headers, deadline, secrets, extra)
        # Real elapsed time, not the injected clock: this measures the provider, not the domain.
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            return await self._call(method, url, headers, deadline, secrets, extra)
        except BaseException as error:
            failure = error
            raise
        finally:
            metrics.upstream_call(self._provider.value, upstream_outcome(failure),
                                  time.perf_counter() - started)

    async def _call(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        deadline: Deadline,
        secrets: Sequence[str],
        body: _Body,
    ) -> UpstreamAnswer:
        policy = self._runtime.retry
        path = httpx.URL(url).path
        attempt = 0
        while True:
            outcome = await self._send_once(
                method, url, headers, deadline, secrets, body, path, attempt
            )
            if isinstance(outcome, httpx.Response):
                failure = self._failure_of(outcome, secrets)
                if failure is None:
                    if not body.json_answer:
                        return self._text_answer(outcome, secrets)
                    return self._answer(outcome, secrets)
            else:
                failure = outcome
            if not failure.retryable or attempt >= policy.max_retries:
                raise failure.error
            await self._wait_before_retry(failure, attempt, deadline)
            attempt += 1

    async def _send_once(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        deadline: Deadline,
        secrets: Sequence[str],
        body: _Body,
        path: str,
        attempt: int,
    ) -> httpx.Response | _Failure:
        name = self._provider.value
        remaining = deadline.remaining()
        if remaining is not None and remaining <= 0:
            raise self._deadline_error(deadline)
        request = self._runtime.http.request(
            method, url, headers=dict(headers), json=body.json_body, params=body.params,
            files=body.files,
        )
        try:
            # wait_for cancels the request (and closes its connection) when the deadline comes;
            # a CancelledError from our own caller passes straight through.
            response = await (
                request if remaining is None else asyncio.wait_for(request, remaining)
            )
        except asyncio.TimeoutError:
            raise self._deadline_error(deadline) from None
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # Nothing was sent: always safe to retry.
            return self._connection_failure(exc, secrets)
        except httpx.TimeoutException:
            raise UpstreamTimeoutError(
                f"{name} did not answer within icegate's upstream timeout", provider=name
            ) from None
        except httpx.TransportError as exc:
            # A reset or truncated answer: minting twice only leaves an unused token that
            # expires by itself, so retrying is safe.
            return self._connection_failure(exc, secrets)
        logger.debug("%s %s %s -> %d (attempt %d)", Safe(name), Safe(method), Safe(path),
                     response.status_code, attempt + 1)
        return response

    def _connection_failure(self, exc: httpx.TransportError, secrets: Sequence[str]) -> _Failure:
        name = self._provider.value
        # The network layer's text can quote what the upstream sent (a bad status line).
        detail = upstream_text(f"{type(exc).__name__}: {exc}", UpstreamField.MESSAGE, secrets)
        # The detail quotes the network layer: scrubbed, but not vouched for, so redacted.
        logger.debug("%s connection failed: %s", Safe(name), detail)
        return _Failure(
            UpstreamUnavailableError(f"{name} could not be reached ({detail})", provider=name),
            retryable=True,
        )

    def _deadline_error(self, deadline: Deadline) -> UpstreamTimeoutError:
        return UpstreamTimeoutError(
            f"{self._provider.value} did not answer within the caller's deadline "
            f"({deadline.timeout or 0:.2f} s)",
            provider=self._provider.value,
        )

    def _request_id(self, response: httpx.Response, secrets: Sequence[str]) -> str:
        """The first request id header that is spelled like one and holds no secret."""
        for header in self._request_id_headers:
            value = upstream_text(response.headers.get(header), UpstreamField.REQUEST_ID,
                                  secrets)
            if value:
                return value
        return ""

    def _text_answer(self, response: httpx.Response,
                     secrets: Sequence[str]) -> UpstreamAnswer:
        return UpstreamAnswer(self._provider, response.status_code, {},
                              self._request_id(response, secrets), tuple(secrets),
                              raw_text=response.text,
                              location=response.headers.get("location", ""))

    def _answer(self, response: httpx.Response, secrets: Sequence[str]) -> UpstreamAnswer:
        request_id = self._request_id(response, secrets)
        try:
            body = response.json()
        except ValueError:
            body = None
        answer = UpstreamAnswer(self._provider, response.status_code, {}, request_id)
        if not isinstance(body, dict):
            raise answer.malformed("not a JSON object")
        return UpstreamAnswer(self._provider, response.status_code, body, request_id,
                              tuple(secrets))

    def _failure_of(self, response: httpx.Response, secrets: Sequence[str]) -> _Failure | None:
        status = response.status_code
        if 200 <= status < 300:
            return None
        name = self._provider.value
        try:
            body: object = response.json()
        except ValueError:
            body = None
        detail = self._parse_error(body)
        message = upstream_text(detail.message, UpstreamField.MESSAGE, secrets)
        said = f": {message}" if message else ""
        context: dict[str, Any] = {
            "provider": name,
            "upstream_status": status,
            "upstream_request_id": self._request_id(response, secrets),
        }
        if detail.auth_failure or status in (401, 403):
            # Auth messages are where providers echo (parts of) the key: never pass them on.
            return _Failure(
                UpstreamAuthFailedError(f"{name} refused the API key (HTTP {status})", **context),
                retryable=False,
            )
        if detail.quota_exhausted or status == 402:
            return _Failure(
                UpstreamQuotaError(f"{name} account is out of quota (HTTP {status}){said}",
                                   **context),
                retryable=False,
            )
        retry_after = self._retry_after(response)
        should_retry = response.headers.get("x-should-retry", "").lower()
        retryable = (
            should_retry == "true"
            or (should_retry != "false" and (status in _RETRYABLE_STATUSES or status >= 500))
        )
        if 400 <= status < 500 and status not in _RETRYABLE_STATUSES:
            error: UpstreamError = UpstreamRejectedError(
                f"{name} rejected the request (HTTP {status}){said}", **context
            )
        else:
            error = UpstreamUnavailableError(
                f"{name} is unavailable (HTTP {status}){said}",
                retry_after_seconds=retry_after,
                **context,
            )
        return _Failure(error, retryable=retryable, retry_after=retry_after)

    def _retry_after(self, response: httpx.Response) -> float | None:
        """The wait the provider asked for, within [0, a day]; None when unstated or not a
        finite number (an `inf` would reach the caller's RetryInfo, which cannot hold it)."""
        millis = response.headers.get("retry-after-ms")
        if millis:
            try:
                return _bounded_wait(float(millis) / 1000)
            except ValueError:
                pass
        header = response.headers.get("retry-after")
        if not header:
            return None
        try:
            return _bounded_wait(float(header))
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError):
            return None
        return _bounded_wait(when.timestamp() - self._runtime.clock.now())

    async def _wait_before_retry(self, failure: _Failure, attempt: int, deadline: Deadline) -> None:
        policy = self._runtime.retry
        error = failure.error
        remaining = deadline.remaining()
        if failure.retry_after is not None:
            delay = failure.retry_after
            if delay > policy.max_retry_after_seconds or (
                remaining is not None and delay >= remaining
            ):
                # The provider told us when; the caller can wait for that better than we can.
                raise UpstreamUnavailableError(
                    f"{error.message}; retry after {delay:.1f} s",
                    provider=error.provider,
                    upstream_status=error.upstream_status,
                    upstream_request_id=error.upstream_request_id,
                    retry_after_seconds=delay,
                )
        else:
            backoff = min(
                policy.initial_backoff_seconds * 2**attempt, policy.max_backoff_seconds
            )
            delay = backoff * (1 - 0.25 * self._runtime.random())
            if remaining is not None and delay >= remaining:
                # Sleeping only to time out would hide the real cause from the caller.
                raise error
        logger.debug("%s retrying in %.2f s", Safe(self._provider.value), delay)
        await self._runtime.sleep(delay)
