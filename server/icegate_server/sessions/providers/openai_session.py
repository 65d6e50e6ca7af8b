"""The OpenAI Realtime session object: the GA `session` and the beta's flat fields.

OpenAI GA and Azure GA take the whole GA session (`client_secrets`' `session`, and the same
object in a call's `session` part); the beta and Azure's legacy API take the older flat
spelling of the fields they have. Each value a caller sends is checked here before any
request, so a bad one is INVALID_ARGUMENT naming its SessionOptions field.
"""

from __future__ import annotations

import re

from icegate_server.errors import InvalidFieldError
from icegate_server.sessions.providers.base import (
    InputTranscription,
    JsonObject,
    ProviderKind,
    SessionOptions,
    TurnDetection,
    check_choice,
    check_range,
    reject_if_set,
)

SESSION_TYPES = frozenset({"realtime", "transcription"})
AUDIO_FORMATS = frozenset({"audio/pcm", "audio/pcmu", "audio/pcma"})
BETA_AUDIO_FORMATS = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
PCM_RATE = 24000
TURN_DETECTION_TYPES = frozenset({"server_vad", "semantic_vad", "none"})
EAGERNESS = frozenset({"low", "medium", "high", "auto"})
NOISE_REDUCTION = frozenset({"near_field", "far_field"})
TOOL_CHOICES = frozenset({"auto", "none", "required"})
MAX_OUTPUT_TOKENS = 4096
MAX_TRANSCRIPTION_PROMPT = 1024
MAX_TRACE_TEXT = 128
MAX_TRACE_METADATA = 16
MAX_PROMPT_VARIABLES = 32
MAX_PROMPT_VARIABLE_CHARS = 1024
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_LANGUAGE = re.compile(r"[a-z]{2,3}(?:-[A-Za-z0-9]{2,8})?")
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PROMPT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_PROMPT_VERSION = re.compile(r"[A-Za-z0-9._-]{1,64}")
_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")

TRANSCRIPTION_REFUSES = ("voice", "speed", "instructions", "output_audio_format", "modalities",
                         "tools", "tool_choice", "max_output_tokens", "prompt")
"""What a transcription session has no use for (it only listens)."""


def _printable(field_name: str, value: str, limit: int) -> None:
    if len(value) > limit or not value.isprintable():
        raise InvalidFieldError(field_name, f"must be at most {limit} printable characters")


def _pairs(field_name: str, pairs: tuple[tuple[str, str], ...], *, most: int,
           value_chars: int) -> None:
    if len(pairs) > most:
        raise InvalidFieldError(field_name, f"must have at most {most} entries")
    for key, value in pairs:
        if not _KEY.fullmatch(key):
            raise InvalidFieldError(field_name, "keys must be 1-64 letters, digits and . _ -")
        _printable(f"{field_name}[{key}]", value, value_chars)


def check_turn_detection(detection: TurnDetection | None, *, semantic: bool = True) -> None:
    """Checks a turn detection's type and its figures."""
    if detection is None:
        return
    types = TURN_DETECTION_TYPES if semantic else TURN_DETECTION_TYPES - {"semantic_vad"}
    if detection.type not in types:
        raise InvalidFieldError("turn_detection.type", "must be one of " + ", ".join(sorted(types)))
    check_range("turn_detection.threshold", detection.threshold, 0.0, 1.0)
    check_range("turn_detection.prefix_padding_ms", detection.prefix_padding_ms, 0, 5000)
    check_range("turn_detection.silence_duration_ms", detection.silence_duration_ms, 0, 10000)
    check_choice("turn_detection.eagerness", detection.eagerness, EAGERNESS)
    vad_only = (("threshold", detection.threshold),
                ("prefix_padding_ms", detection.prefix_padding_ms),
                ("silence_duration_ms", detection.silence_duration_ms))
    if detection.type != "server_vad":
        for name, value in vad_only:
            if value is not None:
                raise InvalidFieldError(f"turn_detection.{name}", "is only taken by server_vad")
    if detection.eagerness and detection.type != "semantic_vad":
        raise InvalidFieldError("turn_detection.eagerness", "is only taken by semantic_vad")
    if detection.type == "none" and (detection.create_response is not None
                                     or detection.interrupt_response is not None):
        raise InvalidFieldError("turn_detection.type",
                                "none takes no create_response or interrupt_response")


