"""Prometheus metrics: every series icegate exports, defined here and recorded through one object.

`IcegateMetrics` owns a `CollectorRegistry` of its own (never prometheus_client's global one),
so several servers in one process (tests, benchmarks) keep separate figures. The server builds
one and hands it to the components that record: the call guard (`rpc`), the provider HTTP
path (`upstream_call`), the TURN issuer (`turn_credential_issued`), the store wrapper
(`InstrumentedStore`) and the lease gauge refresher (`ActiveLeaseGauge`). Recording is always
on; `ICEGATE_METRICS_LISTEN` only decides whether an HTTP endpoint serves the figures.

Series (all prefixed `icegate_`):

    icegate_rpcs_total{method, code}                  RPCs served, by full gRPC method name and
                                                      status code name (OK, INVALID_ARGUMENT...)
    icegate_rpc_duration_seconds{method}              histogram, 0.5 ms to 10 s buckets
    icegate_limit_refusals_total{reason}              RATE_LIMITED, QUOTA_EXCEEDED,
                                                      CONCURRENT_LIMIT, TURN_ALLOCATION_LIMIT,
                                                      TURN_BYTE_QUOTA_EXCEEDED
    icegate_upstream_calls_total{provider, outcome}   one logical provider call (its retries
                                                      included): ok, auth_failed, rejected,
                                                      quota, unavailable, timeout, cancelled, error
    icegate_upstream_duration_seconds{provider}       histogram, 10 ms to 60 s buckets
    icegate_active_leases                             gauge: session leases live in the store
    icegate_sessions_near_quota_total                 sessions started by a project then at 90 %
                                                      or more of its monthly session quota
    icegate_turn_credentials_issued_total             TURN credentials signed
    icegate_store_errors_total{operation}             store calls that raised, by Store method
    icegate_build_info{version, python, grpc}         1: what this process runs
    icegate_turn_signing_secret_age_seconds           age of the secret signing TURN credentials
                                                      (NaN for one from ICEGATE_TURN_SECRETS,
                                                      whose age icegate cannot know)
    icegate_coturn_sync_failures_total                writes of the TURN secrets into coturn's
                                                      userdb that failed (retried every second)
    icegate_tls_certificate_expiry_timestamp_seconds  when the certificate icegate serves TLS
                                                      with (ICEGATE_TLS_CERT, read at start)
                                                      expires, Unix seconds; NaN without TLS

and prometheus_client's own `process_*` series (CPU seconds, resident and virtual memory,
open and maximum file descriptors, start time) and `python_info`, for this process.
    icegate_turn_relayed_bytes_total{project}         bytes relayed to and from peers, metered
                                                      from coturn's stats stream
    icegate_turn_live_allocations{project}            gauge: the project's live allocations
    icegate_turn_unattributed_events_total            coturn events of usernames icegate does
    icegate_turn_unattributed_bytes_total             not sign (and their relayed bytes)
    icegate_coturn_stats_events_total{kind}           stats messages read, by kind (status_new,
                                                      ..., traffic_peer, malformed)
    icegate_coturn_stats_up                           gauge: 1 while the stats stream is
                                                      metered (by any replica), else 0
    icegate_coturn_stats_interruptions_total          times this replica lost the stream
    icegate_coturn_stats_missed_ends_total            allocations ended by a resynchronisation
                                                      (their end was missed: coturn restarted,
                                                      or the stream was down)

Cardinality: every label takes its values from a closed set fixed by the code: the methods the
server registered (an unknown method is answered UNIMPLEMENTED by gRPC before the call guard
counts it), status code names, reasons, provider kinds, outcomes, Store method names, event
kinds. The one exception is the `project` label of the two `icegate_turn_*` series metered
from coturn, which operators bill by: one series per project that used TURN (projects are
made by admins; a deleted project's series goes when the metering replica changes or
restarts). No label ever holds a user id, key, key id or token (coturn's own docs warn
against per-user labels), which is also why `icegate_turn_credentials_issued_total` has none.

The TURN series are written by the replica that meters coturn's stream (the meter lease,
`turn.coturn_stats`): `icegate_turn_relayed_bytes_total` adds up with `sum` over replicas
(each byte is counted by one), and `icegate_turn_live_allocations` is exported by the
metering replica alone (another drops its series when it loses the lease).
`icegate_coturn_stats_up` is the same on every replica: aggregate it with `max`.

`icegate_active_leases` counts the session leases live in the store at the last refresh (every
`ActiveLeaseGauge.interval` seconds), over all projects. It is read from the store rather than
counted in this process because leases end in three ways this process does not all see: ended
by a caller, expired when not kept alive, or ended through another replica. Every replica
sharing a store therefore reports the same figure: aggregate it with `max`, not `sum`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import platform
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)

from icegate.error_reasons import wire_reason
from icegate.v1.errors_pb2 import ErrorReason
from icegate_server.clock import Clock
from icegate_server.errors import (
    UpstreamAuthFailedError,
    UpstreamQuotaError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from icegate_server.store.base import (
    Admission,
    SessionAdmission,
    SessionOutcome,
    Store,
    TurnProjectChange,
    month_of,
)
from icegate_server.turn.coturn_events import EVENT_KINDS

log = logging.getLogger(__name__)

RPC_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                       1.0, 2.5, 5.0, 10.0)
"""Seconds: a cached admission answers in well under a millisecond, a session in seconds."""

NEAR_QUOTA = 0.9
"""The share of its monthly session quota past which a project's session starts count in
`icegate_sessions_near_quota_total` (what the quota alert of deploy/observability/ watches)."""

UPSTREAM_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: provider token APIs answer in 100 ms to a few seconds; retries add up to ~30 s."""

