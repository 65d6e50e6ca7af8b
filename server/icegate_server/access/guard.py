"""The guard every icegate RPC passes through, whichever transport brought it.

The guard is the one place a call is admitted and observed; the transports (gRPC through
grpc.aio in `transports/grpc_methods.py`, Connect and gRPC-Web over HTTP in
`transports/connect_app.py`) are thin adapters around it that only translate: they read the
caller's metadata and peer, call the servicer, and write what the guard decided back in
their own wire form.

For each guarded method (`CallGuard.method`) the guard holds the method's policy and metric
series, and gives the adapters three steps:

- `GuardedMethod.admit`: the request is checked to have parsed, then admitted through
  `AccessControl` (a bearer key, or else a verified client certificate; project, rate limit:
  one store round trip at most), and its `CallContext` made available to the servicer
  through `current_call()`.
- `refusal`: any exception becomes a status code, an ErrorInfo reason and a google.rpc
  `Status` with rich details through `icegate_server.status`, the one place that mapping
  lives; an exception that is not an `IcegateError` is a bug, answered INTERNAL with nothing
  of the exception in it.
- `GuardedMethod.observe`: one `icegate_rpcs_total` count, one latency observation and one
  log line (`icegate_server.observability.logs`) per call.

With tracing on (`observability/tracing.py`), each method is a `TracedMethod` instead, whose
`admit` starts the call's server span and whose `observe` ends it; with tracing off the
guard is exactly the untraced one, chosen once per method, so no call pays for tracing.

The request id (the caller's `x-request-id` if valid, else a fresh one) goes back on success
and on error, in the transport's own place (a gRPC trailer, a Connect response header), and
is the one in the log line. Open methods (health, reflection) are served unguarded: neither
admitted, counted nor logged.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple, Protocol

import grpc
from google.rpc import status_pb2

from icegate_server.access.control import AccessControl, CallContext, MethodPolicy
from icegate_server.access.keys import bearer_key, has_authorization
from icegate_server.errors import IcegateError, MalformedRequestError
from icegate_server.observability.logs import RpcLogEvent, log_rpc, valid_request_id
from icegate_server.observability.metrics import IcegateMetrics
from icegate_server.projects.records import PROJECT_ID_PATTERN
from icegate_server.status import INTERNAL_REASON, INTERNAL_RPC_STATUS, lookup, to_rpc_status

REQUEST_ID_HEADER = "x-request-id"

TURN_ISSUING_METHODS = frozenset({
    "/icegate.v1.CredentialService/IssueTurnCredentials",
    "/icegate.v1.CredentialService/GetIceServers",
    "/icegate.v1.SessionService/CreateSession",
    "/icegate.v1.SessionService/CreateCall",
})
"""Methods that sign TURN credentials: their admission checks the project's TURN limits and
whether the request's `user_id` is revoked (`turn.limits`)."""
MAX_TURN_SUBJECT = 256
"""A `user_id` longer than this is never a subject (the call then fails its own check)."""

SERVICE_POLICIES = {
    "/icegate.v1.AdminService/": MethodPolicy.ADMIN,
    "/icegate.v1.UsageService/": MethodPolicy.PROJECT_UNCOUNTED,
}
"""Services whose methods are not ordinary counted project calls (the default: fail closed)."""

MAX_REQUEST_BYTES = 64 * 1024
"""The largest request message either transport accepts (gRPC answers RESOURCE_EXHAUSTED,
Connect too); icegate's largest request, a provider key with its options, is far smaller."""

UNDECODABLE = object()
"""What a transport hands the guard for a request body that does not parse."""

Metadata = Collection[tuple[str, Any]]
"""A call's metadata as (lower-case name, value) pairs: gRPC metadata, or HTTP headers (read
more than once)."""

GRPC_TRANSPORT = "grpc"
CONNECT_TRANSPORT = "connect_rpc"
"""The transports a guarded method is served on, spelled as OpenTelemetry's `rpc.system`."""


