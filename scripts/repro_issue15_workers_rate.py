"""Issue 15 part 2 with --workers 2 on SQLite: a 63-character id plus a newline, limit 5,
400 TURN calls spread over fresh connections (so both workers answer). Prints how many were
admitted.

    PYTHONPATH=client:server:tests .venv/bin/python scripts/repro_issue15_workers_rate.py
"""
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import icegate
from harness.icegate_server import TEST_ADMIN_KEY
from harness.server_process import ServerProcess

tmp = Path(tempfile.mkdtemp())
process = ServerProcess(tmp, workers="2")
process.env["PYTHONDONTWRITEBYTECODE"] = "1"
process.env["PYTHONPATH"] = os.environ["PYTHONPATH"]
process.log = (tmp / "server.log").open("ab")
process.process = subprocess.Popen([sys.executable, "-m", "icegate_server"], cwd=tmp,
                                   env=process.env, stdout=process.log, stderr=process.log)
try:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with icegate.Client(process.target, TEST_ADMIN_KEY) as admin:
                admin.health(timeout=1)
            break
        except icegate.IcegateError:
            time.sleep(0.3)
    project = "a" * 63 + "\n"
    with icegate.Client(process.target, TEST_ADMIN_KEY) as admin:
        try:
            admin.create_project(project, rate_limit_requests=5, rate_limit_window=900)
        except icegate.IcegateError as error:
            print(f"CreateProject(63 x 'a' + '\\n', limit 5): refused {error}"[:160])
            raise SystemExit(0) from None
    admitted = refused = other = 0
    for _ in range(400):
        with icegate.Client(process.target, TEST_ADMIN_KEY) as client:
            try:
                client.issue_turn_credentials("u", project_id=project, timeout=5)
                admitted += 1
            except icegate.RateLimitedError:
                refused += 1
            except icegate.IcegateError:
                other += 1
    print(f"--workers 2, SQLite, 63-char id + newline, limit 5: {admitted} of 400 admitted, "
          f"{refused} RATE_LIMITED, {other} other")
finally:
    process.process.send_signal(signal.SIGTERM)
    process.process.wait(30)