LIMIT_REASONS = tuple(wire_reason(reason) for reason in (
    ErrorReason.ERROR_REASON_RATE_LIMITED,
    ErrorReason.ERROR_REASON_QUOTA_EXCEEDED,
    ErrorReason.ERROR_REASON_CONCURRENT_LIMIT,
    ErrorReason.ERROR_REASON_TURN_ALLOCATION_LIMIT,
    ErrorReason.ERROR_REASON_TURN_BYTE_QUOTA_EXCEEDED,
))
"""The ErrorInfo reasons `icegate_limit_refusals_total` counts, as they are on the wire."""

UPSTREAM_OUTCOMES = ("ok", "auth_failed", "rejected", "quota", "unavailable", "timeout",
                     "cancelled", "error")
"""Every value of the `outcome` label; `error` is an unexpected exception (a bug)."""

_OUTCOME_OF_ERROR: tuple[tuple[type[BaseException], str], ...] = (
    (UpstreamAuthFailedError, "auth_failed"),
    (UpstreamRejectedError, "rejected"),
    (UpstreamQuotaError, "quota"),
    (UpstreamTimeoutError, "timeout"),
    (UpstreamUnavailableError, "unavailable"),
    (asyncio.CancelledError, "cancelled"),
)

STORE_OPERATIONS = tuple(sorted(
    name for name, value in vars(Store).items() if callable(value) and not name.startswith("_")
))
"""The `Store` methods: the values of the `operation` label."""


def upstream_outcome(error: BaseException | None) -> str:
    """The `outcome` label of a provider call that raised `error` (None: it succeeded)."""
    if error is None:
        return "ok"
    for cls, outcome in _OUTCOME_OF_ERROR:
        if isinstance(error, cls):
            return outcome
    return "error"


class MethodMetrics:
    """The RPC series of one method: prometheus_client children, resolved once per label set.

    prometheus_client's own objects, although they lock per update and walk the buckets in
    Python: `bench/instructions.py` (IssueTurnCredentials, paired, 2026-12-06) counted 580k
    instructions a call against 562k with integers kept by hand and read at scrape, 3.3 %,
    under the 5 % a hand-built series would have to pay to stay.

    The histogram child is resolved when the guard wraps the method (so every served method
    shows a zero histogram from the start); a counter child the first time a call ends with
    its status code.
    """

    __slots__ = ("_by_code", "_calls", "_latency", "_method")

    def __init__(self, method: str, calls: Counter, latency: Histogram) -> None:
        self._method = method
        self._calls = calls
        self._by_code: dict[grpc.StatusCode, Counter] = {}
        self._latency = latency.labels(method)

    def observe(self, code: grpc.StatusCode, seconds: float) -> None:
        """Counts one finished call with its status code and latency."""
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = self._calls.labels(self._method, code.name)
        counter.inc()
        self._latency.observe(seconds)


