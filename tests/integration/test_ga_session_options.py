"""The whole GA session through icegate: what a caller sets is what the provider receives.

The README's provider table is the contract: every cell is checked against the adapters, so
the table cannot drift from what icegate does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import httpx
import pytest

import icegate
from fake_upstreams import AzureEmulation, FakeUpstream, GeminiEmulation, OpenAIEmulation
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer, ServerFactory
from icegate_server.errors import InvalidFieldError
from icegate_server.sessions.providers import (
    InputTranscription,
    PromptReference,
    ProviderKind,
    ProviderRuntime,
    ProviderSettings,
    SessionOptions,
    Tracing,
    TurnDetection,
    build_providers,
)

OPENAI_KEY = "sk-test-SECRET-openai-key-1234"
AZURE_KEY = "azure-test-key-0123456789"
GEMINI_KEY = "AIza-test-gemini-key-0123456789"
README = Path(__file__).resolve().parents[2] / "README.md"
TOOL = {"type": "function", "name": "lookup_order",
        "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}

# One value each provider column of the README is checked with.
SAMPLES: dict[str, dict[str, object]] = {
    "model": {"model": "deployment-1"},
    "voice": {"voice": "alloy"},
    "instructions": {"instructions": "Be brief."},
    "temperature": {"temperature": 0.8},
    "speed": {"speed": 1.0},
    "token_ttl": {"token_ttl_seconds": 60},
    "modalities": {"modalities": ("text",)},
    "email": {"email": "dev@example.test"},
    "type": {"session_type": "realtime"},
    "input_audio_format": {"input_audio_format": "audio/pcmu"},
    "output_audio_format": {"output_audio_format": "audio/pcma"},
    "turn_detection": {"turn_detection": TurnDetection("server_vad", silence_duration_ms=400)},
    "input_transcription": {"input_transcription": InputTranscription()},
    "noise_reduction": {"noise_reduction": "near_field"},
    "tools": {"tools": (TOOL,)},
    "tool_choice": {"tool_choice": "required"},
    "max_output_tokens": {"max_output_tokens": 512},
    "tracing": {"tracing": Tracing()},
    "prompt": {"prompt": PromptReference("pmpt_123")},
}
VOICE_OF = {ProviderKind.GEMINI: "Puck", ProviderKind.ORGA: "alice"}
TRANSCRIBER = InputTranscription("gpt-4o-transcribe")


def readme_table() -> dict[str, dict[str, bool]]:
    """{option: {provider: takes it}} from the README's "What each provider takes" table."""
    text = README.read_text()
    section = text.split("### What each provider takes", 1)[1].split("###", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    table = {}
    for line in rows[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[cells[0]] = {name: cell == "yes" for name, cell in zip(header[1:], cells[1:],
                                                                       strict=True)}
    return table


TABLE = readme_table()


def test_the_table_covers_every_option_and_provider():
    assert set(TABLE) == set(SAMPLES)
    for row in TABLE.values():
        assert set(row) == {kind.value for kind in ProviderKind}


@pytest.mark.parametrize("option", sorted(SAMPLES))
@pytest.mark.parametrize("kind", list(ProviderKind), ids=lambda kind: kind.value)
def test_each_provider_takes_what_the_readme_says(kind: ProviderKind, option: str):
    providers = build_providers(ProviderSettings(azure_base_url="https://r.example.test"),
                                ProviderRuntime(httpx.AsyncClient()))
    sample = dict(SAMPLES[option])
    if kind is ProviderKind.GEMINI and option == "model":
        sample = {"model": "gemini-live-2.5-flash-preview"}
    if option == "voice":
        sample = {"voice": VOICE_OF.get(kind, "alloy")}
    if option == "input_transcription" and kind is not ProviderKind.GEMINI:
        sample = {"input_transcription": TRANSCRIBER}
    options = SessionOptions(**{"model": "deployment-1", **sample})  # Azure needs one
    if kind in (ProviderKind.GEMINI, ProviderKind.ORGA) and option != "model":
        options = dataclasses.replace(options, model="")
    if TABLE[option][kind.value]:
        providers[kind].validate(options)
    else:
        with pytest.raises(InvalidFieldError) as caught:
            providers[kind].validate(options)
        assert caught.value.violations[0].field == option


@pytest.fixture
def fakes():
    with FakeUpstream(OpenAIEmulation(OPENAI_KEY)) as openai, \
            FakeUpstream(AzureEmulation(AZURE_KEY, frozenset({"rt", "whisper-dep"}))) as azure, \
            FakeUpstream(GeminiEmulation(GEMINI_KEY)) as gemini:
        yield {"openai": openai, "azure": azure, "gemini": gemini}


@pytest.fixture
def server(server_factory: ServerFactory, fakes) -> RunningServer:
    return server_factory(openai_base_url=fakes["openai"].base_url,
                          azure_base_url=fakes["azure"].base_url,
                          gemini_base_url=fakes["gemini"].base_url)


@pytest.fixture
def admin(server):
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        client.set_provider_key("default", "openai", OPENAI_KEY)
        client.set_provider_key("default", "azure", AZURE_KEY)
        client.set_provider_key("default", "gemini", GEMINI_KEY)
        yield client


WHOLE = dict(
    voice="marin", instructions="Help with orders.", modalities=["audio"],
    input_audio_format="audio/pcm", output_audio_format="audio/pcmu",
    turn_detection={"type": "semantic_vad", "eagerness": "low", "create_response": True},
    input_transcription={"model": "gpt-4o-transcribe", "language": "en",
                         "prompt": "Order ids look like A-123."},
    noise_reduction="far_field", tools=[TOOL], tool_choice="lookup_order",
    max_output_tokens=800, tracing={"workflow_name": "support", "metadata": {"tier": "gold"}},
    prompt={"id": "pmpt_abc", "version": "3", "variables": {"shop": "Tea & Co"}})


def test_openai_receives_the_whole_ga_session(admin, fakes):
    created = admin.create_session("openai", token_ttl=300, **WHOLE)
    assert created.ephemeral_token.value.startswith("ek_")  # the fake accepted the body
    session = fakes["openai"].requests[-1].json["session"]
    assert session == {
        "type": "realtime", "model": "gpt-realtime", "instructions": "Help with orders.",
        "output_modalities": ["audio"], "tools": [TOOL],
        "tool_choice": {"type": "function", "name": "lookup_order"},
        "max_output_tokens": 800,
        "tracing": {"workflow_name": "support", "metadata": {"tier": "gold"}},
        "prompt": {"id": "pmpt_abc", "version": "3", "variables": {"shop": "Tea & Co"}},
        "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 24000},
                      "turn_detection": {"type": "semantic_vad", "eagerness": "low",
                                         "create_response": True},
                      "transcription": {"model": "gpt-4o-transcribe", "language": "en",
                                        "prompt": "Order ids look like A-123."},
                      "noise_reduction": {"type": "far_field"}},
            "output": {"format": {"type": "audio/pcmu"}, "voice": "marin"}},
    }


