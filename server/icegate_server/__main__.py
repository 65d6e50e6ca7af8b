"""`icegate-server` / `python -m icegate_server`: the server's command line.

Importing the server needs the `server` extra; without it this says so in one line instead
of a traceback (`pip install icegate` alone installs the client).
"""

from __future__ import annotations

import sys

SERVER_DEPENDENCIES = frozenset({"cryptography", "httpx", "redis", "prometheus_client",
                                 "grpc_health", "grpc_reflection", "uvloop", "tomli"})


def main() -> int:
    try:
        from icegate_server.cli import main as cli_main
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in SERVER_DEPENDENCIES:
            raise
        print(f"icegate-server: the server's dependencies are not installed ({error.name}); "
              "install them with: pip install 'icegate[server]'", file=sys.stderr)
        return 1
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