class IcegateMetrics:
    """Every icegate series, in a registry of its own; see the module docstring."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        registry = self.registry
        self._rpcs = Counter("icegate_rpcs", "RPCs served, by method and status code.",
                             ("method", "code"), registry=registry)
        self._rpc_latency = Histogram(
            "icegate_rpc_duration_seconds", "Time from admission to answer, by method.",
            ("method",), buckets=RPC_LATENCY_BUCKETS, registry=registry)
        self._methods: dict[str, MethodMetrics] = {}
        self._turn_credentials = Counter("icegate_turn_credentials_issued",
                                         "TURN credentials signed.", registry=registry)
        refusals = Counter("icegate_limit_refusals",
                           "Calls refused by a project limit, by reason.", ("reason",),
                           registry=registry)
        self._refusals = {reason: refusals.labels(reason) for reason in LIMIT_REASONS}
        upstream_calls = Counter(
            "icegate_upstream_calls",
            "Calls to upstream token APIs (retries included), by provider and outcome.",
            ("provider", "outcome"), registry=registry)
        self._upstream_calls = upstream_calls
        self._upstream_latency = Histogram(
            "icegate_upstream_duration_seconds",
            "Time a provider call took, retries and their waits included, by provider.",
            ("provider",), buckets=UPSTREAM_LATENCY_BUCKETS, registry=registry)
        self._upstream_children: dict[tuple[str, str], Any] = {}
        self._upstream_latency_children: dict[str, Any] = {}
        self._sessions_near_quota = Counter(
            "icegate_sessions_near_quota",
            "Sessions started by a project that had then used at least "
            f"{NEAR_QUOTA:.0%} of its monthly session quota (this one included).",
            registry=registry)
        self._active_leases = Gauge(
            "icegate_active_leases",
            "Session leases live in the store (all projects, all replicas) at the last refresh.",
            registry=registry)
        store_errors = Counter("icegate_store_errors", "Store calls that failed, by operation.",
                               ("operation",), registry=registry)
        self._store_errors = {op: store_errors.labels(op) for op in STORE_OPERATIONS}
        # This process's CPU, memory and descriptors (read from /proc at each scrape), and
        # what it runs.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        Info("icegate_build", "The icegate, Python and grpcio versions this process runs.",
             registry=registry).info(build_info())
        self._signing_secret_age = Gauge(
            "icegate_turn_signing_secret_age_seconds",
            "Age of the secret signing TURN credentials; NaN when it comes from "
            "ICEGATE_TURN_SECRETS (its age is unknown).", registry=registry)
        self._signing_secret_age.set(math.nan)
        self._tls_certificate_expiry = Gauge(
            "icegate_tls_certificate_expiry_timestamp_seconds",
            "When the certificate served with ICEGATE_TLS_CERT expires (Unix seconds); NaN "
            "without TLS.", registry=registry)
        self._tls_certificate_expiry.set(math.nan)
        self._coturn_sync_failures = Counter(
            "icegate_coturn_sync_failures",
            "Writes of the TURN secrets into coturn's userdb that failed.", registry=registry)
        self._turn_relayed = Counter(
            "icegate_turn_relayed_bytes",
            "Bytes relayed to and from peers, metered from coturn's stats, by project.",
            ("project",), registry=registry)
        self._turn_live = Gauge(
            "icegate_turn_live_allocations",
            "Live TURN allocations by project (exported by the metering replica).",
            ("project",), registry=registry)
        self._turn_projects: set[str] = set()
        self._unattributed_events = Counter(
            "icegate_turn_unattributed_events",
            "coturn events of usernames icegate does not sign (never attributed).",
            registry=registry)
        self._unattributed_bytes = Counter(
            "icegate_turn_unattributed_bytes",
            "Relayed bytes of usernames icegate does not sign (never attributed).",
            registry=registry)
        events = Counter("icegate_coturn_stats_events", "coturn stats messages read, by kind.",
                         ("kind",), registry=registry)
        self._coturn_events = {kind: events.labels(kind) for kind in (*EVENT_KINDS, "malformed")}
        self._metering_up = Gauge(
            "icegate_coturn_stats_up",
            "1 while coturn's stats stream is metered (by any replica), else 0.",
            registry=registry)
        self._stream_interruptions = Counter(
            "icegate_coturn_stats_interruptions",
            "Times this replica lost coturn's stats stream.", registry=registry)
        self._missed_ends = Counter(
            "icegate_coturn_stats_missed_ends",
            "Allocations a resynchronisation ended, their end not seen on the stream.",
            registry=registry)

    def rpc(self, method: str) -> MethodMetrics:
        """The recorder of one method; the call guard asks once per method, then keeps it."""
        series = self._methods.get(method)
        if series is None:
            series = self._methods[method] = MethodMetrics(method, self._rpcs,
                                                           self._rpc_latency)
        return series

    def limit_refused(self, reason: str) -> None:
        """Counts a refusal if `reason` is one of `LIMIT_REASONS` (anything else is ignored)."""
        counter = self._refusals.get(reason)
        if counter is not None:
            counter.inc()

    def upstream_call(self, provider: str, outcome: str, seconds: float) -> None:
        """Counts one logical provider call; `provider` is a `ProviderKind` value."""
        counter = self._upstream_children.get((provider, outcome))
        if counter is None:
            counter = self._upstream_calls.labels(provider, outcome)
            self._upstream_children[(provider, outcome)] = counter
        counter.inc()
        latency = self._upstream_latency_children.get(provider)
        if latency is None:
            latency = self._upstream_latency_children[provider] = \
                self._upstream_latency.labels(provider)
        latency.observe(seconds)

    def turn_credential_issued(self) -> None:
        self._turn_credentials.inc()

    def store_error(self, operation: str) -> None:
        counter = self._store_errors.get(operation)
        if counter is not None:
            counter.inc()

    def session_started(self, sessions_this_month: int, quota: int) -> None:
        """A session start the store admitted, with the month's count after it."""
        if quota > 0 and sessions_this_month >= NEAR_QUOTA * quota:
            self._sessions_near_quota.inc()

    def set_active_leases(self, count: int) -> None:
        self._active_leases.set(count)

    def watch_signing_secret_age(self, age_seconds: Callable[[], float]) -> None:
        """Reads the signing secret's age from `age_seconds` at every scrape."""
        self._signing_secret_age.set_function(age_seconds)

    def set_tls_certificate_expiry(self, timestamp: float) -> None:
        self._tls_certificate_expiry.set(timestamp)

    def coturn_sync_failed(self) -> None:
        self._coturn_sync_failures.inc()

    # -- TURN usage metered from coturn (turn.coturn_stats) ----------------------------------

    def coturn_event(self, kind: str) -> None:
        """Counts one stats message of `kind` (an `EventKind` value, or `malformed`)."""
        counter = self._coturn_events.get(kind)
        if counter is not None:
            counter.inc()

    def coturn_unattributed(self, relayed_bytes: int) -> None:
        self._unattributed_events.inc()
        if relayed_bytes > 0:
            self._unattributed_bytes.inc(relayed_bytes)

    def turn_project_changes(self, changes: dict[str, TurnProjectChange]) -> None:
        """Records what a metered batch did to each project."""
        for project_id, change in changes.items():
            if change.relayed_bytes > 0:
                self._turn_relayed.labels(project_id).inc(change.relayed_bytes)
            self._turn_live.labels(project_id).set(change.live_allocations)
            self._turn_projects.add(project_id)

    def clear_turn_projects(self) -> None:
        """Drops the live-allocation series (this replica no longer meters)."""
        for project_id in self._turn_projects:
            with contextlib.suppress(KeyError):
                self._turn_live.remove(project_id)
        self._turn_projects.clear()

    def set_metering_up(self, up: bool) -> None:
        self._metering_up.set(1 if up else 0)

    def coturn_stream_interrupted(self) -> None:
        self._stream_interruptions.inc()

    def coturn_missed_ends(self, count: int) -> None:
        self._missed_ends.inc(count)


