"""icegate.v1.SessionService: realtime sessions and provider tokens."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import grpc.aio
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from icegate.v1 import credentials_pb2, sessions_pb2, sessions_pb2_grpc
from icegate_server.access.guard import current_call
from icegate_server.errors import InvalidFieldError
from icegate_server.projects.records import Project
from icegate_server.servicers.credential_service import requested_ttl
from icegate_server.sessions.providers import (
    InputTranscription,
    MintedToken,
    PromptReference,
    ProviderKind,
    SessionOptions,
    Tracing,
    TurnDetection,
)
from icegate_server.sessions.realtime import RealtimeSessions
from icegate_server.turn.ice_servers import IceServer

Context = grpc.aio.ServicerContext[Any, Any]

PROVIDER_KINDS: dict[int, ProviderKind] = {
    sessions_pb2.PROVIDER_OPENAI: ProviderKind.OPENAI,
    sessions_pb2.PROVIDER_OPENAI_BETA: ProviderKind.OPENAI_BETA,
    sessions_pb2.PROVIDER_AZURE: ProviderKind.AZURE,
    sessions_pb2.PROVIDER_AZURE_LEGACY: ProviderKind.AZURE_LEGACY,
    sessions_pb2.PROVIDER_ORGA: ProviderKind.ORGA,
    sessions_pb2.PROVIDER_GEMINI: ProviderKind.GEMINI,
}


def provider_kind(value: int) -> ProviderKind:
    kind = PROVIDER_KINDS.get(value)
    if kind is None:
        raise InvalidFieldError("provider", "must name a provider (e.g. PROVIDER_OPENAI)")
    return kind


def _finite(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise InvalidFieldError(field, "must be a finite number")
    return value


SESSION_TYPES = {sessions_pb2.SESSION_TYPE_UNSPECIFIED: "",
                 sessions_pb2.SESSION_TYPE_REALTIME: "realtime",
                 sessions_pb2.SESSION_TYPE_TRANSCRIPTION: "transcription"}


def _integral(value: Any) -> Any:
    """JSON with whole numbers as ints (a Struct holds every number as a double, and a tool's
    JSON Schema says `"maxLength": 5`, not 5.0)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: _integral(inner) for key, inner in value.items()}
    if isinstance(value, list):
        return [_integral(inner) for inner in value]
    return value