def test_azure_ga_receives_the_same_session_and_a_transcription_one(admin, fakes):
    admin.create_session("azure", model="rt", **WHOLE)
    assert fakes["azure"].requests[-1].json["session"]["audio"]["input"]["noise_reduction"] \
        == {"type": "far_field"}
    admin.mint_ephemeral_token("azure", model="rt", type="transcription",
                               input_transcription={"model": "whisper-dep"},
                               turn_detection={"type": "none"})
    assert fakes["azure"].requests[-1].json["session"] == {
        "type": "transcription",
        "audio": {"input": {"turn_detection": None, "transcription": {"model": "whisper-dep"}}}}


def test_the_beta_gets_its_own_spelling(admin, fakes):
    admin.create_session("openai_beta", input_audio_format="audio/pcmu",
                         turn_detection={"type": "server_vad", "threshold": 0.6},
                         input_transcription={"model": "whisper-1"}, max_output_tokens=200,
                         tracing=None)
    body = fakes["openai"].requests[-1].json
    assert body["input_audio_format"] == "g711_ulaw"
    assert body["turn_detection"] == {"type": "server_vad", "threshold": 0.6}
    assert body["input_audio_transcription"] == {"model": "whisper-1"}
    assert body["max_response_output_tokens"] == 200


def test_gemini_locks_tools_transcription_and_token_limit_into_its_setup(admin, fakes):
    tool = {"functionDeclarations": [{"name": "lookup_order"}]}
    admin.create_session("gemini", tools=[tool], max_output_tokens=1000,
                         input_transcription={})
    setup = fakes["gemini"].requests[-1].json["bidiGenerateContentSetup"]
    assert setup["tools"] == [tool]
    assert setup["generationConfig"]["maxOutputTokens"] == 1000
    assert setup["inputAudioTranscription"] == {}