def build_info() -> dict[str, str]:
    """The `icegate_build_info` labels: versions of icegate, Python and grpcio."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        icegate_version = version("icegate")
    except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        icegate_version = "unknown"
    return {"version": icegate_version, "python": platform.python_version(),
            "grpc": grpc.__version__}


# --- the store, instrumented -------------------------------------------------------------------


class InstrumentedStore:
    """A `Store` that counts every failing call in `icegate_store_errors_total`.

    The wrappers are made once, here; a call costs one extra coroutine frame. Attributes
    that are not `Store` methods pass through to the wrapped backend.
    """

    def __init__(self, store: Store, metrics: IcegateMetrics) -> None:
        self.wrapped = store
        self._metrics = metrics
        self._admit = store.admit
        self._begin_session = _counting("begin_session", store.begin_session, metrics)
        for operation in STORE_OPERATIONS:
            if operation not in ("admit", "begin_session"):
                setattr(self, operation,
                        _counting(operation, getattr(store, operation), metrics))

    async def admit(self, *, digest: bytes | None, project_id: str, now_ms: int,
                    count: bool, turn_subject: str | None = None,
                    may_linger: bool = False) -> Admission:
        # Every call's: spelled out, because the generic wrapper's *args/**kwargs packing
        # costs each call about a microsecond, as much as the rest of the wrapping.
        try:
            return await self._admit(digest=digest, project_id=project_id, now_ms=now_ms,
                                     count=count, turn_subject=turn_subject,
                                     may_linger=may_linger)
        except Exception:
            self._metrics.store_error("admit")
            raise

    async def begin_session(self, **arguments: Any) -> SessionAdmission:
        # Counted like every operation, and a start that leaves its project near its quota
        # is counted in `icegate_sessions_near_quota_total` (no project label: the alert
        # says some project is near; `icegate admin usage` says which).
        admission: SessionAdmission = await self._begin_session(**arguments)
        if admission.outcome is SessionOutcome.STARTED:
            self._metrics.session_started(admission.sessions_this_month, arguments["quota"])
        return admission

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def _counting(operation: str, method: Callable[..., Awaitable[Any]],
              metrics: IcegateMetrics) -> Callable[..., Awaitable[Any]]:
    async def counted(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except Exception:
            metrics.store_error(operation)
            raise

    return counted


def instrument_store(store: Store, metrics: IcegateMetrics) -> Store:
    """`store`, counting its failures in `metrics`."""
    return cast(Store, InstrumentedStore(store, metrics))


# --- the active-lease gauge --------------------------------------------------------------------


class ActiveLeaseGauge:
    """Keeps `icegate_active_leases` up to date by asking the store every `interval` seconds.

    One refresh costs one `list_projects` page per `page_size` projects plus one
    `session_counts` per project. A refresh that fails leaves the last figure in place (the
    failure shows in `icegate_store_errors_total`).
    """

    def __init__(self, store: Store, clock: Clock, metrics: IcegateMetrics, *,
                 interval: float = 15.0, page_size: int = 500) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self.interval = interval
        self._page_size = page_size

    async def refresh(self) -> int:
        """Counts the live leases now, sets the gauge and returns the count."""
        now_ms = int(self._clock.now() * 1000)
        month = month_of(now_ms)
        total, after = 0, ""
        while True:
            page = await self._store.list_projects(after=after, limit=self._page_size)
            for project in page:
                _, active = await self._store.session_counts(
                    project_id=project.project_id, month=month, now_ms=now_ms)
                total += active
            if len(page) < self._page_size:
                break
            after = page[-1].project_id
        self._metrics.set_active_leases(total)
        return total

    async def run(self) -> None:
        """Refreshes until cancelled."""
        while True:
            try:
                await self.refresh()
            except Exception:
                log.warning("active lease gauge: refresh failed; keeping the last figure")
            await asyncio.sleep(self.interval)


# --- the HTTP endpoint -------------------------------------------------------------------------

METRICS_READ_TIMEOUT_SECONDS = 5.0
"""A scrape connection that sends nothing for this long (while its request is read or its
answer written) is closed. Prometheus sends its whole request at once; 5 s is generous."""
METRICS_MAX_CONNECTIONS = 8
"""Connections served at once, one thread each: a scraper or two, plus a person with curl."""
_EVICTION_WAIT_SECONDS = 1.0
"""How long a new connection waits for the slot of the idle one it displaced."""


@dataclass(frozen=True)
class MetricsServerLimits:
    """How much of the process the metrics port may hold (docs/RELIABILITY.md)."""

    read_timeout_seconds: float = METRICS_READ_TIMEOUT_SECONDS
    max_connections: int = METRICS_MAX_CONNECTIONS


class _MetricsRequestHandler(WSGIRequestHandler):
    """wsgiref's handler with a socket timeout, quiet about clients that go away."""

    server: BoundedMetricsServer

    def setup(self) -> None:
        # Every read and write of this connection; the class `timeout` stays None.
        self.request.settimeout(self.server.limits.read_timeout_seconds)
        super().setup()

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # reads the headers
        # An evicted connection reads EOF, which ends the headers: answer it nothing.
        return self.server.request_arrived(self.connection) and parsed

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:  # TimeoutError included: a client that went quiet or away
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line per scrape says nothing


