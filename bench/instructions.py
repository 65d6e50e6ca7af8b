"""Instructions per call under callgrind: the comparison that does not move with the machine.

    .venv/bin/python bench/instructions.py      # also the last section of `make bench`

Requests per second on a shared 2-core machine move by 20-40 % from one minute to the next
(neighbours, CPU frequency, where the scheduler puts the load generator), so small
differences between targets drown in them. valgrind's callgrind counts the instructions a
process executes, in all its threads, and that count is the same from run to run within a
percent or two whatever else the machine does. Each target runs under callgrind twice, for
`FEW` and for `MANY` calls (h2load, 8 connections x 4 streams, IssueTurnCredentials or its
JSON twin); the difference of the two totals divided by `MANY - FEW` is the cost of one
call, with start-up, warm-up and shutdown cancelled out. Two targets run at a time, one
per core: with more than the machine's cores, an event-driven server that is descheduled
batches less and counts more (icegate counted 584k instead of 516k with three side by side).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import scenario
import targets
from loadgen import grpc_endpoint, json_endpoint, run_h2load
from processes import ManagedProcess, free_port

FEW, MANY = 200, 1200
VALGRIND = shutil.which("valgrind")
_TOTAL = re.compile(r"^(?:summary|totals):\s+(\d+)", re.M)


def _instructions(target: str, calls: int, work: Path) -> int:
    """Instructions the target's process executed, start to exit, serving `calls` calls."""
    out = work / f"callgrind-{target.replace(' ', '_')}-{calls}.out"
    valgrind = [str(VALGRIND), "--tool=callgrind", f"--callgrind-out-file={out}",
                "--dump-instr=no"]
    port = free_port()
    bodies = scenario.write_bodies(work / "bodies")
    if target == "bare":
        argv = [sys.executable, str(targets.BENCH_DIR / "bare_grpc_server.py"), "--port",
                str(port)]
        server = ManagedProcess(f"cg-bare-{calls}", valgrind + argv, port=port, log_dir=work,
                                startup_timeout=180).start()
        endpoint = grpc_endpoint(port, scenario.ISSUE, bodies["issue"], "unused")
    elif target == "fastapi":
        argv = [sys.executable, str(targets.BENCH_DIR / "fastapi_server.py"), "--port",
                str(port)]
        server = ManagedProcess(f"cg-fastapi-{calls}", valgrind + argv, port=port,
                                log_dir=work, startup_timeout=180).start()
        endpoint = json_endpoint(port, "/turn-credentials", bodies["json"], "unused")
    else:
        data = work / f"icegate-{calls}"
        data.mkdir(parents=True, exist_ok=True)
        server = ManagedProcess(
            f"cg-icegate-{calls}", [*valgrind, sys.executable, targets.ICEGATE_SERVER],
            port=port, log_dir=work, cwd=data, env=targets.icegate_env(port, data),
            startup_timeout=180).start()
        key = targets.prepare_project(port).api_key
        endpoint = grpc_endpoint(port, scenario.ISSUE, bodies["issue"], key)
    try:
        result = run_h2load(endpoint, clients=8, streams=4, requests=calls)
        if result.status_2xx != calls:
            raise RuntimeError(f"{target}: {result.status_2xx} of {calls} calls answered")
    finally:
        server.stop(timeout=120)
    match = _TOTAL.search(out.read_text(errors="replace"))
    if match is None:
        raise RuntimeError(f"{target}: callgrind wrote no total to {out}")
    return int(match.group(1))


def per_call(target: str, work: Path) -> float:
    return (_instructions(target, MANY, work) - _instructions(target, FEW, work)) / (MANY - FEW)


def measure(work: Path) -> dict[str, Any]:
    """Instructions per IssueTurnCredentials call of each target, with the ratios."""
    if VALGRIND is None:
        return {"note": "valgrind is not installed: instructions per call not measured"}
    names = {"bare": "bare grpc.aio", "fastapi": "FastAPI (uvicorn, HTTP/1.1)",
             "icegate": "icegate SQLite"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(per_call, key, work) for key in names}
        counts = {names[key]: future.result() for key, future in futures.items()}
    bare, icegate = counts["bare grpc.aio"], counts["icegate SQLite"]
    return {"instructions_per_call": counts,
            "icegate_vs_bare": bare / icegate,
            "icegate_vs_fastapi": counts["FastAPI (uvicorn, HTTP/1.1)"] / icegate,
            "calls": [FEW, MANY]}


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="icegate-instructions-") as work:
        print(measure(Path(work)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
