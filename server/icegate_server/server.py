"""Assembles the server from settings, and runs it until SIGTERM/SIGINT.

One process serves the contract on two transports, on one event loop: gRPC through grpc.aio
(`ICEGATE_LISTEN`) and, when `ICEGATE_HTTP_LISTEN` is set, Connect and gRPC-Web over HTTP
(`transports/`). Both serve the same servicers through the same guard, store and metrics.
`create_server` is separate from `serve` so tests start real servers on port 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import grpc.aio
import httpx
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from icegate.v1 import (
    admin_pb2,
    credentials_pb2,
    sessions_pb2,
    usage_pb2,
)
from icegate_server.access.control import AccessControl
from icegate_server.access.guard import MAX_REQUEST_BYTES, CallGuard
from icegate_server.access.tls import certificate_expiry, is_loopback_host, server_credentials
from icegate_server.clock import Clock, SystemClock
from icegate_server.errors import IcegateError
from icegate_server.observability.logs import Safe
from icegate_server.observability.metrics import (
    ActiveLeaseGauge,
    IcegateMetrics,
    MetricsEndpoint,
    MetricsServerLimits,
    instrument_store,
    serve_metrics,
)
from icegate_server.observability.tracing import tracing_from_environment
from icegate_server.projects.admin import ProjectAdmin, ProjectDefaults
from icegate_server.projects.usage import UsageReporter
from icegate_server.servicers.admin_service import AdminServicer
from icegate_server.servicers.credential_service import CredentialServicer
from icegate_server.servicers.session_service import SessionServicer
from icegate_server.servicers.usage_service import UsageServicer
from icegate_server.sessions.incoming_calls import IncomingCalls
from icegate_server.sessions.policy import SessionPolicies
from icegate_server.sessions.provider_keys import ProviderKeys
from icegate_server.sessions.providers import (
    ProviderRuntime,
    ProviderSettings,
    build_providers,
    make_http_client,
)
from icegate_server.sessions.realtime import RealtimeSessions
from icegate_server.sessions.vault import Vault, load_master_keys
from icegate_server.settings import ConfigError, Settings, parse_listen_address
from icegate_server.store import Store, open_store
from icegate_server.transports.grpc_methods import MethodTable
from icegate_server.turn.coturn_cli import CoturnCli
from icegate_server.turn.coturn_stats import (
    COTURN_STATS_HEALTH,
    CoturnStatsMeter,
    Metering,
    MeteringStatus,
)
from icegate_server.turn.coturn_userdb import (
    CoturnRedisSecrets,
    CoturnSecretSink,
    CoturnSqliteSecrets,
)
from icegate_server.turn.credentials import TurnCredentialIssuer, TurnSecretKeyring
from icegate_server.turn.revocation import SessionTurnSweeper, TurnRevocation
from icegate_server.turn.rotation import TurnSecretRotation

if TYPE_CHECKING:  # imported when ICEGATE_HTTP_LISTEN is set (create_server)
    from icegate_server.observability.spans import Tracing  # only when tracing is on
    from icegate_server.transports.http_listener import HttpListener

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    credentials_pb2.DESCRIPTOR.services_by_name["CredentialService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
    sessions_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
)
"""The icegate services this server registers (health reports each, and the overall "")."""


@dataclass
class IcegateServer:
    """A created (not yet started) icegate server and what it owns."""

    grpc_server: grpc.aio.Server
    health: health.aio.HealthServicer
    store: Store
    settings: Settings
    http: httpx.AsyncClient
    turn_secrets: TurnSecretRotation
    metrics: IcegateMetrics = field(default_factory=IcegateMetrics)
    metrics_endpoint: MetricsEndpoint | None = None
    """The Prometheus endpoint (`ICEGATE_METRICS_LISTEN`), None when off."""
    lease_gauge: ActiveLeaseGauge | None = None
    sessions: RealtimeSessions | None = None
    """Realtime sessions, whose give-backs in flight are finished or stopped at `stop`."""
    http_listener: HttpListener | None = None
    """Connect and gRPC-Web over HTTP (`ICEGATE_HTTP_LISTEN`), None when off."""
    webhook_listener: HttpListener | None = None
    """OpenAI's incoming-call webhook (`ICEGATE_WEBHOOK_LISTEN`), None when off."""
    coturn_meter: CoturnStatsMeter | None = None
    """Meters TURN usage from coturn's stats stream (`ICEGATE_COTURN_STATSDB`), or None."""
    session_turn: SessionTurnSweeper | None = None
    """Ends ended sessions' TURN allocations (with `ICEGATE_COTURN_CLI`; without, forgets
    them)."""
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _background: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def metrics_port(self) -> int | None:
        """The port metrics are served on, None when off."""
        return None if self.metrics_endpoint is None else self.metrics_endpoint.port

    @property
    def http_port(self) -> int | None:
        """The port Connect is served on, None when off."""
        return None if self.http_listener is None else self.http_listener.port

    @property
    def webhook_port(self) -> int | None:
        """The port the incoming-call webhook is taken on, None when off."""
        return None if self.webhook_listener is None else self.webhook_listener.port

    async def start(self) -> None:
        """Starts serving (every listener) and reports SERVING."""
        # The HTTP listeners first, so that once the gRPC server answers, the others do too
        # (grpc's port takes connections into its backlog from `create_server` on, before
        # it answers anything).
        if self.http_listener is not None:
            await self.http_listener.start()
        if self.webhook_listener is not None:
            await self.webhook_listener.start()
        await self.grpc_server.start()
        self.turn_secrets.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.lease_gauge is not None:
            self._background.append(asyncio.create_task(self.lease_gauge.run()))
        if self.sessions is not None:
            self._background.append(asyncio.create_task(self.sessions.run_reaper()))
        if self.coturn_meter is not None:
            await self.health.set(COTURN_STATS_HEALTH, health_pb2.HealthCheckResponse.NOT_SERVING)
            self.coturn_meter.start()
        if self.session_turn is not None:
            self._background.append(asyncio.create_task(self.session_turn.run()))

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, lets in-flight calls finish within `grace`, then releases all."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.health.enter_graceful_shutdown()
        grace = self.settings.shutdown_grace if grace is None else grace
        stopping = [self.grpc_server.stop(grace)]
        if self.http_listener is not None:
            stopping.append(self.http_listener.stop(grace))
        if self.webhook_listener is not None:
            stopping.append(self.webhook_listener.stop(grace))
        await asyncio.gather(*stopping)
        await self.turn_secrets.stop()
        if self.coturn_meter is not None:
            await self.coturn_meter.stop()
        await cancel_until_done(self._background)
        if self.metrics_endpoint is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.metrics_endpoint.stop)
        if self.sessions is not None:
            await self.sessions.close()
        await self.http.aclose()
        await self.store.close()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