class BoundedMetricsServer(ThreadingMixIn, WSGIServer):
    """prometheus_client's WSGI app on a threading server that holds at most
    `max_connections` connections (one thread each) and drops idle ones.

    A connection over the limit displaces the connection that has waited longest without
    sending its request (closed at once); when every slot is answering a request, the new
    connection is closed at once instead. So idle or half-sent connections cost at most
    `max_connections` threads and sockets, each for at most the read timeout, and a real
    scrape, which sends its request as soon as it connects, still gets through.
    """

    daemon_threads = True
    block_on_close = False
    # The kernel holds a burst of new connections (no thread, no descriptor of ours) while
    # the accept loop makes room, instead of dropping their SYNs into a 1 s retransmit.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily,
                 limits: MetricsServerLimits) -> None:
        self.address_family = family
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._lock = threading.Lock()
        # Connections still sending their request, oldest first; every open one; and those
        # hung up on to make room, whose threads are ending.
        self._waiting: dict[socket.socket, None] = {}
        self._open: set[socket.socket] = set()
        self._evicted: set[socket.socket] = set()
        super().__init__(address, _MetricsRequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._evict_longest_waiting()
            if not self._slots.acquire(timeout=_EVICTION_WAIT_SECONDS):
                self.shutdown_request(request)
                return
        with self._lock:
            self._waiting[request] = None
            self._open.add(request)
        try:
            super().process_request(request, client_address)  # starts its thread
        except BaseException:
            self._forget(request)
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def request_arrived(self, connection: socket.socket) -> bool:
        """The connection sent its request: it is answered, no longer evictable. False when
        it was evicted meanwhile (it then gets no answer)."""
        with self._lock:
            self._waiting.pop(connection, None)
            return connection not in self._evicted

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback to stderr for a client that hung up mid-way.
        log.debug("metrics: a scrape connection failed")

    def server_close(self) -> None:
        super().server_close()
        with self._lock:
            connections = list(self._open)
        for connection in connections:
            _hang_up(connection)

    def _forget(self, request: socket.socket) -> None:
        with self._lock:
            self._waiting.pop(request, None)
            self._evicted.discard(request)
            if request not in self._open:
                return
            self._open.discard(request)
        self._slots.release()

    def _evict_longest_waiting(self) -> None:
        with self._lock:
            victim = next(iter(self._waiting), None)
            if victim is not None:
                del self._waiting[victim]
                self._evicted.add(victim)
        if victim is not None:
            # Its blocked read returns at once; its thread ends and frees the slot.
            _hang_up(victim)


def _hang_up(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already gone
        connection.shutdown(socket.SHUT_RDWR)


@dataclass
class MetricsEndpoint:
    """The bounded metrics server for one registry, accepting on its own daemon thread."""

    httpd: BoundedMetricsServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def stop(self) -> None:
        """Stops serving, closes the socket and hangs up on open connections."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, host: str, port: int,
                  limits: MetricsServerLimits | None = None) -> MetricsEndpoint:
    """Serves `registry` at `http://host:port/metrics` (port 0 picks a free one), off the
    gRPC event loop: accepting on one thread, answering on at most `limits.max_connections`.

    Raises:
        OSError: The address cannot be bound.
    """
    host = host.strip("[]")
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    httpd = BoundedMetricsServer((str(sockaddr[0]), port), family, limits or MetricsServerLimits())
    httpd.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=httpd.serve_forever, name="icegate-metrics", daemon=True)
    thread.start()
    return MetricsEndpoint(httpd, thread)
