"""The Node/TypeScript client (client/node/) against a real icegate server.

One Node process runs the whole Node suite (client/node/test/, node:test, compiled by the
pinned TypeScript) against one server shared by the module: every wrapper method over gRPC
and over Connect, each error class with its details, auth failure, retries, and the Express
example. The server has a frozen clock and a fake OpenAI on a real socket; the Node side gets
what it needs through the environment, including the Python client's error table and metadata
keys, which it must match.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pb2 import FileDescriptorSet
from grpc_health.v1 import health_pb2

import icegate.errors
from fake_upstreams import FakeUpstream, OpenAIEmulation
from harness.icegate_server import TEST_ADMIN_KEY, TEST_TURN_SECRET, RunningServer, ServerFactory
from harness.pki import TestCA
from harness.pytest_plugin import require_binaries
from icegate import error_metadata
from icegate.error_reasons import wire_reason
from icegate_server.clock import FrozenClock

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "client" / "node"
OPENAI_KEY = "sk-test-SECRET-openai-key-5678"
NOW = 1_795_000_000  # 2026-11-18, a whole second: the Node side checks expiries exactly


def _require_node() -> None:
    require_binaries("node", "npm")
    version = subprocess.run(["node", "-p", "process.versions.node"], capture_output=True,
                             text=True, check=True).stdout.strip()
    if int(version.split(".")[0]) < 20:
        pytest.fail(f"the Node client needs Node 20 or newer, found {version}", pytrace=False)
    if not (NODE_DIR / "node_modules" / ".installed").exists():
        pytest.fail("client/node's packages are not installed: run `make test` (or "
                    "`cd client/node && npm ci`)", pytrace=False)


@pytest.fixture(scope="module")
def openai() -> Iterator[FakeUpstream]:
    with FakeUpstream(OpenAIEmulation(OPENAI_KEY)) as fake:
        yield fake


@pytest.fixture(scope="module")
def server(module_server_factory: ServerFactory, openai: FakeUpstream) -> RunningServer:
    return module_server_factory(FrozenClock(NOW), openai_base_url=openai.base_url,
                                 session_lease_seconds=600)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PEM files: the CA, a server certificate for 127.0.0.1, a client certificate the mutual-TLS
    server maps to the project `default`, and one with the same name from a stranger CA."""
    directory = tmp_path_factory.mktemp("node-pki")
    ca, stranger = TestCA(directory), TestCA(directory, "stranger CA")
    server = ca.issue_server()
    client = ca.issue("node", "node.internal", dns=("node.internal",))
    impostor = stranger.issue("impostor", "node.internal", dns=("node.internal",))
    return {"CA": ca.cert, "SERVER_CERT": server.cert, "SERVER_KEY": server.key,
            "CERT": client.cert, "KEY": client.key,
            "STRANGER_CERT": impostor.cert, "STRANGER_KEY": impostor.key}