def check_transcription(transcription: InputTranscription | None) -> None:
    """Checks an input transcription's model, language and prompt (model required)."""
    if transcription is None:
        return
    if not _MODEL.fullmatch(transcription.model):
        raise InvalidFieldError("input_transcription.model",
                                "is required: 1-128 letters, digits and . _ : / -")
    if transcription.language and not _LANGUAGE.fullmatch(transcription.language):
        raise InvalidFieldError("input_transcription.language",
                                "must be an ISO 639-1 code such as en")
    _printable("input_transcription.prompt", transcription.prompt, MAX_TRANSCRIPTION_PROMPT)


def check_tool_choice(options: SessionOptions) -> None:
    """`auto`, `none`, `required`, or the name of a function among the tools."""
    choice = options.tool_choice
    if not choice or choice in TOOL_CHOICES:
        return
    names = {tool.get("name") for tool in options.tools}
    if not _FUNCTION_NAME.fullmatch(choice) or choice not in names:
        raise InvalidFieldError("tool_choice",
                                "must be auto, none, required or the name of a function in tools")


def check_max_output_tokens(value: int | None) -> None:
    check_range("max_output_tokens", value, 1, MAX_OUTPUT_TOKENS)


def _check_shared_fields(options: SessionOptions) -> None:
    # What the GA and the beta session both take: audio formats, turn detection,
    # transcription, noise reduction, tool choice, output tokens.
    check_choice("input_audio_format", options.input_audio_format, AUDIO_FORMATS)
    check_choice("output_audio_format", options.output_audio_format, AUDIO_FORMATS)
    check_turn_detection(options.turn_detection)
    check_transcription(options.input_transcription)
    check_choice("noise_reduction", options.noise_reduction, NOISE_REDUCTION)
    check_tool_choice(options)
    check_max_output_tokens(options.max_output_tokens)


def validate_ga_session(options: SessionOptions, provider: ProviderKind) -> None:
    """Checks the GA session fields beyond model, voice, instructions, speed and modalities."""
    check_choice("type", options.session_type, SESSION_TYPES)
    _check_shared_fields(options)
    if options.tracing is not None:
        _printable("tracing.workflow_name", options.tracing.workflow_name, MAX_TRACE_TEXT)
        _printable("tracing.group_id", options.tracing.group_id, MAX_TRACE_TEXT)
        _pairs("tracing.metadata", options.tracing.metadata, most=MAX_TRACE_METADATA,
               value_chars=512)
    if options.prompt is not None:
        if not _PROMPT_ID.fullmatch(options.prompt.id):
            raise InvalidFieldError("prompt.id", "is required: 1-128 letters, digits, _ and -")
        if options.prompt.version and not _PROMPT_VERSION.fullmatch(options.prompt.version):
            raise InvalidFieldError("prompt.version", "must be 1-64 letters, digits and . _ -")
        _pairs("prompt.variables", options.prompt.variables, most=MAX_PROMPT_VARIABLES,
               value_chars=MAX_PROMPT_VARIABLE_CHARS)
    if options.session_type == "transcription":
        if options.input_transcription is None:
            raise InvalidFieldError("input_transcription",
                                    "is required for a transcription session")
        for name in TRANSCRIPTION_REFUSES:
            value = getattr(options, name)
            if value not in (None, "", ()):
                raise InvalidFieldError(name, "is not taken by a transcription session")


def _format(name: str) -> JsonObject:
    return {"type": name, "rate": PCM_RATE} if name == "audio/pcm" else {"type": name}


def _turn_detection(detection: TurnDetection) -> JsonObject | None:
    if detection.type == "none":
        return None
    fields: JsonObject = {"type": detection.type}
    for name in ("threshold", "prefix_padding_ms", "silence_duration_ms", "create_response",
                 "interrupt_response"):
        value = getattr(detection, name)
        if value is not None:
            fields[name] = value
    if detection.eagerness:
        fields["eagerness"] = detection.eagerness
    return fields


def _transcription(transcription: InputTranscription) -> JsonObject:
    fields: JsonObject = {"model": transcription.model}
    if transcription.language:
        fields["language"] = transcription.language
    if transcription.prompt:
        fields["prompt"] = transcription.prompt
    return fields


def _tool_choice(choice: str) -> str | JsonObject:
    return choice if choice in TOOL_CHOICES else {"type": "function", "name": choice}


