"""`icegate-server`: runs the service, or prints a coturn config that matches its settings.

    icegate-server [--listen HOST:PORT] [--config FILE] [...]   run the service
    icegate-server --workers N [...]                            N processes on one port (Redis)
    icegate-server coturn-config [--output FILE] [...]          print a matching turnserver.conf
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from icegate_server.dev_secrets import apply_dev_secrets, dialable, record_listening
from icegate_server.errors import IcegateError
from icegate_server.observability.logs import Safe, configure_logging, stop_logging
from icegate_server.observability.tracing import check_tracing_environment
from icegate_server.server import IcegateServer, run_server
from icegate_server.settings import (
    SETTINGS,
    ConfigError,
    Settings,
    add_setting_flags,
    load_settings,
    parse_listen_address,
)
from icegate_server.workers import refuse_sqlite_workers, supervise_workers

log = logging.getLogger("icegate_server")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icegate-server",
        description="TURN credentials, ICE servers and realtime session tokens over gRPC. "
        "Settings: flags, then ICEGATE_* environment variables, then --config FILE (TOML).",
    )
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "coturn-config"])
    parser.add_argument("--output", "-o", metavar="FILE",
                        help="coturn-config: write here (mode 0600) instead of standard output")
    rendering = parser.add_argument_group("coturn-config rendering (not settings)")
    rendering.add_argument("--coturn-listening-ip", default="127.0.0.1", metavar="IP",
                           help="address coturn answers on (127.0.0.1)")
    rendering.add_argument("--coturn-relay-ip", default="127.0.0.1", metavar="IP",
                           help="address coturn relays from (127.0.0.1)")
    rendering.add_argument("--coturn-min-port", type=int, default=49160, metavar="PORT",
                           help="lowest relay UDP port (49160)")
    rendering.add_argument("--coturn-max-port", type=int, default=49200, metavar="PORT",
                           help="highest relay UDP port (49200)")
    rendering.add_argument("--coturn-external-ip", default="", metavar="PUBLIC[/PRIVATE]",
                           help="behind a 1:1 NAT: the public address clients reach coturn at "
                           "(and the private one it has)")
    rendering.add_argument("--coturn-allow-loopback-peers", action="store_true",
                           help="let relayed traffic reach this host's loopback: only for a "
                           "coturn on loopback addresses (make coturn, tests); refused otherwise")
    add_setting_flags(parser)
    return parser


def _resolve_settings(args: argparse.Namespace) -> tuple[Settings, Path | None]:
    # Only settings: the rendering options (`--coturn-listening-ip`...) are not settings,
    # while `--coturn-redis` and `--coturn-sqlite` are.
    flags = {key: value for key, value in vars(args).items() if key in SETTINGS or key == "config"}
    settings = load_settings(flags)
    refuse_sqlite_workers(settings)
    check_tracing_environment()  # OTEL_*: once, before any worker starts
    # From here on every line goes through the sanitising formatter (observability.logs).
    configure_logging(settings.log_format, settings.log_level)
    settings, dev_file, created = apply_dev_secrets(settings)
    if dev_file is not None:
        log.warning(
            "%s development secrets in %s (mode 0600) for the settings left empty; set "
            "ICEGATE_TURN_SECRETS, ICEGATE_API_KEYS and ICEGATE_MASTER_KEY in production",
            Safe("generated" if created else "using"), dev_file)
        log.warning(
            "the icegate command run from this directory picks the dev key up by itself; "
            "other callers: export ICEGATE_API_KEY=\"$(python3 -c 'import json; "
            "print(json.load(open(\"%s\"))[\"api_key\"])')\"", dev_file)
    return settings, dev_file


def _recorder(settings: Settings, dev_file: Path) -> Callable[[IcegateServer, int], None]:
    """Records in the dev secrets file where the server listens, once it does."""

    def record(server: IcegateServer, port: int) -> None:
        listener = server.http_listener
        _record_listening(settings, dev_file, port,
                          None if listener is None else (listener.scheme, listener.port))

    return record


def _record_workers_listening(settings: Settings, dev_file: Path) -> Callable[[], None]:
    """Records the ports `--workers N` serve on: fixed ones (settings refuse port 0 there)."""
    def record() -> None:
        http = None if not settings.http_listen else (
            "https" if settings.tls_cert else "http",
            parse_listen_address(settings.http_listen)[1])
        _record_listening(settings, dev_file, parse_listen_address(settings.listen)[1], http)

    return record


def _record_listening(settings: Settings, dev_file: Path, grpc_port: int,
                      http: tuple[str, int] | None) -> None:
    """Writes the dialable gRPC target and HTTP URL (`http`: scheme and port) to `dev_file`."""
    http_url = None if http is None else (
        f"{http[0]}://{dialable(settings.http_listen.rpartition(':')[0])}:{http[1]}")
    try:
        record_listening(dev_file, f"{dialable(settings.listen.rpartition(':')[0])}:{grpc_port}",
                         http_url)
    except (OSError, ValueError) as error:  # the server runs on; only discovery suffers
        log.warning("could not record the listening address in %s: %s", dev_file,
                    Safe(type(error).__name__))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        try:
            settings, dev_file = _resolve_settings(args)
        except ConfigError as error:
            print(f"icegate-server: {error}", file=sys.stderr)
            return 2
        return _run(args, settings, dev_file)
    finally:
        stop_logging()  # writes out what is still queued


def _run(args: argparse.Namespace, settings: Settings, dev_file: Path | None) -> int:
    if args.command == "coturn-config":
        from icegate_server.turn.coturn_config import (
            CoturnConfigError,
            CoturnRendering,
            write_coturn_config,
        )

        rendering = CoturnRendering(
            listening_ip=args.coturn_listening_ip, relay_ip=args.coturn_relay_ip,
            min_port=args.coturn_min_port, max_port=args.coturn_max_port,
            external_ip=args.coturn_external_ip,
            allow_loopback_peers=args.coturn_allow_loopback_peers)
        try:
            warnings = write_coturn_config(settings, args.output, rendering)
        except CoturnConfigError as error:
            print(f"icegate-server coturn-config: {error}", file=sys.stderr)
            return 2
        for warning in warnings:
            print(f"icegate-server coturn-config: warning: {warning}", file=sys.stderr)
        return 0

    if settings.workers > 1:
        record = (lambda: None) if dev_file is None else _record_workers_listening(settings,
                                                                                  dev_file)
        try:
            return supervise_workers(settings, record)
        except (OSError, IcegateError) as error:
            print(f"icegate-server: {error}", file=sys.stderr)
            return 1
    return run_server(settings, on_listening=None if dev_file is None
                      else _recorder(settings, dev_file))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
