"""The committed stubs under client/icegate/v1/ are exactly what `make proto` generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
GENERATED = ROOT / "client" / "icegate" / "v1"


def test_committed_stubs_match_the_protos(tmp_path):
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"),
         f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
         f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
         f"--plugin=protoc-gen-connectrpc={bin_dir / 'protoc-gen-connectrpc'}",
         f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         f"--mypy_out={tmp_path}", f"--mypy_grpc_out={tmp_path}",
         f"--connectrpc_out={tmp_path}", "--connectrpc_opt=protobuf=google", *protos],
        check=True, capture_output=True, cwd=ROOT / "protos",
    )
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "icegate" / "v1").iterdir()}
    committed = {p.name: p.read_bytes() for p in GENERATED.iterdir()
                 if p.name.endswith((".py", ".pyi")) and ("_pb2" in p.name or "_connect" in p.name)}
    assert sorted(fresh) == sorted(committed), "run `make proto` and commit client/icegate/v1/"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run `make proto` and commit it"
