"""The ceiling for Connect here: connectrpc's generated ASGI application whose handlers only
sign, on uvicorn (uvloop, httptools), as the issue that brought Connect measured it.

Same generated stubs (`*_connect.py` over the `_pb2` messages), same responses and the same
HMAC as icegate; no key check, no store, no validation, no metrics, no log line.

    python bench/bare_connect_server.py --port PORT
"""

from __future__ import annotations

import argparse
from typing import Any

import scenario
import uvicorn

from icegate.v1 import credentials_connect, credentials_pb2


class BareCredentialService:
    async def issue_turn_credentials(
        self, request: credentials_pb2.IssueTurnCredentialsRequest, ctx: Any
    ) -> credentials_pb2.IssueTurnCredentialsResponse:
        return scenario.issue_response(request.user_id, request.ttl.seconds)

    async def get_ice_servers(
        self, request: credentials_pb2.GetIceServersRequest, ctx: Any
    ) -> credentials_pb2.GetIceServersResponse:
        return scenario.ice_response(request.user_id, request.ttl.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    app = credentials_connect.CredentialServiceASGIApplication(BareCredentialService())
    uvicorn.run(app, host="127.0.0.1", port=parser.parse_args().port, log_level="warning",
                access_log=False, loop="uvloop", http="httptools", lifespan="off")


if __name__ == "__main__":
    main()