async def cancel_until_done(tasks: list[asyncio.Task[None]]) -> None:
    """Cancels `tasks` until every one has ended.

    Once is not always enough: a cancellation can be lost on its way through a library. Seen
    in a Redis-backed worker stopped just after it started: the TURN sweeper, cancelled while
    its first store call was under way, did not see a CancelledError come out of it, slept,
    and went on sweeping, and the stop waited for it forever (tests/unit/test_server_stop.py).
    """
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)


def project_defaults(settings: Settings) -> ProjectDefaults:
    """The limits a new project starts with, from the server's TTL policy."""
    return ProjectDefaults(turn_ttl_default_seconds=settings.turn_ttl_default,
                           turn_ttl_max_seconds=settings.turn_ttl_max,
                           turn_ttl_min_seconds=settings.turn_ttl_min)


def provider_settings(settings: Settings) -> ProviderSettings:
    """Where each upstream provider lives; empty settings keep the providers' defaults."""
    defaults = ProviderSettings()
    return ProviderSettings(
        openai_base_url=settings.openai_base_url or defaults.openai_base_url,
        azure_base_url=settings.azure_base_url or defaults.azure_base_url,
        orga_base_url=settings.orga_base_url or defaults.orga_base_url,
        gemini_base_url=settings.gemini_base_url or defaults.gemini_base_url)


def coturn_sinks(settings: Settings) -> list[CoturnSecretSink]:
    """The coturn databases icegate keeps the TURN secrets in, from settings."""
    sinks: list[CoturnSecretSink] = []
    if settings.coturn_redis:
        sinks.append(CoturnRedisSecrets(settings.coturn_redis, settings.turn_realm))
    if settings.coturn_sqlite:
        sinks.append(CoturnSqliteSecrets(settings.coturn_sqlite, settings.turn_realm))
    return sinks