@pytest.mark.parametrize(("provider", "options", "field", "said"), [
    ("openai", {"temperature": 0.8}, "temperature", "openai_beta"),
    ("openai", {"turn_detection": {"type": "loud"}}, "turn_detection.type", ""),
    ("openai", {"turn_detection": {"type": "semantic_vad", "threshold": 0.5}},
     "turn_detection.threshold", "server_vad"),
    ("openai", {"input_transcription": {"language": "en"}}, "input_transcription.model", ""),
    ("openai", {"input_transcription": {"model": "whisper-1", "language": "english!"}},
     "input_transcription.language", ""),
    ("openai", {"tool_choice": "not_a_tool"}, "tool_choice", ""),
    ("openai", {"max_output_tokens": 5000}, "max_output_tokens", ""),
    ("openai", {"type": "transcription"}, "input_transcription", ""),
    ("openai", {"type": "transcription", "voice": "marin",
                "input_transcription": {"model": "whisper-1"}}, "voice", "transcription"),
    ("openai", {"prompt": {"id": "pmpt bad"}}, "prompt.id", ""),
    ("openai", {"tracing": {"workflow_name": "a\nb"}}, "tracing.workflow_name", ""),
    ("openai", {"input_audio_format": "audio/mp3"}, "input_audio_format", ""),
    ("openai_beta", {"prompt": {"id": "pmpt_1"}}, "prompt", "GA"),
    ("gemini", {"input_transcription": {"model": "whisper-1"}},
     "input_transcription.model", "gemini"),
    ("gemini", {"tool_choice": "auto"}, "tool_choice", "gemini"),
])
def test_what_a_provider_does_not_take_is_refused_naming_the_field(
        admin, fakes, provider, options, field, said):
    before = {name: len(fake.requests) for name, fake in fakes.items()}
    with pytest.raises(icegate.InvalidArgumentError) as caught:
        admin.create_session(provider, **options)
    (violation,) = caught.value.field_violations
    assert violation.field == field
    assert said in violation.description
    assert {name: len(fake.requests) for name, fake in fakes.items()} == before


def test_the_cli_sends_ga_options(server, fakes, tmp_path):
    import subprocess
    import sys

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([TOOL]))
    icegate_cli = str(Path(sys.executable).parent / "icegate")
    env = {"ICEGATE_TARGET": server.target, "ICEGATE_API_KEY": TEST_ADMIN_KEY,
           "PATH": "/usr/bin:/bin"}
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        client.set_provider_key("default", "openai", OPENAI_KEY)
    done = subprocess.run(
        [icegate_cli, "session", "create", "--provider", "openai", "--turn-detection",
         "semantic_vad", "--transcription-model", "whisper-1", "--tools-file", str(tools),
         "--tool-choice", "auto", "--max-output-tokens", "300", "--trace",
         "--noise-reduction", "near_field"], env=env, capture_output=True, text=True,
        timeout=30)
    assert done.returncode == 0, done.stderr
    session = fakes["openai"].requests[-1].json["session"]
    assert session["tools"] == [TOOL] and session["tracing"] == "auto"
    assert session["audio"]["input"]["transcription"] == {"model": "whisper-1"}
    assert re.fullmatch(r"ek_\S+", json.loads(done.stdout)["browser"]["ephemeralToken"])