@pytest.fixture(scope="module")
def mtls_server(module_server_factory: ServerFactory, pki: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    """A second server, on both transports with mutual TLS (its own data directory)."""
    return module_server_factory(
        FrozenClock(NOW), data_dir=tmp_path_factory.mktemp("node-mtls"),
        tls_cert=pki["SERVER_CERT"], tls_key=pki["SERVER_KEY"], tls_client_ca=pki["CA"],
        tls_client_projects=(("dns:node.internal", "default"),))


def _lineage(cls: type) -> list[str]:
    """The class and its IcegateError ancestors, nearest first (mixins left out)."""
    return [c.__name__ for c in cls.__mro__ if issubclass(c, icegate.errors.IcegateError)]


def _python_client_contract() -> dict[str, object]:
    """What the Node client must match: the Python client's reason and code tables (as class
    lineages) and its ErrorInfo metadata keys."""
    return {
        "byReason": {wire_reason(reason): _lineage(cls)
                     for reason, cls in icegate.errors._BY_REASON.items()},
        "byCode": {code.name: _lineage(cls) for code, cls in icegate.errors._BY_CODE.items()},
        "upstreamTimeout": _lineage(icegate.errors._BY_REASON_AND_CODE[
            (icegate.errors.ErrorReason.ERROR_REASON_UPSTREAM_UNAVAILABLE,
             grpc.StatusCode.DEADLINE_EXCEEDED)]),
        "errorMetadata": {name: value for name, value in vars(error_metadata).items()
                          if name.isupper() and isinstance(value, str)},
    }


@pytest.mark.timeout(400)
def test_the_node_client_passes_its_suite_over_grpc_and_connect(
        server: RunningServer, mtls_server: RunningServer, pki: dict[str, str]):
    _require_node()
    build = subprocess.run([str(NODE_DIR / "node_modules" / ".bin" / "tsc"), "-p", "tsconfig.json"],
                           cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"tsc failed:\n{build.stdout}{build.stderr}"
    env = {
        **os.environ,
        "ICEGATE_TEST_GRPC_TARGET": server.grpc_target,
        "ICEGATE_TEST_HTTP_URL": server.http_url,
        "ICEGATE_TEST_ADMIN_KEY": TEST_ADMIN_KEY,
        "ICEGATE_TEST_TURN_SECRET": TEST_TURN_SECRET,
        "ICEGATE_TEST_OPENAI_KEY": OPENAI_KEY,
        "ICEGATE_TEST_NOW": str(NOW),
        "ICEGATE_TEST_TURN_URIS": ",".join(server.settings.turn_uris),
        "ICEGATE_TEST_STUN_URIS": ",".join(server.settings.stun_uris),
        "ICEGATE_TEST_PYTHON_CLIENT": json.dumps(_python_client_contract()),
        "ICEGATE_TEST_MTLS_GRPC_TARGET": mtls_server.grpc_target,
        "ICEGATE_TEST_MTLS_HTTP_URL": mtls_server.http_url,
        **{f"ICEGATE_TEST_TLS_{name}": path for name, path in pki.items()},
    }
    for name in ("ICEGATE_TARGET", "ICEGATE_API_KEY", "ICEGATE_TLS_CA", "ICEGATE_TLS_CERT",
                 "ICEGATE_TLS_KEY"):
        env.pop(name, None)
    run = subprocess.run(["node", "--test-reporter=tap", "dist/test/all.test.js"], cwd=NODE_DIR,
                         env=env, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"the Node suite failed:\n{output[-20000:]}"
    passed = re.search(r"^# pass (\d+)$", output, re.MULTILINE)
    failed = re.search(r"^# fail (\d+)$", output, re.MULTILINE)
    assert passed and failed, f"no summary in the Node output:\n{output[-5000:]}"
    # All ran and passed (48 cases when written): a suite that silently ran nothing fails here.
    assert int(failed.group(1)) == 0 and int(passed.group(1)) >= 48, output[-20000:]
    for secret in (TEST_ADMIN_KEY, OPENAI_KEY, TEST_TURN_SECRET):
        assert secret not in output  # what the suite printed: no key, whatever failed


def test_the_committed_typescript_is_what_make_proto_generates(tmp_path: Path):
    _require_node()
    import google.rpc

    googleapis = Path(next(iter(google.rpc.__path__))).parent.parent
    protos = sorted(str(p.relative_to(ROOT / "protos"))
                    for p in (ROOT / "protos").rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc",
         "-I", str(ROOT / "protos"), "-I", str(googleapis),
         f"--plugin=protoc-gen-es={NODE_DIR / 'node_modules' / '.bin' / 'protoc-gen-es'}",
         f"--es_out={tmp_path}", "--es_opt=target=ts,import_extension=js",
         *protos, "google/rpc/error_details.proto"],
        check=True, capture_output=True, cwd=ROOT / "protos",
    )
    health = FileDescriptorSet()
    health_pb2.DESCRIPTOR.CopyToProto(health.file.add())
    (tmp_path / "health.binpb").write_bytes(health.SerializeToString())
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc",
         f"--descriptor_set_in={tmp_path / 'health.binpb'}",
         f"--plugin=protoc-gen-es={NODE_DIR / 'node_modules' / '.bin' / 'protoc-gen-es'}",
         f"--es_out={tmp_path}", "--es_opt=target=ts,import_extension=js",
         health_pb2.DESCRIPTOR.name],
        check=True, capture_output=True, cwd=tmp_path,
    )
    generated = NODE_DIR / "src" / "gen"
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*.ts")}
    committed = {p.relative_to(generated): p.read_bytes() for p in generated.rglob("*.ts")}
    assert sorted(fresh) == sorted(committed), "run `make proto` and commit client/node/src/gen/"
    stale = [str(name) for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated TypeScript {stale}: run `make proto` and commit it"

