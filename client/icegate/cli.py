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

from google.protobuf import json_format
from google.protobuf.message import Message

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

    usage = commands.add_parser("usage", help="print a project's usage and limits")
    usage.add_argument("--project", default="", help="project id (default: the key's)")

    _add_admin_commands(commands.add_parser("admin", help="manage projects and keys "
                                            "(admin keys only)"))
    return parser


def _add_project_fields(command: argparse.ArgumentParser) -> None:
    command.add_argument("--name", dest="display_name", help="display name")
    command.add_argument("--rate-limit", dest="rate_limit_requests", type=int,
                         help="requests per rate window (default 100)")
    command.add_argument("--rate-window", dest="rate_limit_window", type=int,
                         help="rate window in seconds (default 900)")
    command.add_argument("--ttl-default", dest="turn_ttl_default", type=int,
                         help="TURN credential lifetime when none is asked for, seconds")
    command.add_argument("--ttl-max", dest="turn_ttl_max", type=int,
                         help="longest TURN credential lifetime, seconds")
    command.add_argument("--plan", help="plan label shown in quota errors")
    command.add_argument("--upgrade-url", dest="upgrade_url", help="where to upgrade the plan")
    command.add_argument("--session-quota", dest="monthly_session_quota", type=int,
                         help="sessions per calendar month (default 1000)")
    command.add_argument("--max-concurrent", dest="max_concurrent_sessions", type=int,
                         help="sessions held at once (default 5)")


def _add_admin_commands(admin: argparse.ArgumentParser) -> None:
    groups = admin.add_subparsers(dest="admin_group", required=True)

    project = groups.add_parser("project", help="projects").add_subparsers(
        dest="admin_command", required=True)
    create = project.add_parser("create", help="create a project")
    create.add_argument("project_id")
    _add_project_fields(create)
    update = project.add_parser("update", help="change some fields of a project")
    update.add_argument("project_id")
    _add_project_fields(update)
    for name in ("get", "delete"):
        project.add_parser(name, help=f"{name} a project").add_argument("project_id")
    project.add_parser("list", help="list every project")

    key = groups.add_parser("key", help="caller keys").add_subparsers(
        dest="admin_command", required=True)
    create_key = key.add_parser("create", help="create a key (its secret is shown once)")
    scope = create_key.add_mutually_exclusive_group(required=True)
    scope.add_argument("--project", help="the project the key may act on")
    scope.add_argument("--admin", action="store_true", help="an admin key")
    create_key.add_argument("--name", default="", help="a label for people")
    list_keys = key.add_parser("list", help="list keys (admin keys without --project)")
    list_keys.add_argument("--project", default="")
    key.add_parser("revoke", help="revoke a key").add_argument("key_id")


_PROJECT_FIELD_NAMES = ("display_name", "rate_limit_requests", "rate_limit_window",
                        "turn_ttl_default", "turn_ttl_max", "plan", "upgrade_url",
                        "monthly_session_quota", "max_concurrent_sessions")


def _as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def _run_admin(args: argparse.Namespace, client: Client) -> Any:
    command = (args.admin_group, args.admin_command)
    fields = {name: getattr(args, name, None) for name in _PROJECT_FIELD_NAMES}
    if command == ("project", "create"):
        return _as_dict(client.create_project(args.project_id, **fields))
    if command == ("project", "update"):
        return _as_dict(client.update_project(args.project_id, **fields))
    if command == ("project", "get"):
        return _as_dict(client.get_project(args.project_id))
    if command == ("project", "delete"):
        client.delete_project(args.project_id)
        return {"deleted": args.project_id}
    if command == ("project", "list"):
        return [_as_dict(p) for p in client.list_all_projects()]
    if command == ("key", "create"):
        return _as_dict(client.create_api_key(args.project or "", admin=args.admin,
                                              display_name=args.name))
    if command == ("key", "list"):
        return [_as_dict(k) for k in client.list_api_keys(args.project)]
    if command == ("key", "revoke"):
        return _as_dict(client.revoke_api_key(args.key_id))
    raise AssertionError(command)


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
    if args.command == "usage":
        return _as_dict(client.get_usage(args.project))
    if args.command == "admin":
        return _run_admin(args, client)
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