class RpcSpans(Protocol):
    """The server spans of one guarded method on one transport (`observability/spans.py`)."""

    def start(self, metadata: Metadata) -> None:
        """Starts the span of the call being admitted and makes it current."""

    def end(self, code: grpc.StatusCode, reason: str, request_id: str,
            project_id: str) -> None:
        """Ends the current call's span with its outcome."""


class CallTracing(Protocol):
    """What the guard needs of tracing when it is on (`observability.spans.Tracing`)."""

    def rpc_spans(self, method: str, transport: str) -> RpcSpans:
        """The server spans of `method` (full name) served on `transport`."""

_current_call: contextvars.ContextVar[CallContext] = contextvars.ContextVar("icegate_call")


def current_call() -> CallContext:
    """The caller and project of the RPC being served (set by `GuardedMethod.admit`)."""
    return _current_call.get()


_REQUEST_ID_PREFIX = os.urandom(8).hex()
_request_numbers = itertools.count(1)


def new_request_id() -> str:
    """A request id unique to this process's life: a random prefix and a call number.

    32 hex digits like a random id, but with one random draw per process instead of a
    `getrandom` system call per call; ids need to be unique, not unguessable.
    """
    return f"{_REQUEST_ID_PREFIX}{next(_request_numbers):016x}"


def request_id_of(metadata: Metadata) -> str:
    """The caller's `x-request-id` when it is 1-128 printable ASCII characters, else a new one."""
    for name, value in metadata:
        if name == REQUEST_ID_HEADER:
            if isinstance(value, str) and valid_request_id(value):
                return value
            break
    return new_request_id()


def method_policy(method: str) -> MethodPolicy:
    """The policy of a full method name such as `/icegate.v1.AdminService/CreateProject`."""
    for prefix, policy in SERVICE_POLICIES.items():
        if method.startswith(prefix):
            return policy
    return MethodPolicy.PROJECT


class Refusal(NamedTuple):
    """How a call that raised ends: its code, ErrorInfo reason and rich status; `bug` is the
    exception when it was not a domain error (logged with its traceback frames)."""

    code: grpc.StatusCode
    reason: str
    status: status_pb2.Status
    bug: Exception | None


def refusal(error: Exception) -> Refusal:
    """The answer to a call that raised `error`, through the one error table (`status.py`)."""
    if isinstance(error, IcegateError):
        code, reason = lookup(error)
        return Refusal(code, reason, to_rpc_status(error), None)
    return Refusal(grpc.StatusCode.INTERNAL, INTERNAL_REASON, INTERNAL_RPC_STATUS, error)


class GuardedMethod:
    """One guarded method: what admits its calls and what observes them."""

    __slots__ = ("_access", "_issues_turn", "_may_linger", "_metrics", "_observe", "name",
                 "policy")

    def __init__(self, name: str, access: AccessControl, metrics: IcegateMetrics, *,
                 may_linger: bool = False) -> None:
        self.name = name
        self._may_linger = may_linger
        """Whether its calls may wait for others to go to the store with them (gRPC's;
        `Store.admit`)."""
        self.policy = method_policy(name)
        self._issues_turn = name in TURN_ISSUING_METHODS
        self._access = access
        self._metrics = metrics
        # The histogram child is resolved now, so every served method shows from the start.
        self._observe = metrics.rpc(name).observe

    async def admit(self, request: Any, metadata: Metadata,
                    identities: Callable[[], Sequence[str]]) -> CallContext:
        """Admits one call of this method and makes it `current_call()`.

        Args:
            request: The parsed request, or `UNDECODABLE`.
            metadata: The call's metadata (gRPC) or headers (HTTP), lower-case names.
            identities: Gives the verified client certificate's typed names; asked only when
                the call carries no authorization and certificates may stand for a caller.

        Raises:
            IcegateError: The call is refused (the error says why); see `AccessControl`.
        """
        if request is UNDECODABLE:
            raise MalformedRequestError("the request body is not a valid message")
        access = self._access
        project_id = getattr(request, "project_id", "")
        subject = _turn_subject(request) if self._issues_turn else None
        # A bearer key, when present, wins; a verified client certificate stands in for a
        # missing one (mutual TLS with ICEGATE_TLS_CLIENT_PROJECTS).
        if access.admits_identities and not has_authorization(metadata):
            call = await access.admit_identity(identities(), self.policy, project_id,
                                               turn_subject=subject,
                                               may_linger=self._may_linger)
        else:
            call = await access.admit(bearer_key(metadata), self.policy, project_id,
                                      turn_subject=subject, may_linger=self._may_linger)
        _current_call.set(call)
        return call

    def observe(self, code: grpc.StatusCode, reason: str, started: float, request_id: str,
                peer: str, call: CallContext | None, request: Any,
                bug: Exception | None = None) -> None:
        """Counts, times and logs one finished call (`started`: its `time.perf_counter()`)."""
        seconds = time.perf_counter() - started
        self._observe(code, seconds)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            self._metrics.limit_refused(reason)
        log_rpc(RpcLogEvent(
            self.name, code, seconds * 1000, request_id, peer, _project_of(call, request),
            call.caller.key_id if call is not None else "", reason), bug)