def coturn_meter(settings: Settings, store: Store, clock: Clock, metrics: IcegateMetrics,
                 revocation: TurnRevocation, cli: CoturnCli | None,
                 health_servicer: health.aio.HealthServicer) -> CoturnStatsMeter | None:
    """The meter of coturn's stats stream (`ICEGATE_COTURN_STATSDB`), reporting how it stands
    in the health service `COTURN_STATS_HEALTH`, and ending allocations of revoked
    credentials through the CLI; None when no stream is configured."""
    if not settings.coturn_statsdb:
        return None

    async def metering_health(metering: Metering) -> None:
        await health_servicer.set(COTURN_STATS_HEALTH, (
            health_pb2.HealthCheckResponse.SERVING if metering.status is MeteringStatus.LIVE
            else health_pb2.HealthCheckResponse.NOT_SERVING))

    return CoturnStatsMeter(settings.coturn_statsdb, store, clock, metrics,
                            on_change=metering_health, cli=cli,
                            end_revoked=revocation.end_username if cli else None,
                            resync_seconds=settings.coturn_stats_resync)


async def create_server(
    settings: Settings, *, clock: Clock | None = None,
    http_transport: httpx.AsyncBaseTransport | None = None,
    metrics_limits: MetricsServerLimits | None = None,
    tracing: Tracing | None = None,
) -> tuple[IcegateServer, int]:
    """Builds the server and binds its port (0 picks a free one); call `start()` next.

    `metrics_limits` bounds the metrics port (default: `MetricsServerLimits()`'s constants).
    `tracing` (None: off) traces every guarded call, its store calls and its upstream
    requests; the traced parts are chosen here, once (`observability/tracing.py`).

    Returns:
        The server and the port it is bound to.
    """
    clock = clock or SystemClock()
    metrics = IcegateMetrics()
    vault = Vault(load_master_keys(settings.master_key or None,
                                   settings.master_key_file or None))
    store = instrument_store(
        await open_store(settings.store_url, timeout=settings.store_timeout,
                         linger=settings.store_linger), metrics)
    if tracing is not None:
        store = tracing.traced_store(store, settings.store_url)
    http = make_http_client(settings.upstream_connect_timeout, settings.upstream_read_timeout,
                            transport=http_transport)
    if tracing is not None:
        tracing.instrument_http(http)
    try:
        keyring = TurnSecretKeyring(settings.turn_secrets)
        issuer = TurnCredentialIssuer(keyring, clock, settings.turn_uris,
                                      min_ttl_seconds=settings.turn_ttl_min,
                                      on_issue=metrics.turn_credential_issued)
        admin = ProjectAdmin(store, clock, project_defaults(settings))
        await admin.ensure_default_project()
        turn_secrets = TurnSecretRotation(
            store, vault, clock, issuer, static_secrets=settings.turn_secrets,
            max_ttl_seconds=settings.turn_ttl_max, sinks=coturn_sinks(settings),
            rotate_every_seconds=settings.turn_rotate_interval,
            on_sync_failure=metrics.coturn_sync_failed)
        metrics.watch_signing_secret_age(lambda: turn_secrets.signing_secret_age(clock.now()))
        await turn_secrets.refresh()
        access = AccessControl(store, clock, settings.api_keys,
                               fail_open_rate_limit=settings.rate_limit_fail_open,
                               identity_projects=dict(settings.tls_client_projects))

        server = grpc.aio.server(
            options=[
                # Several workers share the port on purpose; one server must never share it
                # silently with another (gRPC's default is 1).
                ("grpc.so_reuseport", int(settings.workers > 1)),
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                # grpcio never answers a unary stream that ends before a whole message, so a
                # peer could park such streams forever: bound them per connection, and let
                # connections age out (clients reconnect on GOAWAY by themselves).
                ("grpc.max_concurrent_streams", 256),
                ("grpc.max_connection_age_ms", 30 * 60 * 1000),
                ("grpc.max_connection_age_grace_ms", 60 * 1000),
                # Accept the icegate client's keepalive pings (every 60 s, idle channels
                # included: see icegate.connection) instead of answering them with GOAWAY.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
            ],
        )
        provider_keys = ProviderKeys(store, vault, clock)
        providers = build_providers(provider_settings(settings),
                                    ProviderRuntime(http, metrics=metrics))
        sessions = RealtimeSessions(store, provider_keys, providers, issuer, settings.stun_uris,
                                    clock, lease_seconds=settings.session_lease_seconds,
                                    upstream_seconds=settings.upstream_connect_timeout
                                    + settings.upstream_read_timeout)
        guard = CallGuard(access, metrics, tracing)
        coturn_cli = (CoturnCli(settings.coturn_cli, settings.coturn_cli_password)
                      if settings.coturn_cli else None)
        revocation = TurnRevocation(store, clock, coturn_cli,
                                    max_ttl_seconds=settings.turn_ttl_max)
        health_servicer = health.aio.HealthServicer()
        meter = coturn_meter(settings, store, clock, metrics, revocation, coturn_cli,
                             health_servicer)
        # Every service on both transports: the guarded ones, then health (open). Reflection
        # (a bidirectional stream) is gRPC's only.
        served = (
            (credentials_pb2.DESCRIPTOR.services_by_name["CredentialService"],
             CredentialServicer(issuer, settings.stun_uris), guard),
            (sessions_pb2.DESCRIPTOR.services_by_name["SessionService"],
             SessionServicer(sessions), guard),
            (admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
             AdminServicer(admin, provider_keys, turn_secrets,
                           SessionPolicies(store, providers, clock), revocation), guard),
            (usage_pb2.DESCRIPTOR.services_by_name["UsageService"],
             UsageServicer(UsageReporter(store, clock, meter.metering if meter else None)),
             guard),
            (health_pb2.DESCRIPTOR.services_by_name["Health"], health_servicer, None),
        )
        methods = MethodTable()
        for descriptor, servicer, service_guard in served:
            methods.add(descriptor, servicer, service_guard)
        methods.add(reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
                    reflection.aio.ReflectionServicer(
                        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)))
        server.add_generic_rpc_handlers((methods,))
        tls = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        if settings.tls_cert:
            metrics.set_tls_certificate_expiry(certificate_expiry(settings.tls_cert))
        try:
            port = (server.add_secure_port(settings.listen, tls) if tls is not None
                    else server.add_insecure_port(settings.listen))
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {settings.listen}: address in use or not available")
        http_listener = None
        if settings.http_listen:
            # Imported only when asked for: the Connect runtime needs Python 3.11 (on 3.10 the
            # settings refuse ICEGATE_HTTP_LISTEN, and gRPC serves alone).
            from icegate_server.transports.http_listener import connect_listener
            http_listener = connect_listener(served, settings)
        webhook_listener = None
        if settings.webhook_listen:
            from icegate_server.transports.webhook_listener import webhook_listener as listener
            try:
                webhook_listener = listener(IncomingCalls(
                    store, vault, provider_keys, sessions, providers, clock), settings)
            except OSError:
                if http_listener is not None:
                    await http_listener.stop(0)
                raise
        endpoint, lease_gauge = None, None
        if settings.metrics_listen:
            host, metrics_port = parse_listen_address(settings.metrics_listen)
            try:
                endpoint = serve_metrics(metrics.registry, host, metrics_port, metrics_limits)
            except OSError as error:
                for opened in (http_listener, webhook_listener):
                    if opened is not None:
                        await opened.stop(0)
                raise OSError(f"cannot serve metrics on {settings.metrics_listen} "
                              f"(ICEGATE_METRICS_LISTEN): {error.strerror}") from None
            lease_gauge = ActiveLeaseGauge(store, clock, metrics)
        session_turn = SessionTurnSweeper(store, clock, revocation)
    except BaseException:
        # Nothing starts half-built: release what was opened before the failure.
        await http.aclose()
        await store.close()
        raise
    return IcegateServer(server, health_servicer, store, settings, http, turn_secrets, metrics,
                         endpoint, lease_gauge, sessions=sessions, coturn_meter=meter,
                         session_turn=session_turn, http_listener=http_listener,
                         webhook_listener=webhook_listener), port


