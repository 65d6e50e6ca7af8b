"""Request messages built from keyword arguments: one function per RPC, shared by both clients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, TypedDict, TypeVar

from google.protobuf import duration_pb2, field_mask_pb2, json_format
from google.protobuf.message import Message

from icegate.v1 import admin_pb2, credentials_pb2, sessions_pb2

Ttl = int | float | timedelta | None
"""A lifetime: seconds, a timedelta, or None for the server's default."""


def duration(value: int | float | timedelta) -> duration_pb2.Duration:
    """A protobuf Duration from seconds or a timedelta."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    whole = int(seconds // 1)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def issue_turn_credentials(user_id: str, ttl: Ttl, project_id: str
                           ) -> credentials_pb2.IssueTurnCredentialsRequest:
    request = credentials_pb2.IssueTurnCredentialsRequest(user_id=user_id, project_id=project_id)
    if ttl is not None:
        request.ttl.CopyFrom(duration(ttl))
    return request


def get_ice_servers(user_id: str, ttl: Ttl, project_id: str
                    ) -> credentials_pb2.GetIceServersRequest:
    request = credentials_pb2.GetIceServersRequest(user_id=user_id, project_id=project_id)
    if ttl is not None:
        request.ttl.CopyFrom(duration(ttl))
    return request


_DURATION_FIELDS = frozenset({"rate_limit_window", "turn_ttl_default", "turn_ttl_max"})
PROJECT_FIELDS = frozenset({
    "display_name", "rate_limit_requests", "rate_limit_window", "turn_ttl_default",
    "turn_ttl_max", "plan", "upgrade_url", "monthly_session_quota", "max_concurrent_sessions",
    "max_allocations", "byte_quota",
})
"""The Project fields a caller sets at creation or changes with `update_project`."""


def project(project_id: str, fields: dict[str, object]) -> tuple[admin_pb2.Project, list[str]]:
    """A Project message with `fields` set (None values skipped), and the names that were set.

    Raises:
        TypeError: A field that is not a settable Project field.
    """
    unknown = set(fields) - PROJECT_FIELDS
    if unknown:
        raise TypeError(f"unknown project field {sorted(unknown)[0]!r}")
    message = admin_pb2.Project(project_id=project_id)
    names = []
    for name, value in fields.items():
        if value is None:
            continue
        if name in _DURATION_FIELDS:
            assert isinstance(value, (int, float, timedelta))
            getattr(message, name).CopyFrom(duration(value))
        else:
            setattr(message, name, value)
        names.append(name)
    return message, names


def update_project(project_id: str, fields: dict[str, object]) -> admin_pb2.UpdateProjectRequest:
    message, names = project(project_id, fields)
    if not names:
        raise TypeError("update_project needs at least one field to change")
    return admin_pb2.UpdateProjectRequest(project=message,
                                          update_mask=field_mask_pb2.FieldMask(paths=names))


def list_api_keys(project_id: str, page_size: int,
                  page_token: str) -> admin_pb2.ListApiKeysRequest:
    """One page of a project's keys (admin keys for an empty id); the server checks the
    values (INVALID_ARGUMENT for a negative size or a token it did not issue)."""
    return admin_pb2.ListApiKeysRequest(project_id=project_id, page_size=page_size,
                                        page_token=page_token)


ProviderName = str | int
"""A provider by name ("openai", "openai_beta", "azure", "azure_legacy", "orga", "gemini")
or by its `icegate.v1.Provider` enum value."""


def provider(value: ProviderName) -> sessions_pb2.Provider.ValueType:
    """The `icegate.v1.Provider` enum value of a provider name.

    Raises:
        ValueError: An unknown provider name.
    """
    if isinstance(value, int):
        return sessions_pb2.Provider.ValueType(value)
    try:
        return sessions_pb2.Provider.Value("PROVIDER_" + value.upper())
    except ValueError:
        names = [n.removeprefix("PROVIDER_").lower() for n in sessions_pb2.Provider.keys()[1:]]
        raise ValueError(f"unknown provider {value!r}; one of {', '.join(names)}") from None


MessageLike = Message | Mapping[str, Any]
"""A nested option: its message, or its JSON form as a dict."""


class SessionOptionArgs(TypedDict, total=False):
    """The keyword options of `create_session` and `mint_ephemeral_token`: SessionOptions'
    fields (protos/icegate/v1/sessions.proto says what each means and which provider takes
    it). Nested ones take their message or its JSON as a dict."""

    model: str
    voice: str
    instructions: str
    temperature: float | None
    speed: float | None
    token_ttl: Ttl
    modalities: Sequence[str]
    email: str
    instruction_variables: Mapping[str, str] | None
    type: str
    input_audio_format: str
    output_audio_format: str
    turn_detection: MessageLike | None
    input_transcription: MessageLike | None
    noise_reduction: str
    tools: Sequence[Mapping[str, Any]]
    tool_choice: str
    max_output_tokens: int | None
    tracing: MessageLike | bool | None
    prompt: MessageLike | None


NestedMessage = TypeVar("NestedMessage", bound=Message)


def _nested(value: MessageLike, message: NestedMessage) -> NestedMessage:
    """`message` filled from `value` (a message of its type, or its JSON as a dict)."""
    message.SetInParent()  # present even when `value` sets nothing
    if isinstance(value, Message):
        message.CopyFrom(value)  # type: ignore[arg-type]  # (TypeError if another type)
        return message
    try:
        return json_format.ParseDict(dict(value), message)
    except json_format.ParseError as error:
        raise ValueError(f"not a {type(message).__name__}: {error}") from None


def session_options(*, model: str = "", voice: str = "", instructions: str = "",
                    temperature: float | None = None, speed: float | None = None,
                    token_ttl: Ttl = None, modalities: Sequence[str] = (),
                    email: str = "", instruction_variables: Mapping[str, str] | None = None,
                    type: str = "", input_audio_format: str = "",
                    output_audio_format: str = "", turn_detection: MessageLike | None = None,
                    input_transcription: MessageLike | None = None, noise_reduction: str = "",
                    tools: Sequence[Mapping[str, Any]] = (), tool_choice: str = "",
                    max_output_tokens: int | None = None,
                    tracing: MessageLike | bool | None = None,
                    prompt: MessageLike | None = None) -> sessions_pb2.SessionOptions:
    """The SessionOptions message of keyword options (None and empty mean the default).

    `type` is "realtime" or "transcription"; `tracing=True` asks for the provider's default
    tracing.

    Raises:
        ValueError: An unknown `type`, or a nested option that is not its message's JSON.
    """
    message = sessions_pb2.SessionOptions(
        model=model, voice=voice, instructions=instructions, modalities=list(modalities),
        email=email, instruction_variables=dict(instruction_variables or {}),
        input_audio_format=input_audio_format, output_audio_format=output_audio_format,
        noise_reduction=noise_reduction, tool_choice=tool_choice)
    if type:
        try:
            message.type = sessions_pb2.SessionType.Value("SESSION_TYPE_" + type.upper())
        except ValueError:
            raise ValueError(f"unknown session type {type!r}; realtime or transcription") \
                from None
    if temperature is not None:
        message.temperature = temperature
    if speed is not None:
        message.speed = speed
    if token_ttl is not None:
        message.token_ttl.CopyFrom(duration(token_ttl))
    if max_output_tokens is not None:
        message.max_output_tokens = max_output_tokens
    for tool in tools:
        message.tools.add().update(dict(tool))
    for name, value in (("turn_detection", turn_detection),
                        ("input_transcription", input_transcription), ("prompt", prompt)):
        if value is not None:
            _nested(value, getattr(message, name))
    if tracing is True:
        message.tracing.SetInParent()
    elif tracing not in (None, False):
        assert not isinstance(tracing, bool)
        message.tracing.CopyFrom(_nested(tracing, sessions_pb2.Tracing()))
    return message


SessionPolicyLike = admin_pb2.SessionPolicy | Mapping[str, Any]
"""A session policy: the message, or its JSON form as a dict (what `policy.json` holds)."""


def session_policy(policy: SessionPolicyLike) -> admin_pb2.SessionPolicy:
    """The SessionPolicy message of a message or of its JSON form.

    Raises:
        ValueError: A dict that is not a SessionPolicy's JSON (unknown field, wrong type).
    """
    if isinstance(policy, admin_pb2.SessionPolicy):
        return policy
    try:
        return json_format.ParseDict(dict(policy), admin_pb2.SessionPolicy())
    except json_format.ParseError as error:
        raise ValueError(f"not a session policy: {error}") from None


def revoke_turn_credentials(project_id: str, user_id: str, session_id: str
                            ) -> admin_pb2.RevokeTurnCredentialsRequest:
    """The request naming one subject (the server refuses none with INVALID_ARGUMENT; the
    message's oneof would keep only the last one set, so both are refused here)."""
    return admin_pb2.RevokeTurnCredentialsRequest(
        project_id=project_id, **_turn_subject(user_id, session_id))


def restore_turn_credentials(project_id: str, user_id: str, session_id: str
                             ) -> admin_pb2.RestoreTurnCredentialsRequest:
    """As `revoke_turn_credentials`, to lift the revocation."""
    return admin_pb2.RestoreTurnCredentialsRequest(
        project_id=project_id, **_turn_subject(user_id, session_id))


def _turn_subject(user_id: str, session_id: str) -> dict[str, str]:
    if bool(user_id) == bool(session_id):
        raise ValueError("name exactly one of user_id and session_id")
    return {"user_id": user_id} if user_id else {"session_id": session_id}
