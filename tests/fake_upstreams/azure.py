"""Azure OpenAI as the fakes see it: `api-key` auth, deployments, Azure error bodies."""

from __future__ import annotations

import itertools

from fake_upstreams.openai import answer_call, beta_answer, check_ga_body, ga_answer
from fake_upstreams.server import CannedResponse, RecordedRequest

LEGACY_API_VERSION = "2025-04-01-preview"
_ids = itertools.count(1)


def azure_error(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None
) -> CannedResponse:
    """An error in Azure's shape, with `apim-request-id` (Azure's front door id)."""
    return CannedResponse(
        status, {"error": {"code": code, "message": message}},
        headers={"apim-request-id": f"apim-err-{next(_ids)}", **(headers or {})},
    )


class AzureEmulation:
    """Answers like https://<resource>.openai.azure.com for one key and its deployments."""

    def __init__(self, api_key: str, deployments: frozenset[str]) -> None:
        self.api_key = api_key
        self.deployments = deployments

    def __call__(self, request: RecordedRequest) -> CannedResponse:
        if request.headers.get("api-key") != self.api_key:
            return azure_error(401, "401", "Access denied due to invalid subscription key or "
                               "wrong API endpoint. Make sure to provide a valid key.")
        request_id = f"azreq-{next(_ids)}"
        if request.method == "POST" and request.path == "/openai/v1/realtime/calls":
            answer = answer_call(request, None, request_id, "/openai/v1/realtime/calls")
            return CannedResponse(answer.status, answer.json_body, answer.raw_body,
                                  {**answer.headers, "apim-request-id": request_id})
        body = request.json
        if request.method == "POST" and request.path == "/openai/v1/realtime/client_secrets":
            problem = check_ga_body(body)
            if problem:
                return azure_error(400, "invalid_request_error", problem)
            session = body["session"]
            deployment = session.get("model") or session.get("audio", {}).get(
                "input", {}).get("transcription", {}).get("model")
            if deployment not in self.deployments:
                return azure_error(404, "DeploymentNotFound",
                                   "The API deployment for this resource does not exist.")
            answer = ga_answer(body["session"], body["expires_after"]["seconds"], request_id)
            return CannedResponse(200, answer.json_body, headers={"apim-request-id": request_id})
        if request.method == "POST" and request.path == "/openai/realtimeapi/sessions":
            if request.query.get("api-version") != [LEGACY_API_VERSION]:
                return azure_error(404, "404", "Resource not found")
            if not isinstance(body, dict) or body.get("model") not in self.deployments:
                return azure_error(404, "DeploymentNotFound",
                                   "The API deployment for this resource does not exist.")
            answer = beta_answer(body, request_id)
            return CannedResponse(200, answer.json_body, headers={"apim-request-id": request_id})
        return azure_error(404, "404", "Resource not found")
