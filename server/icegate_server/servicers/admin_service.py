"""icegate.v1.AdminService: projects and caller keys."""

from __future__ import annotations

from typing import Any

import grpc.aio
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from icegate.v1 import admin_pb2, admin_pb2_grpc
from icegate_server.errors import InvalidFieldError
from icegate_server.projects.admin import ProjectAdmin
from icegate_server.projects.records import ApiKey, Project
from icegate_server.servicers.session_service import json_of_struct
from icegate_server.sessions.policy import SessionPolicies, SessionPolicy, StoredPolicy
from icegate_server.sessions.provider_keys import ProviderKeys
from icegate_server.store.base import ProviderKeyRecord
from icegate_server.turn.revocation import TurnRevocation
from icegate_server.turn.rotation import RingEntry, TurnSecretRotation

Context = grpc.aio.ServicerContext[Any, Any]

_DURATION_FIELDS = {
    "rate_limit_window": "rate_limit_window_seconds",
    "turn_ttl_default": "turn_ttl_default_seconds",
    "turn_ttl_max": "turn_ttl_max_seconds",
}
_PLAIN_FIELDS = ("display_name", "plan", "upgrade_url", "rate_limit_requests",
                 "monthly_session_quota", "max_concurrent_sessions", "max_allocations",
                 "byte_quota")
_OPTIONAL_INT_FIELDS = {"rate_limit_requests", "monthly_session_quota", "max_concurrent_sessions"}
SETTABLE_FIELDS = frozenset(_PLAIN_FIELDS) | frozenset(_DURATION_FIELDS)


def _timestamp(unix_seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(unix_seconds * 1e9))
    return stamp


def _whole_seconds(value: duration_pb2.Duration, field: str) -> int:
    if value.nanos:
        raise InvalidFieldError(field, "must be a whole number of seconds")
    return int(value.seconds)


def project_to_proto(project: Project) -> admin_pb2.Project:
    return admin_pb2.Project(
        project_id=project.project_id,
        display_name=project.display_name,
        rate_limit_requests=project.rate_limit_requests,
        rate_limit_window=duration_pb2.Duration(seconds=project.rate_limit_window_seconds),
        turn_ttl_default=duration_pb2.Duration(seconds=project.turn_ttl_default_seconds),
        turn_ttl_max=duration_pb2.Duration(seconds=project.turn_ttl_max_seconds),
        plan=project.plan,
        upgrade_url=project.upgrade_url,
        monthly_session_quota=project.monthly_session_quota,
        max_concurrent_sessions=project.max_concurrent_sessions,
        max_allocations=project.max_allocations,
        byte_quota=project.byte_quota,
        create_time=_timestamp(project.create_time),
        update_time=_timestamp(project.update_time),
    )


def project_fields(message: admin_pb2.Project, names: set[str] | None) -> dict[str, Any]:
    """The domain fields a request sets: those named (update) or those present (create)."""
    fields: dict[str, Any] = {}
    for name in names if names is not None else SETTABLE_FIELDS:
        if name in _DURATION_FIELDS:
            if message.HasField(name):  # type: ignore[arg-type]
                fields[_DURATION_FIELDS[name]] = _whole_seconds(getattr(message, name), name)
            elif names is not None:
                raise InvalidFieldError(name, "is named in update_mask but not set")
        elif name in _OPTIONAL_INT_FIELDS:
            if message.HasField(name) or names is not None:  # type: ignore[arg-type]
                fields[name] = getattr(message, name)
        elif name in _PLAIN_FIELDS:
            if getattr(message, name) or names is not None:
                fields[name] = getattr(message, name)
        else:
            # Echo only a name that could be a field: a huge one would swell the trailers
            # past the caller's metadata limit and hide this answer behind its own error.
            shown = repr(name) if len(name) <= 64 else "a field of that name"
            raise InvalidFieldError("update_mask", f"cannot update {shown}")
    return fields


def api_key_to_proto(key: ApiKey) -> admin_pb2.ApiKey:
    message = admin_pb2.ApiKey(key_id=key.key_id, project_id=key.project_id, admin=key.admin,
                               display_name=key.display_name,
                               create_time=_timestamp(key.create_time))
    if key.revoked:
        message.revoke_time.CopyFrom(_timestamp(key.revoke_time))
    return message


def provider_key_to_proto(record: ProviderKeyRecord) -> admin_pb2.ProviderKeyInfo:
    return admin_pb2.ProviderKeyInfo(project_id=record.project_id, provider=record.provider,
                                     last4=record.last4,
                                     update_time=_timestamp(record.update_time_ms / 1000))


def turn_secrets_to_proto(entries: tuple[RingEntry, ...]) -> list[admin_pb2.TurnSecretInfo]:
    infos = []
    for index, entry in enumerate(entries):
        info = admin_pb2.TurnSecretInfo(secret_id=entry.secret_id, source=entry.source,
                                        signing=index == 0)
        if entry.created_ms:
            info.create_time.CopyFrom(_timestamp(entry.created_ms / 1000))
        if entry.retire_at_ms:
            info.retire_time.CopyFrom(_timestamp(entry.retire_at_ms / 1000))
        infos.append(info)
    return infos


