"""Session policies: what a project lets realtime sessions with one provider be.

A policy is kept per project and per provider family (the key family: a policy for `openai`
binds `openai_beta` too, as they share the project's key). `apply_policy` is the one place a
call's options meet it: every option the caller set is checked (refused with
`SessionPolicyError` naming the option), then what the policy fixes replaces what the caller
asked, and the result is what the provider adapter sends upstream. It runs before the
session takes anything (no quota unit, no lease, no provider call).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from icegate_server.clock import Clock
from icegate_server.errors import InvalidFieldError, NotFoundError, SessionPolicyError
from icegate_server.projects.records import validate_project_id
from icegate_server.sessions.providers import Provider, ProviderKind, SessionOptions
from icegate_server.sessions.providers.base import JsonObject
from icegate_server.store import Store
from icegate_server.store.base import SessionPolicyRecord

CALLER_OPTIONS = ("model", "voice", "instructions", "temperature", "speed", "token_ttl",
                  "modalities", "email", "tools", "type", "input_audio_format",
                  "output_audio_format", "turn_detection", "input_transcription",
                  "noise_reduction", "tool_choice", "max_output_tokens", "tracing", "prompt")
"""The SessionOptions fields a policy may let callers set (`caller_options` names them)."""

MAX_LISTED = 64
"""At most this many allowed models, allowed voices or caller options."""
MAX_SESSION_DURATION_SECONDS = 7 * 86400
MAX_VARIABLES = 32
MAX_VARIABLE_CHARS = 1024
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
"""A template variable's name, to `fullmatch`."""


@dataclass(frozen=True)
class SessionPolicy:
    """A project's policy for one provider family (see protos/icegate/v1/admin.proto).

    Attributes:
        allowed_models: Models a caller may ask for; empty allows any.
        default_model: The model when the caller names none; "" for the provider's.
        allowed_voices: Voices a caller may ask for; empty allows any.
        instructions: Fixed instructions ("" for none).
        instructions_template: Instructions with `$name` variables the caller fills.
        tools: Tools, fixed server-side, in the provider's JSON shape.
        max_token_ttl_seconds: The cap on the provider token's lifetime; None for none.
        max_session_duration_seconds: How long a session may last at most; None for no cap.
        caller_options: The SessionOptions fields a caller may set at all.
        enforcement: What a call's sideband does when the browser changes a fixed field:
            "restore", "hang_up", or "" for nothing (`sessions.sideband`).
    """

    allowed_models: tuple[str, ...] = ()
    default_model: str = ""
    allowed_voices: tuple[str, ...] = ()
    instructions: str = ""
    instructions_template: str = ""
    tools: tuple[JsonObject, ...] = field(default=(), hash=False)
    max_token_ttl_seconds: int | None = None
    max_session_duration_seconds: int | None = None
    caller_options: tuple[str, ...] = ()
    enforcement: str = ""

    def to_json(self) -> str:
        """The record the store keeps."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SessionPolicy:
        """A policy from `to_json`'s record (fields a later version added are ignored)."""
        data: dict[str, Any] = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in data.items() if k in known}
        return cls(**values)

    def template_variables(self) -> frozenset[str]:
        """The variable names `instructions_template` uses."""
        return template_variables(self.instructions_template)


def template_variables(template: str) -> frozenset[str]:
    """The variable names a `string.Template` text uses (`Template.get_identifiers` is not in
    Python 3.10).

    Raises:
        ValueError: A `$` that starts no variable and is not `$$`.
    """
    names = set()
    for match in string.Template.pattern.finditer(template):
        if match.group("invalid") is not None:
            raise ValueError("a $ that starts no variable")
        name = match.group("named") or match.group("braced")
        if name:
            names.add(name)
    return frozenset(names)


@dataclass(frozen=True)
class StoredPolicy:
    """A policy as the store keeps it, with when it was stored (Unix ms)."""

    project_id: str
    provider: str
    policy: SessionPolicy
    update_time_ms: int


def _set_options(options: SessionOptions) -> list[str]:
    """The names of the caller options `options` sets."""
    values = {
        "model": options.model, "voice": options.voice, "instructions": options.instructions,
        "temperature": options.temperature, "speed": options.speed,
        "token_ttl": options.token_ttl_seconds, "modalities": options.modalities,
        "email": options.email, "tools": options.tools, "type": options.session_type,
        "input_audio_format": options.input_audio_format,
        "output_audio_format": options.output_audio_format,
        "turn_detection": options.turn_detection,
        "input_transcription": options.input_transcription,
        "noise_reduction": options.noise_reduction, "tool_choice": options.tool_choice,
        "max_output_tokens": options.max_output_tokens, "tracing": options.tracing,
        "prompt": options.prompt,
    }
    return [name for name in CALLER_OPTIONS if values[name] not in (None, "", ())]