class TracedMethod(GuardedMethod):
    """A guarded method whose every call runs in a server span (tracing on)."""

    __slots__ = ("_spans",)

    def __init__(self, name: str, access: AccessControl, metrics: IcegateMetrics,
                 spans: RpcSpans, *, may_linger: bool = False) -> None:
        super().__init__(name, access, metrics, may_linger=may_linger)
        self._spans = spans

    async def admit(self, request: Any, metadata: Metadata,
                    identities: Callable[[], Sequence[str]]) -> CallContext:
        # First, so that the admission's store round trip is the span's child.
        self._spans.start(metadata)
        return await super().admit(request, metadata, identities)

    def observe(self, code: grpc.StatusCode, reason: str, started: float, request_id: str,
                peer: str, call: CallContext | None, request: Any,
                bug: Exception | None = None) -> None:
        try:
            super().observe(code, reason, started, request_id, peer, call, request, bug)
        finally:
            self._spans.end(code, reason, request_id, _project_of(call, request))


class CallGuard:
    """Makes the `GuardedMethod` of each method a transport serves.

    Args:
        tracing: Tracing when it is on: each method is then a `TracedMethod`.
    """

    def __init__(self, access: AccessControl, metrics: IcegateMetrics | None = None,
                 tracing: CallTracing | None = None) -> None:
        self._access = access
        self._metrics = metrics if metrics is not None else IcegateMetrics()
        self._tracing = tracing
        self._methods: dict[tuple[str, str], GuardedMethod] = {}

    def method(self, name: str, transport: str = GRPC_TRANSPORT) -> GuardedMethod:
        """The guarded method of the full name `name` served on `transport` (one per name
        and transport; they share the method's metric series)."""
        guarded = self._methods.get((name, transport))
        if guarded is None:
            may_linger = transport == GRPC_TRANSPORT
            if self._tracing is None:
                guarded = GuardedMethod(name, self._access, self._metrics,
                                        may_linger=may_linger)
            else:
                guarded = TracedMethod(name, self._access, self._metrics,
                                       self._tracing.rpc_spans(name, transport),
                                       may_linger=may_linger)
            self._methods[name, transport] = guarded
        return guarded


def _turn_subject(request: Any) -> str:
    # The user id TURN credentials are asked for ("" for a session that takes its own id);
    # validated later by the issuer, bounded here before it reaches the store.
    user_id = getattr(request, "user_id", "")
    return user_id if isinstance(user_id, str) and len(user_id) <= MAX_TURN_SUBJECT else ""


def _project_of(call: CallContext | None, request: Any) -> str:
    # The admitted project; else the one the request named, if it is spelled like a project id.
    if call is not None and call.project is not None:
        return call.project.project_id
    named = getattr(request, "project_id", "")
    return named if isinstance(named, str) and PROJECT_ID_PATTERN.fullmatch(named) else ""