def _optional_seconds(message: admin_pb2.SessionPolicy, name: str) -> int | None:
    if not message.HasField(name):  # type: ignore[arg-type]
        return None
    return _whole_seconds(getattr(message, name), f"policy.{name}")


def policy_from_proto(message: admin_pb2.SessionPolicy) -> SessionPolicy:
    """The domain policy of a request (`sessions.policy.validate_policy` checks the values)."""
    return SessionPolicy(
        allowed_models=tuple(message.allowed_models),
        default_model=message.default_model,
        allowed_voices=tuple(message.allowed_voices),
        instructions=message.instructions,
        instructions_template=message.instructions_template,
        tools=tuple(json_of_struct(tool) for tool in message.tools),
        max_token_ttl_seconds=_optional_seconds(message, "max_token_ttl"),
        max_session_duration_seconds=_optional_seconds(message, "max_session_duration"),
        caller_options=tuple(message.caller_options),
        enforcement=_ENFORCEMENTS.get(message.enforcement, "?"),
    )


_ENFORCEMENTS = {
    admin_pb2.SESSION_POLICY_ENFORCEMENT_UNSPECIFIED: "",
    admin_pb2.SESSION_POLICY_ENFORCEMENT_RESTORE: "restore",
    admin_pb2.SESSION_POLICY_ENFORCEMENT_HANG_UP: "hang_up",
}
_ENFORCEMENT_VALUES = {name: value for value, name in _ENFORCEMENTS.items()}


def policy_to_proto(policy: SessionPolicy) -> admin_pb2.SessionPolicy:
    tools = []
    for tool in policy.tools:
        struct = struct_pb2.Struct()
        struct.update(tool)
        tools.append(struct)
    message = admin_pb2.SessionPolicy(
        allowed_models=policy.allowed_models, default_model=policy.default_model,
        allowed_voices=policy.allowed_voices, instructions=policy.instructions,
        instructions_template=policy.instructions_template, tools=tools,
        caller_options=policy.caller_options,
        enforcement=_ENFORCEMENT_VALUES.get(
            policy.enforcement, admin_pb2.SESSION_POLICY_ENFORCEMENT_UNSPECIFIED))
    if policy.max_token_ttl_seconds is not None:
        message.max_token_ttl.seconds = policy.max_token_ttl_seconds
    if policy.max_session_duration_seconds is not None:
        message.max_session_duration.seconds = policy.max_session_duration_seconds
    return message


