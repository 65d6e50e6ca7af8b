"""Issue 15 parts 2 and 3 through a real in-process server: look-alike ids, and certificates
whose names only look like a mapped one.

    PYTHONPATH=client:server:tests .venv/bin/python scripts/repro_issue15_identity.py
    MAPPING='uri:spiffe://corp/web=acme,dns:ops.internal=*' PYTHONPATH=... (typed, after)

Point PYTHONPATH's client and server at an older checkout (keeping this tests/) for "before".
"""
import os
import tempfile
from pathlib import Path

import icegate
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer, server_settings
from harness.pki import TestCA
from icegate_server.tls import parse_client_projects

tmp = Path(tempfile.mkdtemp())
print("== part 2: look-alike ids")
with RunningServer(server_settings(tmp / "p2")) as running, \
        icegate.Client(running.target, TEST_ADMIN_KEY) as admin:
    admin.create_project("acme")
    for label, call in [
        ("CreateProject('acme\\n')", lambda: admin.create_project("acme\n")),
        ("IssueTurnCredentials(user 'alice\\n')",
         lambda: admin.issue_turn_credentials("alice\n", project_id="acme")),
        ("IssueTurnCredentials(project 'acme\\n')",
         lambda: admin.issue_turn_credentials("alice", project_id="acme\n")),
    ]:
        try:
            result = (str(call()).splitlines() or [""])[0]
            print(f"  {label}: ACCEPTED -> {result!r}"[:200])
        except icegate.IcegateError as error:
            print(f"  {label}: refused {type(error).__name__}: {error}"[:200])
    print("  projects:", [p.project_id for p in admin.list_projects().projects])

print("== part 3: untyped certificate names")
ca = TestCA(tmp / "pki")
server = ca.issue_server()
keyed = ca.issue("keyed", "keyed-admin-client")
certs = {
    "CN spiffe://corp/web, no SAN": ca.issue("cn-spiffe", "spiffe://corp/web"),
    "CN ops.internal, no SAN": ca.issue("cn-ops", "ops.internal"),
    "URI SAN ops.internal": ca.issue("uri-ops", "someone", uris=("ops.internal",)),
}
certs["email SAN ops.internal"] = ca.issue("email-ops", "someone", emails=("ops.internal",))
mapping = os.environ.get("MAPPING", "spiffe://corp/web=acme,ops.internal=*")
settings = server_settings(tmp / "p3", tls_cert=server.cert, tls_key=server.key,
                           tls_client_ca=ca.cert,
                           tls_client_projects=parse_client_projects(mapping))
print("  mapping:", mapping)
with RunningServer(settings) as running:
    with icegate.Client(running.target, TEST_ADMIN_KEY, tls=icegate.TlsConfig(
            ca_file=ca.cert, cert_file=keyed.cert, key_file=keyed.key)) as admin:
        admin.create_project("acme")
    for label, files in certs.items():
        tls = icegate.TlsConfig(ca_file=ca.cert, cert_file=files.cert, key_file=files.key)
        with icegate.Client(running.target, tls=tls) as client:
            out = []
            try:
                username = client.issue_turn_credentials("x", timeout=3).username
                out.append("acme: " + username.split(":", 1)[1])
            except icegate.IcegateError as error:
                out.append(f"turn refused {type(error).__name__}")
            try:
                client.create_project("made-by-cert", timeout=3)
                client.delete_project("made-by-cert", timeout=3)
                out.append("ADMIN (CreateProject ok)")
            except icegate.IcegateError as error:
                out.append(f"admin refused {type(error).__name__}")
            print(f"  {label}: {'; '.join(out)}")