def _freeze_startup_objects() -> None:
    """Hides everything built so far (modules, stubs, the store's caches) from the cyclic
    garbage collector: it lives as long as the process, and a full collection walking it
    paused every call in flight for about 30 ms every half a minute under load. Collections
    then look only at what calls create."""
    gc.collect()
    gc.freeze()


async def serve(settings: Settings, *,
                stop_signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
                on_listening: Callable[[IcegateServer, int], None] | None = None) -> None:
    """Runs the server until one of `stop_signals` arrives, then shuts down gracefully.

    `on_listening(server, port)` is called once every listener is bound (the dev secrets
    file records where, for the `icegate` command: `dev_secrets.record_listening`).

    A worker under `icegate-server --workers N` stops on SIGTERM only: its supervisor
    forwards SIGINT as SIGTERM, and the terminal's SIGINT must not reach it twice.
    """
    tracing = tracing_from_environment()
    try:
        await _serve(settings, tracing, stop_signals, on_listening)
    finally:
        if tracing is not None:
            # Exports the spans still batched (bounded by the exporter's own timeout).
            await asyncio.get_running_loop().run_in_executor(None, tracing.shutdown)


async def _serve(settings: Settings, tracing: Tracing | None,
                 stop_signals: tuple[signal.Signals, ...],
                 on_listening: Callable[[IcegateServer, int], None] | None) -> None:
    # The stop signals have their handlers before anything listens: the HTTP listener serves
    # while the gRPC port is still starting, and a SIGTERM then must stop it gracefully too.
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in stop_signals:
        loop.add_signal_handler(sig, stop_requested.set)
    server, port = await create_server(settings, tracing=tracing)
    await server.start()
    host = settings.listen.rpartition(":")[0]
    transport = ("mutual TLS" if settings.tls_client_ca else "TLS" if settings.tls_cert
                 else "no TLS")
    log.info("icegate-server listening on %s:%d (%s, store %s)", Safe(host), port,
             Safe(transport), Safe(settings.store_url.split("://", 1)[0]))
    if not settings.tls_cert and not is_loopback_host(host):
        log.warning("listening on %s without TLS: keys and credentials cross the network in "
                    "clear; set ICEGATE_TLS_CERT and ICEGATE_TLS_KEY", Safe(host))
    if server.http_listener is not None:
        http_host = settings.http_listen.rpartition(":")[0]
        log.info("Connect and gRPC-Web on %s://%s:%d", Safe(server.http_listener.scheme),
                 Safe(http_host), server.http_listener.port)
        if not settings.tls_cert and not is_loopback_host(http_host):
            log.warning("serving HTTP on %s without TLS: keys and credentials cross the "
                        "network in clear; set ICEGATE_TLS_CERT and ICEGATE_TLS_KEY",
                        Safe(http_host))
    if server.webhook_listener is not None:
        log.info("OpenAI incoming-call webhook on %s://%s:%d/webhooks/openai",
                 Safe(server.webhook_listener.scheme),
                 Safe(settings.webhook_listen.rpartition(":")[0]), server.webhook_listener.port)
    if server.metrics_port is not None:
        log.info("Prometheus metrics on http://%s:%d/metrics",
                 Safe(settings.metrics_listen.rpartition(":")[0]), server.metrics_port)
    if tracing is not None:
        log.info("OpenTelemetry tracing on (OTEL_TRACES_EXPORTER)")
    if on_listening is not None:
        on_listening(server, port)

    # After the stop signals have their handlers: a signal during the collection (tens of
    # ms) must still stop the server gracefully.
    _freeze_startup_objects()
    await stop_requested.wait()
    log.info("shutting down: finishing in-flight calls (grace %.1f s)", settings.shutdown_grace)
    await server.stop()
    log.info("stopped")


def run_server(settings: Settings, *,
               stop_signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
               on_listening: Callable[[IcegateServer, int], None] | None = None) -> int:
    """Serves in this process, on uvloop where available, until one of `stop_signals`."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in the server extra except on Windows
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(settings, stop_signals=stop_signals, on_listening=on_listening))
    except (OSError, IcegateError, ConfigError) as error:
        print(f"icegate-server: {error}", file=sys.stderr)
        return 1
    return 0
