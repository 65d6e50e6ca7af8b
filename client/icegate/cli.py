"""`icegate`: the client's command line, for people and scripts.

Talks to `ICEGATE_TARGET` (host:port) with `ICEGATE_API_KEY`. Results go to standard output
as JSON; errors to standard error as one line, with exit status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from icegate.client import Client
from icegate.connection import ConfigurationError
from icegate.errors import IcegateError
from icegate.ice import rtc_ice_servers


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icegate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="host:port of icegate (ICEGATE_TARGET)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call (10)")
    parser.add_argument("--debug", action="store_true", help="log each call (no secrets)")
    commands = parser.add_subparsers(dest="command", required=True)

    for name, help_text in (
        ("turn-credentials", "issue a TURN credential: username, password, ttl, expiry, URIs"),
        ("ice-servers", "print the RTCIceServer list (JSON) for a user"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--user", required=True, help="the end user's id")
        command.add_argument("--ttl", type=int, help="lifetime in seconds (server default)")
        command.add_argument("--project", default="", help="project id (admin keys only)")

    health = commands.add_parser("health", help="print the server's serving status")
    health.add_argument("--service", default="", help="one service's status instead")
    return parser


def _run(args: argparse.Namespace, client: Client) -> Any:
    if args.command == "turn-credentials":
        credential = client.issue_turn_credentials(args.user, ttl=args.ttl,
                                                   project_id=args.project)
        return {
            "username": credential.username,
            "password": credential.password,
            "ttl": credential.ttl.seconds,
            "expires_at": credential.expire_time.ToDatetime().isoformat() + "Z",
            "uris": list(credential.uris),
        }
    if args.command == "ice-servers":
        response = client.get_ice_servers(args.user, ttl=args.ttl, project_id=args.project)
        return rtc_ice_servers(response.ice_servers)
    if args.command == "health":
        return client.health(args.service)
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
    try:
        with Client(args.target, default_timeout=args.timeout, debug=args.debug) as client:
            result = _run(args, client)
    except (IcegateError, ConfigurationError) as error:
        print(f"icegate: {error}", file=sys.stderr)
        return 1
    if isinstance(result, str):
        print(result)
    else:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