def ga_session(options: SessionOptions, model: str) -> JsonObject:
    """The GA `session` object of `options` (validated), with `model` for a realtime one."""
    audio_input: JsonObject = {}
    if options.input_audio_format:
        audio_input["format"] = _format(options.input_audio_format)
    if options.turn_detection is not None:
        audio_input["turn_detection"] = _turn_detection(options.turn_detection)
    if options.input_transcription is not None:
        audio_input["transcription"] = _transcription(options.input_transcription)
    if options.noise_reduction:
        audio_input["noise_reduction"] = {"type": options.noise_reduction}
    if options.session_type == "transcription":
        return {"type": "transcription", "audio": {"input": audio_input}}

    session: JsonObject = {"type": "realtime", "model": model}
    if options.instructions:
        session["instructions"] = options.instructions
    if options.modalities:
        session["output_modalities"] = list(options.modalities)
    if options.tools:
        session["tools"] = list(options.tools)
    if options.tool_choice:
        session["tool_choice"] = _tool_choice(options.tool_choice)
    if options.max_output_tokens is not None:
        session["max_output_tokens"] = options.max_output_tokens
    if options.tracing is not None:
        tracing = options.tracing
        traced: JsonObject = {}
        if tracing.workflow_name:
            traced["workflow_name"] = tracing.workflow_name
        if tracing.group_id:
            traced["group_id"] = tracing.group_id
        if tracing.metadata:
            traced["metadata"] = dict(tracing.metadata)
        session["tracing"] = traced or "auto"
    if options.prompt is not None:
        prompt: JsonObject = {"id": options.prompt.id}
        if options.prompt.version:
            prompt["version"] = options.prompt.version
        if options.prompt.variables:
            prompt["variables"] = dict(options.prompt.variables)
        session["prompt"] = prompt
    output: JsonObject = {}
    if options.output_audio_format:
        output["format"] = _format(options.output_audio_format)
    if options.voice:
        output["voice"] = options.voice
    if options.speed is not None:
        output["speed"] = options.speed
    audio = {key: value for key, value in (("input", audio_input), ("output", output)) if value}
    if audio:
        session["audio"] = audio
    return session


BETA_REFUSES = ("type", "tracing", "prompt")
"""GA fields the beta session does not have."""


def validate_beta_session(options: SessionOptions, provider: ProviderKind) -> None:
    """Checks the fields the beta session shares with GA (formats, VAD, transcription...)."""
    for name, value in (("type", options.session_type), ("tracing", options.tracing),
                        ("prompt", options.prompt)):
        if value not in (None, ""):
            raise InvalidFieldError(name, f"is a GA session field, not taken by "
                                    f"{provider.value} (the beta API)")
    _check_shared_fields(options)


def beta_session_fields(options: SessionOptions) -> JsonObject:
    """The beta spelling of the fields `validate_beta_session` checked."""
    body: JsonObject = {}
    if options.input_audio_format:
        body["input_audio_format"] = BETA_AUDIO_FORMATS[options.input_audio_format]
    if options.output_audio_format:
        body["output_audio_format"] = BETA_AUDIO_FORMATS[options.output_audio_format]
    if options.turn_detection is not None:
        body["turn_detection"] = _turn_detection(options.turn_detection)
    if options.input_transcription is not None:
        body["input_audio_transcription"] = _transcription(options.input_transcription)
    if options.noise_reduction:
        body["input_audio_noise_reduction"] = {"type": options.noise_reduction}
    if options.tool_choice:
        body["tool_choice"] = _tool_choice(options.tool_choice)
    if options.max_output_tokens is not None:
        body["max_response_output_tokens"] = options.max_output_tokens
    return body


GA_ONLY = ("type", "input_audio_format", "output_audio_format", "turn_detection",
           "noise_reduction", "tracing", "prompt")
"""The SessionOptions fields only the OpenAI dialects take (`reject_ga_fields`)."""


def reject_ga_fields(options: SessionOptions, provider: ProviderKind,
                     names: tuple[str, ...] = GA_ONLY) -> None:
    """Refuses the OpenAI session fields a provider of another kind has no place for."""
    values = {"type": options.session_type, "input_audio_format": options.input_audio_format,
              "output_audio_format": options.output_audio_format,
              "turn_detection": options.turn_detection,
              "input_transcription": options.input_transcription,
              "noise_reduction": options.noise_reduction, "tool_choice": options.tool_choice,
              "max_output_tokens": options.max_output_tokens, "tracing": options.tracing,
              "prompt": options.prompt}
    for name in names:
        reject_if_set(name, values[name], provider)
