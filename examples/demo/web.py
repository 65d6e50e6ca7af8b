"""`make demo`'s web app: the FastAPI example (examples/fastapi_app.py) serving the demo page.

The example's endpoints stay as they are (`POST /api/realtime-call`, `POST
/api/realtime-session/{id}/end`); this adds the one thing a relay-only page needs before it
can make its offer, its TURN credential (`POST /api/ice-servers`: a provider call takes one
offer, gathered in full, so the relay candidate must be in it), and the page itself
(`static/`, served at `/`). Settings as the example's: ICEGATE_TARGET, ICEGATE_API_KEY.

    python examples/demo/web.py --listen 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, Header, Request
from fastapi.staticfiles import StaticFiles

import icegate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastapi_app  # examples/fastapi_app.py, on the path just above

STATIC = Path(__file__).resolve().parent / "static"


def create_demo_app() -> FastAPI:
    """The example app, plus the ICE servers endpoint and the page at `/`."""
    app = fastapi_app.create_app()

    @app.post("/api/ice-servers")
    async def ice_servers(request: Request,
                          x_user_id: Annotated[str, Header()] = "anonymous") -> dict[str, Any]:
        client: icegate.AsyncClient = request.app.state.icegate
        ice = await client.get_ice_servers(x_user_id, timeout=5)
        return {"iceServers": icegate.rtc_ice_servers(ice.ice_servers)}

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="the demo page and its backend")
    parser.add_argument("--listen", default="127.0.0.1:8000", help="host:port")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    uvicorn.run(create_demo_app(), host=host, port=int(port), log_level="warning")


if __name__ == "__main__":
    main()
