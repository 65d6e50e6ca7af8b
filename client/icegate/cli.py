"""`icegate`: the client's command line, for people and scripts.

Talks to `ICEGATE_TARGET` (host:port for gRPC, or an http:// or https:// URL for Connect) with
`ICEGATE_API_KEY` (when unset: the `make run` dev server started in this directory, on
whatever port it listens, with its dev key; else 127.0.0.1:50051), over TLS when given a CA
(`--ca-file`, `ICEGATE_TLS_CA`), a client certificate (`--cert`/`--key`), an https:// URL,
or the name to check the server's certificate against (`--server-name`,
`ICEGATE_TLS_SERVER_NAME`; gRPC only). Results go to standard output as JSON; errors to
standard error as one line, with exit status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from icegate.browser import browser_call, browser_session
from icegate.client import Client
from icegate.connection import ConfigurationError, TlsConfig
from icegate.errors import IcegateError
from icegate.ice import iso_timestamp, rtc_ice_servers


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icegate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="host:port of icegate's gRPC port, or the http(s):// "
                        "URL of its HTTP listener for Connect (ICEGATE_TARGET; else the dev "
                        "server started in this directory, else 127.0.0.1:50051)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call (10)")
    parser.add_argument("--debug", action="store_true", help="log each call (no secrets)")
    parser.add_argument("--field", metavar="PATH",
                        help="print only this field of the answer, e.g. session_id or "
                        "api_key.key_id (text as is, anything else as JSON): for scripts")
    parser.add_argument("--ca-file", help="call over TLS, trusting this PEM CA bundle "
                        "(ICEGATE_TLS_CA)")
    parser.add_argument("--cert", help="PEM client certificate for mutual TLS, with --key "
                        "(ICEGATE_TLS_CERT); no API key needed if the server maps it")
    parser.add_argument("--key", help="PEM private key of --cert (ICEGATE_TLS_KEY)")
    parser.add_argument("--server-name", help="call over TLS, checking the server's "
                        "certificate against this name instead of the target's host, e.g. "
                        "when dialing an IP address (ICEGATE_TLS_SERVER_NAME)")
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
    usage.add_argument("--turn-user", default="",
                       help="also the TURN usage of this user id (or session id)")

    _add_session_commands(commands.add_parser("session", help="realtime AI sessions"))
    _add_admin_commands(commands.add_parser("admin", help="manage projects and keys "
                                            "(admin keys only)"))
    return parser


def _add_session_commands(session: argparse.ArgumentParser) -> None:
    commands = session.add_subparsers(dest="session_command", required=True)
    create = commands.add_parser("create", help="mint a provider token plus ICE servers")
    create.add_argument("--provider", default="openai",
                        help="openai, openai_beta, azure, azure_legacy, orga or gemini")
    create.add_argument("--project", default="", help="project id (admin keys only)")
    create.add_argument("--user", default="", help="end user the TURN credential is for")
    create.add_argument("--model", default="")
    create.add_argument("--voice", default="")
    create.add_argument("--instructions", default="")
    create.add_argument("--temperature", type=float)
    create.add_argument("--speed", type=float)
    create.add_argument("--token-ttl", type=int, help="provider token lifetime, seconds")
    create.add_argument("--modality", action="append", default=[], dest="modalities",
                        help="audio or text; repeat for several")
    create.add_argument("--email", default="", help="Orga only: the end user's e-mail")
    create.add_argument("--var", action="append", default=[], dest="variables",
                        metavar="NAME=VALUE",
                        help="a variable of the project's instructions template; repeat")
    _add_ga_session_flags(create)
    call = commands.add_parser("call", help="start a provider call for a browser's SDP "
                               "offer (OpenAI, Azure): prints the answer SDP and ids")
    call.add_argument("--provider", default="openai", help="openai or azure")
    call.add_argument("--sdp-file", required=True, help="the offer (SDP); - for stdin")
    call.add_argument("--project", default="", help="project id (admin keys only)")
    call.add_argument("--user", default="", help="end user the TURN credential is for")
    call.add_argument("--model", default="")
    call.add_argument("--voice", default="")
    call.add_argument("--var", action="append", default=[], dest="variables",
                      metavar="NAME=VALUE",
                      help="a variable of the project's instructions template; repeat")
    for name, help_text in (("keepalive", "renew a session's lease"),
                            ("end", "end a session, freeing its slot")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("session_id")
        command.add_argument("--project", default="")


def _add_ga_session_flags(command: argparse.ArgumentParser) -> None:
    """The GA session's options (protos/icegate/v1/sessions.proto; README's provider table)."""
    command.add_argument("--type", default="", help="realtime (default) or transcription")
    command.add_argument("--input-audio-format", default="",
                         help="audio/pcm, audio/pcmu or audio/pcma")
    command.add_argument("--output-audio-format", default="",
                         help="audio/pcm, audio/pcmu or audio/pcma")
    command.add_argument("--turn-detection", default="",
                         help="server_vad, semantic_vad or none")
    command.add_argument("--transcription-model", default="",
                         help="transcribe the user's audio with this model")
    command.add_argument("--transcription-language", default="", help="e.g. en")
    command.add_argument("--noise-reduction", default="", help="near_field or far_field")
    command.add_argument("--tools-file", help="a JSON list of tools (the provider's shape)")
    command.add_argument("--tool-choice", default="",
                         help="auto, none, required or a function name")
    command.add_argument("--max-output-tokens", type=int)
    command.add_argument("--trace", nargs="?", const="", default=None, metavar="WORKFLOW",
                         help="trace the session (optionally under a workflow name)")
    command.add_argument("--prompt-id", default="", help="a prompt stored at the provider")
    command.add_argument("--prompt-version", default="")


def _ga_session_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        "type": args.type, "input_audio_format": args.input_audio_format,
        "output_audio_format": args.output_audio_format,
        "noise_reduction": args.noise_reduction, "tool_choice": args.tool_choice,
        "max_output_tokens": args.max_output_tokens}
    if args.turn_detection:
        options["turn_detection"] = {"type": args.turn_detection}
    if args.transcription_model or args.transcription_language:
        options["input_transcription"] = {"model": args.transcription_model,
                                          "language": args.transcription_language}
    if args.tools_file:
        tools = json.loads(Path(args.tools_file).read_text("utf-8"))
        if not isinstance(tools, list):
            raise ValueError(f"{args.tools_file} must hold a JSON list of tools")
        options["tools"] = tools
    if args.trace is not None:
        options["tracing"] = {"workflow_name": args.trace} if args.trace else True
    if args.prompt_id:
        options["prompt"] = {"id": args.prompt_id, "version": args.prompt_version}
    return options


def _variables(pairs: list[str]) -> dict[str, str]:
    """`NAME=VALUE` arguments as a dict."""
    variables = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise ValueError(f"--var needs NAME=VALUE, not {pair[:64]!r}")
        variables[name] = value
    return variables


def _run_session(args: argparse.Namespace, client: Client) -> Any:
    if args.session_command == "create":
        created = client.create_session(
            args.provider, project_id=args.project, user_id=args.user, model=args.model,
            voice=args.voice, instructions=args.instructions, temperature=args.temperature,
            speed=args.speed, token_ttl=args.token_ttl, modalities=args.modalities,
            email=args.email, instruction_variables=_variables(args.variables),
            **_ga_session_options(args))
        answer = _as_dict(created)
        answer["browser"] = browser_session(created)  # what a backend hands its browser
        return answer
    if args.session_command == "call":
        offer = sys.stdin.read() if args.sdp_file == "-" else \
            Path(args.sdp_file).read_text("ascii")
        started = client.create_call(
            offer, args.provider, project_id=args.project, user_id=args.user,
            model=args.model, voice=args.voice,
            instruction_variables=_variables(args.variables))
        result = _as_dict(started)
        result["browser"] = browser_call(started)
        return result
    if args.session_command == "keepalive":
        return _as_dict(client.keep_alive_session(args.session_id, project_id=args.project))
    client.end_session(args.session_id, project_id=args.project)
    return {"ended": args.session_id}


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
    command.add_argument("--max-allocations", dest="max_allocations", type=int,
                         help="live TURN allocations at which new credentials are refused "
                              "(default 0: no limit)")
    command.add_argument("--byte-quota", dest="byte_quota", type=int,
                         help="TURN bytes relayed per calendar month at which new credentials "
                              "are refused (default 0: none)")


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
    policy = project.add_parser("policy", help="a project's session policy per provider").\
        add_subparsers(dest="policy_command", required=True)
    set_policy = policy.add_parser(
        "set", help="set the policy from a JSON file (the SessionPolicy message's JSON; - "
        "for standard input)")
    set_policy.add_argument("--file", required=True, help="policy.json, or - for stdin")
    for name, help_text in (("set", None), ("get", "print the policy"),
                            ("delete", "delete the policy")):
        command = set_policy if name == "set" else policy.add_parser(name, help=help_text)
        command.add_argument("--project", required=True)
        command.add_argument("--provider", required=True,
                             help="openai, azure, orga, gemini; openai_webhook for the "
                             "webhook secret of incoming calls")

    key = groups.add_parser("key", help="caller keys").add_subparsers(
        dest="admin_command", required=True)
    create_key = key.add_parser("create", help="create a key (its secret is shown once)")
    scope = create_key.add_mutually_exclusive_group(required=True)
    scope.add_argument("--project", help="the project the key may act on")
    scope.add_argument("--admin", action="store_true", help="an admin key")
    create_key.add_argument("--name", default="", help="a label for people")
    list_keys = key.add_parser("list", help="list keys, every page (admin keys without --project)")
    list_keys.add_argument("--project", default="")
    key.add_parser("revoke", help="revoke a key").add_argument("key_id")

    provider_key = groups.add_parser("provider-key", help="projects' provider API keys").\
        add_subparsers(dest="admin_command", required=True)
    set_key = provider_key.add_parser(
        "set", help="store a provider key, read from standard input (never from argv)")
    list_provider = provider_key.add_parser("list", help="providers and last 4 characters")
    delete_key = provider_key.add_parser("delete", help="delete a provider key")
    for command in (set_key, list_provider, delete_key):
        command.add_argument("--project", required=True)
    for command in (set_key, delete_key):
        command.add_argument("--provider", required=True,
                             help="openai, azure, orga, gemini; openai_webhook for the "
                             "webhook secret of incoming calls")
    provider_key.add_parser("reseal", help="re-seal every key under the current master key")

    turn_secret = groups.add_parser("turn-secret", help="the TURN shared secrets").\
        add_subparsers(dest="admin_command", required=True)
    rotate = turn_secret.add_parser("rotate",
                                    help="make a fresh secret the signer (ids are printed)")
    rotate.add_argument("--coturn-restart-planned", action="store_true",
                        help="rotate even though the server keeps no coturn database "
                             "(ICEGATE_COTURN_REDIS/SQLITE): coturn refuses the new credentials "
                             "until you restart it on one; refused without this flag")
    turn_secret.add_parser("list", help="the secrets in force, by id")

    turn = groups.add_parser("turn", help="what TURN credentials opened on coturn").\
        add_subparsers(dest="admin_command", required=True)
    revoke = turn.add_parser("revoke", help="revoke a user's or a session's TURN credentials: "
                             "end its allocations now, refuse new ones (prints JSON)")
    restore = turn.add_parser("restore", help="lift a revocation: new TURN credentials for "
                              "the user or session are issued again (prints JSON)")
    for command in (revoke, restore):
        command.add_argument("--project", required=True)
        whose = command.add_mutually_exclusive_group(required=True)
        whose.add_argument("--user", default="", help="the end user's id")
        whose.add_argument("--session", default="", help="a realtime session's id")


_PROJECT_FIELD_NAMES = ("display_name", "rate_limit_requests", "rate_limit_window",
                        "turn_ttl_default", "turn_ttl_max", "plan", "upgrade_url",
                        "monthly_session_quota", "max_concurrent_sessions", "max_allocations",
                        "byte_quota")


def _to_the_millisecond(message: Message) -> None:
    """Cuts every Timestamp in `message` to the millisecond, so JSON shows `08:04:55.299Z`,
    not `08:04:55.299000064Z` (a clock's nanoseconds no reader needs)."""
    if isinstance(message, timestamp_pb2.Timestamp):
        message.nanos -= message.nanos % 1_000_000
        return
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            values = value.values() if field.message_type.fields_by_name["value"].message_type \
                else ()
        else:
            values = value if field.is_repeated else (value,)
        for item in values:
            _to_the_millisecond(item)


def _as_dict(message: Message) -> dict[str, Any]:
    message = copy.deepcopy(message)
    _to_the_millisecond(message)
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def _run_admin(args: argparse.Namespace, client: Client) -> Any:
    command = (args.admin_group, args.admin_command)
    fields: dict[str, Any] = {name: getattr(args, name, None) for name in _PROJECT_FIELD_NAMES}
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
    if command == ("project", "policy"):
        return _run_policy(args, client)
    if command == ("key", "create"):
        return _as_dict(client.create_api_key(args.project or "", admin=args.admin,
                                              display_name=args.name))
    if command == ("key", "list"):
        return [_as_dict(k) for k in client.list_all_api_keys(args.project or "")]
    if command == ("key", "revoke"):
        return _as_dict(client.revoke_api_key(args.key_id))
    if command == ("provider-key", "set"):
        secret = sys.stdin.readline().strip()
        if not secret:
            raise ConfigurationError("no key on standard input")
        return _as_dict(client.set_provider_key(args.project, args.provider, secret))
    if command == ("provider-key", "list"):
        return [_as_dict(k) for k in client.list_provider_keys(args.project)]
    if command == ("provider-key", "delete"):
        client.delete_provider_key(args.project, args.provider)
        return {"deleted": f"{args.project}/{args.provider}"}
    if command == ("provider-key", "reseal"):
        return _as_dict(client.reseal_provider_keys())
    if command == ("turn-secret", "rotate"):
        return [_as_dict(s) for s in client.rotate_turn_secret(
            coturn_restart_planned=args.coturn_restart_planned)]
    if command == ("turn", "revoke"):
        return _as_dict(client.revoke_turn_credentials(args.project, user_id=args.user,
                                                       session_id=args.session))
    if command == ("turn", "restore"):
        return {"was_revoked": client.restore_turn_credentials(
            args.project, user_id=args.user, session_id=args.session)}
    if command == ("turn-secret", "list"):
        return [_as_dict(s) for s in client.list_turn_secrets()]
    raise AssertionError(command)


def _run_policy(args: argparse.Namespace, client: Client) -> Any:
    if args.policy_command == "set":
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text("utf-8")
        try:
            policy = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{args.file} is not JSON: {error}") from None
        if not isinstance(policy, dict):
            raise ValueError(f"{args.file} must hold a JSON object")
        return _as_dict(client.set_session_policy(args.project, args.provider, policy))
    if args.policy_command == "get":
        return _as_dict(client.get_session_policy(args.project, args.provider))
    client.delete_session_policy(args.project, args.provider)
    return {"deleted": f"{args.project}/{args.provider}"}


def _run(args: argparse.Namespace, client: Client) -> Any:
    if args.command == "turn-credentials":
        credential = client.issue_turn_credentials(args.user, ttl=args.ttl,
                                                   project_id=args.project)
        return {
            "username": credential.username,
            "password": credential.password,
            "ttl": credential.ttl.seconds,
            "expires_at": iso_timestamp(credential.expire_time),
            "uris": list(credential.uris),
        }
    if args.command == "ice-servers":
        response = client.get_ice_servers(args.user, ttl=args.ttl, project_id=args.project)
        return rtc_ice_servers(response.ice_servers)
    if args.command == "health":
        return client.health(args.service)
    if args.command == "usage":
        return _as_dict(client.get_usage(args.project, turn_user_id=args.turn_user))
    if args.command == "admin":
        return _run_admin(args, client)
    if args.command == "session":
        return _run_session(args, client)
    raise AssertionError(args.command)


def _field(answer: Any, path: str) -> Any:
    """The value at a dotted path (`api_key.key_id`; a number indexes a list).

    Raises:
        LookupError: The answer has no such field.
    """
    for name in path.split("."):
        if isinstance(answer, dict):
            answer = answer[name]
        elif isinstance(answer, list) and name.isdigit():
            answer = answer[int(name)]
        else:
            raise LookupError(name)
    return answer


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        tls = TlsConfig.from_env(args.ca_file, args.cert, args.key)
        server_name = args.server_name or os.environ.get("ICEGATE_TLS_SERVER_NAME")
        if server_name:
            tls = dataclasses.replace(tls or TlsConfig(), server_name=server_name)
        with Client(args.target, default_timeout=args.timeout, debug=args.debug,
                    tls=tls) as client:
            result = _run(args, client)
    except (IcegateError, ConfigurationError, ValueError, OSError) as error:
        print(f"icegate: {error}", file=sys.stderr)
        return 1
    if args.field:
        try:
            result = _field(result, args.field)
        except LookupError:
            print(f"icegate: no field {args.field[:128]!r} in the answer", file=sys.stderr)
            return 1
    if isinstance(result, str):
        print(result)
    else:
        json.dump(result, sys.stdout, indent=2, ensure_ascii=False)  # "…1234", not "\u2026"
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