def json_of_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as the JSON object it stands for."""
    return _integral(json_format.MessageToDict(struct))  # type: ignore[no-any-return]


def _turn_detection(message: sessions_pb2.TurnDetection) -> TurnDetection:
    def optional(name: str) -> Any:
        value = getattr(message, name) if message.HasField(name) else None  # type: ignore[arg-type]
        return _finite(value, f"turn_detection.{name}") if isinstance(value, float) else value

    return TurnDetection(
        type=message.type, threshold=optional("threshold"),
        prefix_padding_ms=optional("prefix_padding_ms"),
        silence_duration_ms=optional("silence_duration_ms"), eagerness=message.eagerness,
        create_response=optional("create_response"),
        interrupt_response=optional("interrupt_response"))


def session_options(message: sessions_pb2.SessionOptions) -> SessionOptions:
    """The domain options of a request (the provider adapter validates the values)."""
    token_ttl = requested_ttl(message, field="token_ttl")
    if token_ttl is not None and token_ttl != int(token_ttl):
        raise InvalidFieldError("token_ttl", "must be a whole number of seconds")
    if message.type not in SESSION_TYPES:
        raise InvalidFieldError("type", "must be SESSION_TYPE_REALTIME or "
                                "SESSION_TYPE_TRANSCRIPTION")
    transcription, tracing, prompt = (message.input_transcription, message.tracing,
                                      message.prompt)
    return SessionOptions(
        model=message.model,
        voice=message.voice,
        instructions=message.instructions,
        temperature=_finite(message.temperature, "temperature")
        if message.HasField("temperature") else None,
        speed=_finite(message.speed, "speed") if message.HasField("speed") else None,
        token_ttl_seconds=int(token_ttl) if token_ttl is not None else None,
        modalities=tuple(message.modalities),
        email=message.email,
        instruction_variables=tuple(sorted(message.instruction_variables.items())),
        session_type=SESSION_TYPES[message.type],
        input_audio_format=message.input_audio_format,
        output_audio_format=message.output_audio_format,
        turn_detection=_turn_detection(message.turn_detection)
        if message.HasField("turn_detection") else None,
        input_transcription=InputTranscription(transcription.model, transcription.language,
                                                transcription.prompt)
        if message.HasField("input_transcription") else None,
        noise_reduction=message.noise_reduction,
        tools=tuple(json_of_struct(tool) for tool in message.tools),
        tool_choice=message.tool_choice,
        max_output_tokens=message.max_output_tokens
        if message.HasField("max_output_tokens") else None,
        tracing=Tracing(tracing.workflow_name, tracing.group_id,
                        tuple(sorted(tracing.metadata.items())))
        if message.HasField("tracing") else None,
        prompt=PromptReference(prompt.id, prompt.version,
                               tuple(sorted(prompt.variables.items())))
        if message.HasField("prompt") else None,
    )


def _timestamp(unix_seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(int(unix_seconds * 1000))
    return stamp


def ice_servers_to_proto(servers: Iterable[IceServer]) -> list[credentials_pb2.IceServer]:
    return [credentials_pb2.IceServer(urls=s.urls, username=s.username, credential=s.credential)
            for s in servers]


def _token(token: MintedToken) -> sessions_pb2.EphemeralToken:
    return sessions_pb2.EphemeralToken(value=token.value,
                                       expire_time=_timestamp(token.expires_at))


def _project() -> Project:
    project = current_call().project
    assert project is not None  # session calls are admitted for a project
    return project


def _time_left(context: Context) -> float | None:
    remaining: float | None = context.time_remaining()
    return remaining


class SessionServicer(sessions_pb2_grpc.SessionServiceServicer):
    """Realtime sessions for the project the call guard admitted."""

    def __init__(self, sessions: RealtimeSessions) -> None:
        self._sessions = sessions

    async def CreateSession(self, request: sessions_pb2.CreateSessionRequest,
                            context: Context) -> sessions_pb2.CreateSessionResponse:
        kind = provider_kind(request.provider)
        created = await self._sessions.create(
            _project(), kind, session_options(request.options), user_id=request.user_id,
            turn_ttl=requested_ttl(request, field="turn_ttl"), timeout=_time_left(context))
        token = created.token
        return sessions_pb2.CreateSessionResponse(
            session_id=created.session_id,
            ephemeral_token=_token(token),
            upstream_session_id=token.upstream_session_id,
            model=token.model,
            voice=token.voice,
            create_time=_timestamp(created.create_time),
            lease_expire_time=_timestamp(created.lease_expires_at),
            ice_servers=ice_servers_to_proto(created.ice_servers),
            provider_ice_servers=ice_servers_to_proto(token.ice_servers),
            provider=request.provider,
            upstream_request_id=token.upstream_request_id,
        )

    async def CreateCall(self, request: sessions_pb2.CreateCallRequest,
                         context: Context) -> sessions_pb2.CreateCallResponse:
        kind = provider_kind(request.provider)
        created = await self._sessions.create_call(
            _project(), kind, session_options(request.options), request.sdp_offer,
            user_id=request.user_id, turn_ttl=requested_ttl(request, field="turn_ttl"),
            timeout=_time_left(context))
        call = created.call
        return sessions_pb2.CreateCallResponse(
            session_id=created.session_id, sdp_answer=call.sdp_answer, call_id=call.call_id,
            ice_servers=ice_servers_to_proto(created.ice_servers),
            create_time=_timestamp(created.create_time),
            lease_expire_time=_timestamp(created.lease_expires_at), model=call.model,
            provider=request.provider, upstream_request_id=call.upstream_request_id)

    async def MintEphemeralToken(
        self, request: sessions_pb2.MintEphemeralTokenRequest, context: Context
    ) -> sessions_pb2.MintEphemeralTokenResponse:
        kind = provider_kind(request.provider)
        token = await self._sessions.mint(_project(), kind, session_options(request.options),
                                          timeout=_time_left(context))
        return sessions_pb2.MintEphemeralTokenResponse(
            ephemeral_token=_token(token), upstream_session_id=token.upstream_session_id,
            model=token.model, voice=token.voice,
            provider_ice_servers=ice_servers_to_proto(token.ice_servers),
            upstream_request_id=token.upstream_request_id)

    async def KeepAliveSession(
        self, request: sessions_pb2.KeepAliveSessionRequest, context: Context
    ) -> sessions_pb2.KeepAliveSessionResponse:
        expires_at = await self._sessions.keep_alive(_project(), request.session_id)
        return sessions_pb2.KeepAliveSessionResponse(lease_expire_time=_timestamp(expires_at))

    async def EndSession(self, request: sessions_pb2.EndSessionRequest,
                         context: Context) -> sessions_pb2.EndSessionResponse:
        await self._sessions.end(_project(), request.session_id)
        return sessions_pb2.EndSessionResponse()
