"""Local fakes of the upstream token APIs: real HTTP servers on 127.0.0.1, scriptable per test."""

from fake_upstreams.azure import AzureEmulation, azure_error
from fake_upstreams.gemini import GeminiEmulation, gemini_error
from fake_upstreams.openai import OpenAIEmulation, openai_error
from fake_upstreams.orga import OrgaEmulation, orga_error
from fake_upstreams.server import (
    CannedResponse,
    FakeUpstream,
    RecordedRequest,
    Responder,
    unused_port,
)

__all__ = [
    "AzureEmulation",
    "CannedResponse",
    "FakeUpstream",
    "GeminiEmulation",
    "OpenAIEmulation",
    "OrgaEmulation",
    "RecordedRequest",
    "Responder",
    "azure_error",
    "gemini_error",
    "openai_error",
    "orga_error",
    "unused_port",
]