def apply_policy(policy: SessionPolicy | None, options: SessionOptions, kind: ProviderKind, *,
                 provider_default_ttl: int | None) -> SessionOptions:
    """The options sent upstream: the caller's, checked against `policy`, with what it fixes.

    Args:
        policy: The project's policy for the provider's family; None when it has none.
        options: What the caller asked (already checked against the provider's rules).
        kind: The provider the call is for.
        provider_default_ttl: The token lifetime the provider gives when asked for none (None
            when icegate cannot choose one): the policy's cap applies to it too.

    Raises:
        SessionPolicyError: The first option the policy does not allow, by name.
        InvalidFieldError: A template variable's value breaks the rules of any value.
    """
    if policy is None:
        if options.instruction_variables:
            raise SessionPolicyError("instruction_variables",
                                     "is only taken with an instructions template, and the "
                                     f"project has no policy for {kind.value}")
        return options
    for name in _set_options(options):
        if name not in policy.caller_options:
            raise SessionPolicyError(name, "may not be set by callers")
    model = options.model or policy.default_model
    if options.model and policy.allowed_models and options.model not in policy.allowed_models:
        raise SessionPolicyError("model", "must be one of " + ", ".join(policy.allowed_models))
    if options.voice and policy.allowed_voices and options.voice not in policy.allowed_voices:
        raise SessionPolicyError("voice", "must be one of " + ", ".join(policy.allowed_voices))
    token_ttl = options.token_ttl_seconds
    cap = policy.max_token_ttl_seconds
    if cap is not None:
        if token_ttl is not None and token_ttl > cap:
            raise SessionPolicyError("token_ttl", f"must be at most {cap} seconds")
        if token_ttl is None and provider_default_ttl is not None:
            token_ttl = min(cap, provider_default_ttl)
    return dataclasses.replace(
        options,
        model=model,
        instructions=_instructions(policy, options),
        token_ttl_seconds=token_ttl,
        tools=policy.tools or options.tools,
        instruction_variables=(),
        locked=True,
    )


def _instructions(policy: SessionPolicy, options: SessionOptions) -> str:
    variables = dict(options.instruction_variables)
    if not policy.instructions_template:
        if variables:
            raise SessionPolicyError("instruction_variables",
                                     "is only taken with an instructions template")
        return policy.instructions or options.instructions
    for name, value in variables.items():
        if not VARIABLE_NAME.fullmatch(name):
            raise InvalidFieldError("instruction_variables",
                                    "names must be 1-64 letters, digits and _")
        if len(value) > MAX_VARIABLE_CHARS or not value.isprintable():
            raise InvalidFieldError(f"instruction_variables[{name}]",
                                    f"must be at most {MAX_VARIABLE_CHARS} printable characters")
    wanted = policy.template_variables()
    missing, unknown = sorted(wanted - set(variables)), sorted(set(variables) - wanted)
    if missing:
        raise SessionPolicyError("instruction_variables", "must fill " + ", ".join(missing))
    if unknown:
        raise SessionPolicyError("instruction_variables",
                                 "names variables the template does not use: "
                                 + ", ".join(unknown))
    return string.Template(policy.instructions_template).substitute(variables)


# --- checking a policy before it is stored -------------------------------------------------


