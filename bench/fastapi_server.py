"""The usual alternative: a FastAPI JSON endpoint on uvicorn issuing the same credential.

One uvicorn process (uvloop, httptools when installed, no access log), the same HMAC and the
same fields as icegate's answers, as JSON; no key check, no store, like the bare gRPC server.

    python bench/fastapi_server.py --port PORT
"""

from __future__ import annotations

import argparse

import scenario
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


class CredentialRequest(BaseModel):
    user_id: str
    ttl: int = scenario.TTL_SECONDS


@app.post("/turn-credentials")
async def turn_credentials(request: CredentialRequest) -> dict[str, object]:
    username, password, expires_at = scenario.credential(request.user_id, request.ttl)
    return {"username": username, "password": password, "ttl": request.ttl,
            "expire_time": expires_at, "uris": list(scenario.TURN_URIS)}


@app.post("/ice-servers")
async def ice_servers(request: CredentialRequest) -> dict[str, object]:
    username, password, expires_at = scenario.credential(request.user_id, request.ttl)
    return {"ice_servers": [
        {"urls": list(scenario.STUN_URIS)},
        {"urls": list(scenario.TURN_URIS), "username": username, "credential": password},
    ], "expire_time": expires_at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                loop="uvloop")


if __name__ == "__main__":
    main()