def _stored_policy_fields(stored: StoredPolicy) -> dict[str, Any]:
    return {"policy": policy_to_proto(stored.policy),
            "update_time": _timestamp(stored.update_time_ms / 1000)}


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Projects, caller keys and provider keys, for admin keys only (the call guard checks)."""

    def __init__(self, admin: ProjectAdmin, provider_keys: ProviderKeys,
                 turn_secrets: TurnSecretRotation, policies: SessionPolicies,
                 revocation: TurnRevocation) -> None:
        self._admin = admin
        self._provider_keys = provider_keys
        self._turn_secrets = turn_secrets
        self._policies = policies
        self._revocation = revocation

    async def CreateProject(self, request: admin_pb2.CreateProjectRequest,
                            context: Context) -> admin_pb2.CreateProjectResponse:
        project = await self._admin.create_project(request.project.project_id,
                                                   project_fields(request.project, None))
        return admin_pb2.CreateProjectResponse(project=project_to_proto(project))

    async def GetProject(self, request: admin_pb2.GetProjectRequest,
                         context: Context) -> admin_pb2.GetProjectResponse:
        project = await self._admin.get_project(request.project_id)
        return admin_pb2.GetProjectResponse(project=project_to_proto(project))

    async def ListProjects(self, request: admin_pb2.ListProjectsRequest,
                           context: Context) -> admin_pb2.ListProjectsResponse:
        projects, token = await self._admin.list_projects(request.page_size, request.page_token)
        return admin_pb2.ListProjectsResponse(projects=[project_to_proto(p) for p in projects],
                                              next_page_token=token)

    async def UpdateProject(self, request: admin_pb2.UpdateProjectRequest,
                            context: Context) -> admin_pb2.UpdateProjectResponse:
        changes = project_fields(request.project, set(request.update_mask.paths))
        project = await self._admin.update_project(request.project.project_id, changes)
        return admin_pb2.UpdateProjectResponse(project=project_to_proto(project))

    async def DeleteProject(self, request: admin_pb2.DeleteProjectRequest,
                            context: Context) -> admin_pb2.DeleteProjectResponse:
        await self._admin.delete_project(request.project_id)
        return admin_pb2.DeleteProjectResponse()

    async def CreateApiKey(self, request: admin_pb2.CreateApiKeyRequest,
                           context: Context) -> admin_pb2.CreateApiKeyResponse:
        key, secret = await self._admin.create_api_key(
            request.project_id, admin=request.admin, display_name=request.display_name)
        return admin_pb2.CreateApiKeyResponse(api_key=api_key_to_proto(key), secret=secret)

    async def ListApiKeys(self, request: admin_pb2.ListApiKeysRequest,
                          context: Context) -> admin_pb2.ListApiKeysResponse:
        keys, token = await self._admin.list_api_keys(request.project_id, request.page_size,
                                                      request.page_token)
        return admin_pb2.ListApiKeysResponse(api_keys=[api_key_to_proto(k) for k in keys],
                                             next_page_token=token)

    async def RevokeApiKey(self, request: admin_pb2.RevokeApiKeyRequest,
                           context: Context) -> admin_pb2.RevokeApiKeyResponse:
        key = await self._admin.revoke_api_key(request.key_id)
        return admin_pb2.RevokeApiKeyResponse(api_key=api_key_to_proto(key))

    async def SetProviderKey(self, request: admin_pb2.SetProviderKeyRequest,
                             context: Context) -> admin_pb2.SetProviderKeyResponse:
        await self._admin.get_project(request.project_id)
        record = await self._provider_keys.set(request.project_id, request.provider,
                                               request.api_key)
        return admin_pb2.SetProviderKeyResponse(provider_key=provider_key_to_proto(record))

    async def ListProviderKeys(self, request: admin_pb2.ListProviderKeysRequest,
                               context: Context) -> admin_pb2.ListProviderKeysResponse:
        await self._admin.get_project(request.project_id)
        records = await self._provider_keys.list(request.project_id)
        return admin_pb2.ListProviderKeysResponse(
            provider_keys=[provider_key_to_proto(r) for r in records])

    async def DeleteProviderKey(self, request: admin_pb2.DeleteProviderKeyRequest,
                                context: Context) -> admin_pb2.DeleteProviderKeyResponse:
        await self._admin.get_project(request.project_id)
        await self._provider_keys.delete(request.project_id, request.provider)
        return admin_pb2.DeleteProviderKeyResponse()

    async def ResealProviderKeys(
        self, request: admin_pb2.ResealProviderKeysRequest, context: Context
    ) -> admin_pb2.ResealProviderKeysResponse:
        report = await self._provider_keys.reseal_all()
        return admin_pb2.ResealProviderKeysResponse(
            resealed=report.resealed, unchanged=report.unchanged, failed=report.failed)

    async def RotateTurnSecret(self, request: admin_pb2.RotateTurnSecretRequest,
                               context: Context) -> admin_pb2.RotateTurnSecretResponse:
        await self._turn_secrets.rotate(coturn_restart_planned=request.coturn_restart_planned)
        return admin_pb2.RotateTurnSecretResponse(
            turn_secrets=turn_secrets_to_proto(self._turn_secrets.entries))

    async def ListTurnSecrets(self, request: admin_pb2.ListTurnSecretsRequest,
                              context: Context) -> admin_pb2.ListTurnSecretsResponse:
        await self._turn_secrets.refresh()
        return admin_pb2.ListTurnSecretsResponse(
            turn_secrets=turn_secrets_to_proto(self._turn_secrets.entries))

    async def SetSessionPolicy(self, request: admin_pb2.SetSessionPolicyRequest,
                               context: Context) -> admin_pb2.SetSessionPolicyResponse:
        stored = await self._policies.set(request.project_id, request.provider,
                                          policy_from_proto(request.policy))
        return admin_pb2.SetSessionPolicyResponse(**_stored_policy_fields(stored))

    async def GetSessionPolicy(self, request: admin_pb2.GetSessionPolicyRequest,
                               context: Context) -> admin_pb2.GetSessionPolicyResponse:
        stored = await self._policies.get(request.project_id, request.provider)
        return admin_pb2.GetSessionPolicyResponse(**_stored_policy_fields(stored))

    async def DeleteSessionPolicy(self, request: admin_pb2.DeleteSessionPolicyRequest,
                                  context: Context) -> admin_pb2.DeleteSessionPolicyResponse:
        await self._policies.delete(request.project_id, request.provider)
        return admin_pb2.DeleteSessionPolicyResponse()

    async def RevokeTurnCredentials(
        self, request: admin_pb2.RevokeTurnCredentialsRequest, context: Context
    ) -> admin_pb2.RevokeTurnCredentialsResponse:
        revocation = await self._revocation.revoke(
            request.project_id, user_id=request.user_id, session_id=request.session_id)
        response = admin_pb2.RevokeTurnCredentialsResponse(
            allocations_ended=revocation.allocations_ended)
        response.revoked_until.FromMilliseconds(revocation.revoked_until_ms)
        return response

    async def RestoreTurnCredentials(
        self, request: admin_pb2.RestoreTurnCredentialsRequest, context: Context
    ) -> admin_pb2.RestoreTurnCredentialsResponse:
        was_revoked = await self._revocation.restore(
            request.project_id, user_id=request.user_id, session_id=request.session_id)
        return admin_pb2.RestoreTurnCredentialsResponse(was_revoked=was_revoked)
