"""The wheel: one distribution carrying the client, the generated code and the server."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_generated_code_and_keeps_server_dependencies_optional(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("icegate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
        entry_points = archive.read(
            next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for proto in ("admin", "credentials", "sessions", "usage"):
        assert f"icegate/v1/{proto}_pb2.py" in names
        assert f"icegate/v1/{proto}_pb2_grpc.pyi" in names
        assert f"icegate/v1/{proto}_connect.py" in names
    assert "icegate_server/turnserver.conf.template" in names
    assert "icegate/py.typed" in names
    requirements = metadata.get_all("Requires-Dist")
    unconditional = {r.split(">")[0].split("<")[0].split("=")[0].strip()
                     for r in requirements if "extra ==" not in r}
    # The client speaks gRPC and Connect (http:// targets); uvicorn serves, so it is the
    # server's.
    assert unconditional == {"grpcio", "grpcio-status", "protobuf", "googleapis-common-protos",
                             "grpcio-health-checking", "connectrpc"}
    assert any("cryptography" in r and "extra == 'server'" in r for r in requirements)
    assert any("uvicorn" in r and "extra == 'server'" in r for r in requirements)
    # Tracing is its own extra (docs/OPERATIONS.md, "Tracing"): the server runs without it.
    telemetry = [r for r in requirements if r.startswith("opentelemetry")]
    assert {re.split(r"[<>=!~;\s]", r)[0] for r in telemetry} == {
        "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-grpc",
        "opentelemetry-instrumentation-httpx"}
    assert all("extra == 'tracing'" in r or "extra == 'dev'" in r for r in telemetry)
    assert sum("extra == 'tracing'" in r for r in telemetry) == 4
    assert "icegate = icegate.cli:main" in entry_points
    assert "icegate-server = icegate_server.__main__:main" in entry_points
