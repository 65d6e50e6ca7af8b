"""Orga AI: an ephemeral token from `/v1/realtime/client-secrets`, then its ICE servers.

Orga's answers are thinly documented, so parsing is tolerant: `urls` may be a string or a list,
and the token's lifetime is read from the answer or the token (a JWT) where it is there.
"""

from __future__ import annotations

import base64
import json
import re

from icegate_server.errors import (
    InvalidFieldError,
    UpstreamAuthFailedError,
    UpstreamUnavailableError,
)
from icegate_server.sessions.providers.base import (
    IceServer,
    MintedToken,
    ProviderKind,
    ProviderRuntime,
    SessionOptions,
    UpstreamAnswer,
    UpstreamHttp,
    check_api_key,
    check_instructions,
    check_model,
    plausible_unix_time,
    reject_if_set,
)
from icegate_server.sessions.providers.openai_session import GA_ONLY, reject_ga_fields
from icegate_server.sessions.providers.upstream_text import UpstreamField, upstream_text

DEFAULT_BASE_URL = "https://api.orga-ai.com"
# Orga does not document the token lifetime; assume a short one so nobody caches it too long.
ASSUMED_TOKEN_TTL_SECONDS = 60
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,189}\.[^@\s.]{1,63}")
_VOICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")


class OrgaProvider:
    """Orga AI: client secret plus the ICE servers the browser must use with it."""

    kind = ProviderKind.ORGA
    default_token_ttl_seconds: int | None = None

    def __init__(self, runtime: ProviderRuntime, base_url: str = DEFAULT_BASE_URL) -> None:
        """Builds the adapter.

        Args:
            runtime: The shared HTTP client, clock, sleep and random source.
            base_url: Scheme and host (no path), e.g. https://api.orga-ai.com.
        """
        base = base_url.rstrip("/")
        self._secrets_url = base + "/v1/realtime/client-secrets"
        self._ice_url = base + "/v1/realtime/ice-config"
        self._clock = runtime.clock
        self._http = UpstreamHttp(runtime, self.kind)

    def validate(self, options: SessionOptions) -> None:
        """See `Provider.validate`: Orga takes only an e-mail; model and voice are echoed."""
        check_model(options.model)
        if options.voice and not _VOICE.fullmatch(options.voice):
            raise InvalidFieldError("voice", "must be 1-64 letters, digits, spaces or . _ -")
        check_instructions(options.instructions)
        # The browser configures the Orga session itself; icegate cannot pass these on.
        reject_if_set("instructions", options.instructions, self.kind)
        reject_if_set("temperature", options.temperature, self.kind)
        reject_if_set("speed", options.speed, self.kind)
        reject_if_set("token_ttl", options.token_ttl_seconds, self.kind)
        reject_if_set("modalities", options.modalities, self.kind)
        reject_if_set("tools", options.tools, self.kind)
        reject_ga_fields(options, self.kind, (*GA_ONLY, "input_transcription", "tool_choice",
                                              "max_output_tokens"))
        if options.email and not _EMAIL.fullmatch(options.email):
            raise InvalidFieldError("email", "must be an e-mail address")

    async def mint(
        self, api_key: str, options: SessionOptions, *, timeout: float | None
    ) -> MintedToken:
        """See `Provider.mint`; the result carries Orga's ICE servers.

        Raises:
            InvalidFieldError: No `email`: Orga mints no token without the end user's (or
                developer's) e-mail address, and answers 401 as if the key were wrong.
        """
        self.validate(options)
        if not options.email:  # here, not in validate: a policy is checked without one
            raise InvalidFieldError("email", "is required by orga (the end user's e-mail "
                                    "address, sent with the token request)")
        check_api_key(api_key, self.kind)
        deadline = self._http.deadline(timeout)
        secret = await self._http.call(
            "POST", self._secrets_url, headers={"Authorization": f"Bearer {api_key}"},
            params={"email": options.email},
            deadline=deadline, secrets=(api_key,),
        )
        token = secret.require_text(UpstreamField.TOKEN, "ephemeral_token")
        try:
            ice = await self._http.call(
                "GET", self._ice_url, headers={"Authorization": f"Bearer {token}"},
                deadline=deadline, secrets=(api_key, token),
            )
        except UpstreamAuthFailedError as exc:
            # Our key was fine a moment ago; Orga refusing its own fresh token is its fault.
            raise UpstreamUnavailableError(
                "orga refused its own ephemeral token when asked for ICE servers",
                provider=exc.provider, upstream_status=exc.upstream_status,
                upstream_request_id=exc.upstream_request_id,
            ) from None
        return MintedToken(
            value=token,
            expires_at=self._expires_at(secret, token),
            upstream_session_id="",
            model=options.model,
            voice=options.voice,
            # Only the provider key is kept out: Orga may well reuse its own token here.
            ice_servers=_ice_servers(ice, secrets=(api_key,)),
            upstream_request_id=secret.request_id,
        )

    def _expires_at(self, answer: UpstreamAnswer, token: str) -> float:
        now = self._clock.now()
        for key, relative in (("expires_at", False), ("expires_in", True)):
            value = answer.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                expiry = plausible_unix_time(now + value if relative else value)
                if expiry is not None:
                    return expiry
        expiry = plausible_unix_time(_jwt_expiry(token))
        return expiry if expiry is not None else now + ASSUMED_TOKEN_TTL_SECONDS


def _jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, unverified (we only want to know when it lapses)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def _ice_servers(answer: UpstreamAnswer, secrets: tuple[str, ...]) -> tuple[IceServer, ...]:
    """Reads `{"iceServers": [{"urls": str | [str], "username"?, "credential"?}]}`.

    Every url, username and credential goes through `upstream_text`: a url that is not a
    plain stun/turn URI or that holds the key is left out, and so is an entry left without
    urls or whose username or credential was unfit. An answer with entries but none usable
    is malformed.
    """
    entries = answer.get("iceServers")
    if not isinstance(entries, list):
        raise answer.malformed("no iceServers list")
    servers = []
    for entry in entries:
        urls = entry.get("urls") if isinstance(entry, dict) else None
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list) or not urls or not all(
            isinstance(url, str) and url for url in urls
        ):
            raise answer.malformed("an iceServers entry without urls")
        assert isinstance(entry, dict)
        kept = tuple(url for url in (upstream_text(u, UpstreamField.ICE_URL, secrets)
                                     for u in urls) if url)
        username, credential = entry.get("username", ""), entry.get("credential", "")
        clean_username = upstream_text(username, UpstreamField.ICE_USERNAME, secrets)
        clean_credential = upstream_text(credential, UpstreamField.ICE_CREDENTIAL, secrets)
        if not kept or clean_username != (username if isinstance(username, str) else "") \
                or clean_credential != (credential if isinstance(credential, str) else ""):
            continue
        servers.append(IceServer(urls=kept, username=clean_username,
                                 credential=clean_credential))
    if entries and not servers:
        raise answer.malformed("no usable iceServers entry")
    return tuple(servers)
