"""The synchronous icegate client. `icegate.aio.AsyncClient` is its asyncio twin."""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from icegate import call_log, requests
from icegate.connection import (
    DEFAULT_TIMEOUT,
    ConfigurationError,
    Connection,
    Metadata,
    Stubs,
    TlsConfig,
    connect_transport,
    is_http_target,
)
from icegate.errors import IcegateError, from_rpc_error
from icegate.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    credentials_pb2,
    credentials_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

if TYPE_CHECKING:
    from pyqwest import SyncHTTPTransport
    from typing_extensions import Unpack


Response = TypeVar("Response")


class Client:
    """Calls icegate synchronously over one reused channel.

    Args:
        target: `host:port` of icegate's gRPC port, or the `http://` / `https://` URL of its
            HTTP listener to call over Connect (binary protobuf; the same methods, errors,
            deadlines and retries); `ICEGATE_TARGET` or 127.0.0.1:50051 when omitted.
        api_key: The caller key; `ICEGATE_API_KEY` (or the `make run` dev key) when omitted.
        default_timeout: Seconds a call may take when it names no `timeout`.
        debug: Log every call to the console (method, target, status, duration; never a key
            or a credential): on stderr unless logging is configured (`icegate.call_log`).
        tls: Call over TLS: the CA to trust and, for mutual TLS, the client certificate
            (which, when the server maps it to a project, makes `api_key` optional). When
            omitted, `ICEGATE_TLS_CA` / `ICEGATE_TLS_CERT` / `ICEGATE_TLS_KEY`; with none
            of them set, the channel is insecure.
        wait_for_ready: Let calls wait (within their deadline) for the server to become
            reachable instead of failing UNAVAILABLE at once: for callers that start before
            icegate, or ride out its restarts.
        channel: A gRPC channel to call over instead of one the client opens to `target`
            (for custom options or tests); the client closes it on `close()`.

    Every method takes keyword-only `timeout` (seconds) and `metadata`, and raises a subclass
    of `icegate.errors.IcegateError` on failure.
    """

    def __init__(self, target: str | None = None, api_key: str | None = None, *,
                 default_timeout: float = DEFAULT_TIMEOUT, debug: bool = False,
                 tls: TlsConfig | None = None, wait_for_ready: bool = False,
                 channel: grpc.Channel | None = None) -> None:
        self._connection = connection = Connection.resolve(
            target, api_key, default_timeout=default_timeout, debug=debug, tls=tls,
            wait_for_ready=wait_for_ready)
        if debug:
            call_log.enable()
        self._http: SyncHTTPTransport | None = None
        if is_http_target(connection.target):
            if channel is not None:
                raise ConfigurationError("channel= is for gRPC targets, not an http(s) URL")
            self._channel = None
            self._http, stubs = connect_transport().sync_stubs(connection)
        else:
            if channel is None:
                credentials = connection.channel_credentials()
                options = connection.channel_options()
                channel = (grpc.secure_channel(connection.target, credentials, options=options)
                           if credentials is not None
                           else grpc.insecure_channel(connection.target, options=options))
            self._channel = channel
            stubs = Stubs(credentials_pb2_grpc.CredentialServiceStub(channel),
                          health_pb2_grpc.HealthStub(channel),
                          admin_pb2_grpc.AdminServiceStub(channel),
                          usage_pb2_grpc.UsageServiceStub(channel),
                          sessions_pb2_grpc.SessionServiceStub(channel))
        self._credentials, self._health, self._admin, self._usage, self._sessions = stubs

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel (or the HTTP connections); calls in flight are cancelled."""
        if self._channel is not None:
            self._channel.close()
        if self._http is not None:
            self._http.close()

    def _call(self, rpc: Any, request: Any, timeout: float | None, metadata: Metadata,
              *, authenticated: bool = True) -> Any:
        connection = self._connection
        started = time.perf_counter()
        try:
            response = rpc(
                request,
                timeout=connection.timeout(timeout),
                metadata=connection.call_metadata(metadata) if authenticated else tuple(metadata),
                **connection.call_options,
            )
        except (grpc.RpcError, IcegateError) as error:
            # Over Connect the stub raises the typed error itself; gRPC's is converted here.
            typed = error if isinstance(error, IcegateError) else from_rpc_error(error)
            if connection.debug:
                call_log.record(request, connection.target, started, typed)
            raise typed from None
        if connection.debug:
            call_log.record(request, connection.target, started, None)
        return response

    def issue_turn_credentials(
        self, user_id: str, *, ttl: requests.Ttl = None, project_id: str = "",
        timeout: float | None = None, metadata: Metadata = (),
    ) -> credentials_pb2.IssueTurnCredentialsResponse:
        """Issues a TURN credential for `user_id` (lifetime `ttl`, else the server default)."""
        return self._call(self._credentials.IssueTurnCredentials,  # type: ignore[no-any-return]
                          requests.issue_turn_credentials(user_id, ttl, project_id),
                          timeout, metadata)

    def get_ice_servers(
        self, user_id: str, *, ttl: requests.Ttl = None, project_id: str = "",
        timeout: float | None = None, metadata: Metadata = (),
    ) -> credentials_pb2.GetIceServersResponse:
        """The RTCIceServer list for `user_id`; `icegate.rtc_ice_servers` turns it into JSON."""
        return self._call(self._credentials.GetIceServers,  # type: ignore[no-any-return]
                          requests.get_ice_servers(user_id, ttl, project_id),
                          timeout, metadata)

    def get_usage(self, project_id: str = "", *, turn_user_id: str = "",
                  timeout: float | None = None,
                  metadata: Metadata = ()) -> usage_pb2.GetUsageResponse:
        """The project's rate-limit position, session counts, TURN usage and limits (not rate
        limited); with `turn_user_id`, that end user's TURN usage too."""
        return self._call(self._usage.GetUsage,  # type: ignore[no-any-return]
                          usage_pb2.GetUsageRequest(project_id=project_id,
                                                    turn_user_id=turn_user_id),
                          timeout, metadata)

    # -- administration (admin keys only) ----------------------------------------------------

    def create_project(self, project_id: str, *, timeout: float | None = None,
                       metadata: Metadata = (), **fields: Any) -> admin_pb2.Project:
        """Creates a project; `fields` are Project fields (durations as seconds or timedelta)."""
        message, _ = requests.project(project_id, fields)
        return self._call(self._admin.CreateProject,  # type: ignore[no-any-return]
                          admin_pb2.CreateProjectRequest(project=message), timeout,
                          metadata).project

    def get_project(self, project_id: str, *, timeout: float | None = None,
                    metadata: Metadata = ()) -> admin_pb2.Project:
        return self._call(self._admin.GetProject,  # type: ignore[no-any-return]
                          admin_pb2.GetProjectRequest(project_id=project_id), timeout,
                          metadata).project

    def list_projects(self, *, page_size: int = 0, page_token: str = "",
                      timeout: float | None = None,
                      metadata: Metadata = ()) -> admin_pb2.ListProjectsResponse:
        """One page of projects; pass `next_page_token` back for the next one."""
        return self._call(self._admin.ListProjects,  # type: ignore[no-any-return]
                          admin_pb2.ListProjectsRequest(page_size=page_size,
                                                        page_token=page_token),
                          timeout, metadata)

    def list_all_projects(self, *, timeout: float | None = None,
                          metadata: Metadata = ()) -> list[admin_pb2.Project]:
        """Every project, following the pages."""
        projects: list[admin_pb2.Project] = []
        token = ""
        while True:
            page = self.list_projects(page_token=token, timeout=timeout, metadata=metadata)
            projects.extend(page.projects)
            token = page.next_page_token
            if not token:
                return projects

    def update_project(self, project_id: str, *, timeout: float | None = None,
                       metadata: Metadata = (), **fields: Any) -> admin_pb2.Project:
        """Changes the given fields of a project (None values are left alone)."""
        return self._call(self._admin.UpdateProject,  # type: ignore[no-any-return]
                          requests.update_project(project_id, fields), timeout,
                          metadata).project

    def delete_project(self, project_id: str, *, timeout: float | None = None,
                       metadata: Metadata = ()) -> None:
        """Deletes a project, its counters and provider keys; revokes its caller keys."""
        self._call(self._admin.DeleteProject,
                   admin_pb2.DeleteProjectRequest(project_id=project_id), timeout, metadata)

    def create_api_key(self, project_id: str = "", *, admin: bool = False,
                       display_name: str = "", timeout: float | None = None,
                       metadata: Metadata = ()) -> admin_pb2.CreateApiKeyResponse:
        """Creates a caller key; the answer's `secret` is shown this once only."""
        return self._call(self._admin.CreateApiKey,  # type: ignore[no-any-return]
                          admin_pb2.CreateApiKeyRequest(project_id=project_id, admin=admin,
                                                        display_name=display_name),
                          timeout, metadata)

    def list_api_keys(self, project_id: str = "", *, page_size: int = 0, page_token: str = "",
                      timeout: float | None = None,
                      metadata: Metadata = ()) -> admin_pb2.ListApiKeysResponse:
        """One page of a project's keys (or the admin keys when `project_id` is empty),
        revoked included, oldest first; pass `next_page_token` back for the next one."""
        return self._call(self._admin.ListApiKeys,  # type: ignore[no-any-return]
                          requests.list_api_keys(project_id, page_size, page_token),
                          timeout, metadata)

    def list_all_api_keys(self, project_id: str = "", *, timeout: float | None = None,
                          metadata: Metadata = ()) -> list[admin_pb2.ApiKey]:
        """Every key of a project (or every admin key), following the pages."""
        keys: list[admin_pb2.ApiKey] = []
        token = ""
        while True:
            page = self.list_api_keys(project_id, page_token=token, timeout=timeout,
                                      metadata=metadata)
            keys.extend(page.api_keys)
            token = page.next_page_token
            if not token:
                return keys

    def revoke_api_key(self, key_id: str, *, timeout: float | None = None,
                       metadata: Metadata = ()) -> admin_pb2.ApiKey:
        """Revokes a key: refused from its next call on, on every replica."""
        return self._call(self._admin.RevokeApiKey,  # type: ignore[no-any-return]
                          admin_pb2.RevokeApiKeyRequest(key_id=key_id), timeout,
                          metadata).api_key

    # -- realtime sessions -----------------------------------------------------------------

    def create_session(
        self, provider: requests.ProviderName = "openai", *, project_id: str = "",
        user_id: str = "", turn_ttl: requests.Ttl = None, timeout: float | None = None,
        metadata: Metadata = (), **options: Unpack[requests.SessionOptionArgs],
    ) -> sessions_pb2.CreateSessionResponse:
        """Creates a realtime session: a provider token plus ICE servers, under the quota.

        `options` are SessionOptions fields (`requests.SessionOptionArgs`): model, voice,
        instructions, type, turn_detection, tools... Not retried: a retry would create a
        second session.
        """
        request = sessions_pb2.CreateSessionRequest(
            project_id=project_id, provider=requests.provider(provider),
            options=requests.session_options(**options), user_id=user_id)
        if turn_ttl is not None:
            request.turn_ttl.CopyFrom(requests.duration(turn_ttl))
        return self._call(self._sessions.CreateSession,  # type: ignore[no-any-return]
                          request, timeout, metadata)

    def mint_ephemeral_token(
        self, provider: requests.ProviderName = "openai", *, project_id: str = "",
        timeout: float | None = None, metadata: Metadata = (),
        **options: Unpack[requests.SessionOptionArgs],
    ) -> sessions_pb2.MintEphemeralTokenResponse:
        """A provider token alone (rate limited, but no quota unit and no lease)."""
        return self._call(self._sessions.MintEphemeralToken,  # type: ignore[no-any-return]
                          sessions_pb2.MintEphemeralTokenRequest(
                              project_id=project_id, provider=requests.provider(provider),
                              options=requests.session_options(**options)),
                          timeout, metadata)

    def create_call(
        self, sdp_offer: str, provider: requests.ProviderName = "openai", *,
        project_id: str = "", user_id: str = "", turn_ttl: requests.Ttl = None,
        timeout: float | None = None, metadata: Metadata = (),
        **options: Unpack[requests.SessionOptionArgs],
    ) -> sessions_pb2.CreateCallResponse:
        """Starts a provider call for the browser's SDP offer (OpenAI or Azure GA) with the
        project's key, under the quota: the answer SDP, call id, session id and ICE servers.

        The browser never holds a token. Not retried: a retry would start a second call.
        """
        request = sessions_pb2.CreateCallRequest(
            project_id=project_id, provider=requests.provider(provider),
            options=requests.session_options(**options), sdp_offer=sdp_offer, user_id=user_id)
        if turn_ttl is not None:
            request.turn_ttl.CopyFrom(requests.duration(turn_ttl))
        return self._call(self._sessions.CreateCall,  # type: ignore[no-any-return]
                          request, timeout, metadata)

    def keep_alive_session(self, session_id: str, *, project_id: str = "",
                           timeout: float | None = None,
                           metadata: Metadata = ()) -> sessions_pb2.KeepAliveSessionResponse:
        """Renews a session's lease; NotFoundError once it ended or expired."""
        return self._call(self._sessions.KeepAliveSession,  # type: ignore[no-any-return]
                          sessions_pb2.KeepAliveSessionRequest(project_id=project_id,
                                                               session_id=session_id),
                          timeout, metadata)

    def end_session(self, session_id: str, *, project_id: str = "",
                    timeout: float | None = None, metadata: Metadata = ()) -> None:
        """Ends a session, freeing its concurrency slot."""
        self._call(self._sessions.EndSession,
                   sessions_pb2.EndSessionRequest(project_id=project_id, session_id=session_id),
                   timeout, metadata)

    # -- session policies (admin keys only) ------------------------------------------------

    def set_session_policy(self, project_id: str, provider: str,
                           policy: requests.SessionPolicyLike, *,
                           timeout: float | None = None,
                           metadata: Metadata = ()) -> admin_pb2.SetSessionPolicyResponse:
        """Sets the project's session policy for a provider family (openai, azure, orga,
        gemini), replacing the previous one; `policy` is the message or its JSON as a dict."""
        return (self._call(self._admin.SetSessionPolicy,  # type: ignore[no-any-return]
                          admin_pb2.SetSessionPolicyRequest(
                              project_id=project_id, provider=provider,
                              policy=requests.session_policy(policy)),
                          timeout, metadata))

    def get_session_policy(self, project_id: str, provider: str, *,
                           timeout: float | None = None,
                           metadata: Metadata = ()) -> admin_pb2.GetSessionPolicyResponse:
        """The project's session policy for a provider family; NotFoundError when none."""
        return (self._call(self._admin.GetSessionPolicy,  # type: ignore[no-any-return]
                          admin_pb2.GetSessionPolicyRequest(project_id=project_id,
                                                            provider=provider),
                          timeout, metadata))

    def delete_session_policy(self, project_id: str, provider: str, *,
                              timeout: float | None = None, metadata: Metadata = ()) -> None:
        """Deletes the project's session policy for a provider family."""
        self._call(self._admin.DeleteSessionPolicy,
                   admin_pb2.DeleteSessionPolicyRequest(project_id=project_id,
                                                        provider=provider),
                   timeout, metadata)

    # -- provider keys (admin keys only) ----------------------------------------------------

    def set_provider_key(self, project_id: str, provider: str, api_key: str, *,
                         timeout: float | None = None,
                         metadata: Metadata = ()) -> admin_pb2.ProviderKeyInfo:
        """Seals and stores a project's provider key; only its last 4 characters come back."""
        return self._call(self._admin.SetProviderKey,  # type: ignore[no-any-return]
                          admin_pb2.SetProviderKeyRequest(project_id=project_id,
                                                          provider=provider, api_key=api_key),
                          timeout, metadata).provider_key

    def list_provider_keys(self, project_id: str, *, timeout: float | None = None,
                           metadata: Metadata = ()) -> list[admin_pb2.ProviderKeyInfo]:
        return list(self._call(self._admin.ListProviderKeys,
                               admin_pb2.ListProviderKeysRequest(project_id=project_id),
                               timeout, metadata).provider_keys)

    def delete_provider_key(self, project_id: str, provider: str, *,
                            timeout: float | None = None, metadata: Metadata = ()) -> None:
        self._call(self._admin.DeleteProviderKey,
                   admin_pb2.DeleteProviderKeyRequest(project_id=project_id, provider=provider),
                   timeout, metadata)

    def reseal_provider_keys(self, *, timeout: float | None = None, metadata: Metadata = ()
                             ) -> admin_pb2.ResealProviderKeysResponse:
        """Re-seals every provider key under the current master key (after a rotation)."""
        return self._call(self._admin.ResealProviderKeys,  # type: ignore[no-any-return]
                          admin_pb2.ResealProviderKeysRequest(), timeout, metadata)

    def rotate_turn_secret(self, *, coturn_restart_planned: bool = False,
                           timeout: float | None = None,
                           metadata: Metadata = ()) -> list[admin_pb2.TurnSecretInfo]:
        """Makes a fresh TURN secret the signer; returns the secrets in force (ids only).

        Args:
            coturn_restart_planned: Rotate even though the server keeps no coturn database,
                so coturn refuses the new credentials until it is restarted on one (see the
                field in admin.proto). Without it such a server raises
                FailedPreconditionError (reason COTURN_OUT_OF_STEP).
        """
        request = admin_pb2.RotateTurnSecretRequest(
            coturn_restart_planned=coturn_restart_planned)
        response = self._call(self._admin.RotateTurnSecret, request, timeout, metadata)
        return list(response.turn_secrets)

    def list_turn_secrets(self, *, timeout: float | None = None,
                          metadata: Metadata = ()) -> list[admin_pb2.TurnSecretInfo]:
        """The TURN secrets in force by id, the signer first."""
        return list(self._call(self._admin.ListTurnSecrets,
                               admin_pb2.ListTurnSecretsRequest(), timeout,
                               metadata).turn_secrets)

    def revoke_turn_credentials(
        self, project_id: str, *, user_id: str = "", session_id: str = "",
        timeout: float | None = None, metadata: Metadata = (),
    ) -> admin_pb2.RevokeTurnCredentialsResponse:
        """Revokes one end user's (or one session's) TURN credentials: new ones are refused
        until those issued before have expired, and its allocations on coturn are ended now
        (`allocations_ended`). Name exactly one of `user_id` and `session_id`. Safe to retry."""
        return self._call(self._admin.RevokeTurnCredentials,  # type: ignore[no-any-return]
                          requests.revoke_turn_credentials(project_id, user_id, session_id),
                          timeout, metadata)

    def restore_turn_credentials(
        self, project_id: str, *, user_id: str = "", session_id: str = "",
        timeout: float | None = None, metadata: Metadata = (),
    ) -> bool:
        """Lifts a revocation: new TURN credentials for the user (or session) are issued
        again. Returns whether one was in force. Safe to retry."""
        return bool((self._call(
            self._admin.RestoreTurnCredentials,
            requests.restore_turn_credentials(project_id, user_id, session_id), timeout,
            metadata)).was_revoked)

    def health(self, service: str = "", *, timeout: float | None = None,
               metadata: Metadata = ()) -> str:
        """The serving status of the server (or of one service): e.g. "SERVING"."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service),
                              timeout, metadata, authenticated=False)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