def _whole_seconds(value: float | None, name: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if not math.isfinite(value) or value != int(value) or not low <= value <= high:
        raise InvalidFieldError(name, f"must be whole seconds between {low} and {high}")
    return int(value)


def _names(values: tuple[str, ...], name: str) -> None:
    if len(values) > MAX_LISTED:
        raise InvalidFieldError(name, f"must list at most {MAX_LISTED} entries")
    if len(set(values)) != len(values):
        raise InvalidFieldError(name, "must not list an entry twice")


def validate_policy(policy: SessionPolicy, provider: Provider) -> None:
    """Checks a policy against its own rules and the provider family's main adapter (its
    models, voices and token lifetimes must be ones the provider takes).

    Raises:
        InvalidFieldError: naming the policy field (`policy.<field>`).
    """
    def check(options: SessionOptions, field_name: str) -> None:
        try:
            provider.validate(options)
        except InvalidFieldError as error:
            raise InvalidFieldError(f"policy.{field_name}",
                                    error.violations[0].description) from None

    _names(policy.allowed_models, "policy.allowed_models")
    _names(policy.allowed_voices, "policy.allowed_voices")
    _names(policy.caller_options, "policy.caller_options")
    for model in (*policy.allowed_models, policy.default_model):
        if model:
            check(SessionOptions(model=model), "allowed_models" if model in
                  policy.allowed_models else "default_model")
    if policy.default_model and policy.allowed_models and \
            policy.default_model not in policy.allowed_models:
        raise InvalidFieldError("policy.default_model", "must be one of allowed_models")
    for voice in policy.allowed_voices:
        check(SessionOptions(voice=voice, model=_any_model(policy)), "allowed_voices")
    unknown = sorted(set(policy.caller_options) - set(CALLER_OPTIONS))
    if unknown:
        raise InvalidFieldError("policy.caller_options",
                                f"{unknown[0][:64]!r} is not one of " + ", ".join(CALLER_OPTIONS))
    if policy.instructions and policy.instructions_template:
        raise InvalidFieldError("policy.instructions_template",
                                "cannot be set together with instructions")
    fixed = policy.instructions or policy.instructions_template
    if fixed and "instructions" in policy.caller_options:
        raise InvalidFieldError("policy.caller_options",
                                "cannot let callers set instructions the policy fixes")
    if policy.tools and "tools" in policy.caller_options:
        raise InvalidFieldError("policy.caller_options",
                                "cannot let callers set tools the policy fixes")
    check(SessionOptions(instructions=policy.instructions, model=_any_model(policy)),
          "instructions")
    if policy.instructions_template:
        try:
            names = template_variables(policy.instructions_template)
        except ValueError:
            raise InvalidFieldError("policy.instructions_template",
                                    "must use $name or ${name} (and $$ for a dollar sign)"
                                    ) from None
        if len(names) > MAX_VARIABLES or not all(VARIABLE_NAME.fullmatch(n) for n in names):
            raise InvalidFieldError("policy.instructions_template",
                                    f"must use at most {MAX_VARIABLES} variables named with "
                                    "1-64 letters, digits and _")
        check(SessionOptions(instructions=policy.instructions_template,
                             model=_any_model(policy)), "instructions_template")
    check(SessionOptions(tools=policy.tools, model=_any_model(policy)), "tools")
    if policy.max_token_ttl_seconds is not None:
        check(SessionOptions(token_ttl_seconds=policy.max_token_ttl_seconds,
                             model=_any_model(policy)), "max_token_ttl")
    _whole_seconds(policy.max_session_duration_seconds, "policy.max_session_duration", 1,
                   MAX_SESSION_DURATION_SECONDS)
    if policy.enforcement not in ("", "restore", "hang_up"):
        raise InvalidFieldError("policy.enforcement", "must be a SessionPolicyEnforcement")
    if policy.enforcement and provider.kind is not ProviderKind.OPENAI:
        raise InvalidFieldError("policy.enforcement",
                                "is only available for openai (its calls' sideband)")


def _any_model(policy: SessionPolicy) -> str:
    """A model to validate other fields with (Azure requires one)."""
    return policy.default_model or (policy.allowed_models[0] if policy.allowed_models
                                    else "placeholder-model")


POLICY_FAMILIES = {
    "openai": ProviderKind.OPENAI,
    "azure": ProviderKind.AZURE,
    "orga": ProviderKind.ORGA,
    "gemini": ProviderKind.GEMINI,
}
"""Each provider family a policy is kept for, and the adapter its policies are checked by."""


class SessionPolicies:
    """Sets, reads and deletes projects' session policies (AdminService)."""

    def __init__(self, store: Store, providers: Mapping[ProviderKind, Provider],
                 clock: Clock) -> None:
        self._store = store
        self._providers = providers
        self._clock = clock

    @staticmethod
    def _family(provider: str) -> str:
        # Matched whole, as spelled: the name becomes part of a store key.
        if provider not in POLICY_FAMILIES:
            raise InvalidFieldError("provider", "must be one of " + ", ".join(POLICY_FAMILIES))
        return provider

    async def set(self, project_id: str, provider: str, policy: SessionPolicy) -> StoredPolicy:
        """Checks and stores a policy, replacing the previous one.

        Raises:
            InvalidFieldError: A bad provider name or policy field.
            NotFoundError: The project does not exist.
        """
        validate_project_id(project_id)
        family = self._family(provider)
        validate_policy(policy, self._providers[POLICY_FAMILIES[family]])
        stored = StoredPolicy(project_id, family, policy, int(self._clock.now() * 1000))
        if not await self._store.put_session_policy(SessionPolicyRecord(
                project_id, family, policy.to_json(), stored.update_time_ms)):
            raise NotFoundError(f"project {project_id!r} does not exist")
        return stored

    async def get(self, project_id: str, provider: str) -> StoredPolicy:
        """The project's policy for the provider's family.

        Raises:
            NotFoundError: It has none (or the project does not exist).
        """
        validate_project_id(project_id)
        family = self._family(provider)
        record = await self._store.get_session_policy(project_id, family)
        if record is None:
            raise NotFoundError(f"project {project_id!r} has no session policy for {family}")
        return StoredPolicy(project_id, family, SessionPolicy.from_json(record.policy_json),
                            record.update_time_ms)

    async def delete(self, project_id: str, provider: str) -> None:
        validate_project_id(project_id)
        family = self._family(provider)
        if not await self._store.delete_session_policy(project_id, family):
            raise NotFoundError(f"project {project_id!r} has no session policy for {family}")
