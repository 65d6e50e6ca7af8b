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

One thing does move from run to run: grpc's threads. Valgrind runs one thread at a time,
and a grpc thread that spins on an absl mutex another thread holds counts its whole spin
(an unnamed function in cygrpc, 0-32k instructions per call in a run, on any target): compare
targets over a few runs, not one (issue 16's Redis/SQLite ratio read 1.02-1.08 over six).

icegate runs on its embedded SQLite store and, when `redis-server` is installed, on a Redis
store: a throw-away redis-server (no persistence) on a free port, one per run. Only the
icegate process is under callgrind, so the count is icegate's CPU per call, not Redis's.

    .venv/bin/python bench/instructions.py icegate-sqlite icegate-redis   # some targets only

What tracing costs: `icegate-sqlite-traced` is icegate SQLite with OpenTelemetry on, every
call sampled (or as `OTEL_TRACES_SAMPLER`/`_ARG` of this process say), its spans exported over
OTLP/gRPC to a receiver in this process (`otlp_sink.py`); `icegate-sqlite` is it off.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import scenario
import targets
from loadgen import connect_endpoint, grpc_endpoint, json_endpoint, run_h2load
from processes import ManagedProcess, free_port

FEW, MANY = 200, 1200
VALGRIND = shutil.which("valgrind")
TARGETS = {"bare": "bare grpc.aio", "fastapi": "FastAPI (uvicorn, HTTP/1.1)",
           "bare-connect": "bare Connect (connectrpc, uvicorn)",
           "icegate-sqlite": "icegate SQLite", "icegate-redis": "icegate Redis",
           "icegate-sqlite-connect": "icegate SQLite Connect",
           "icegate-redis-connect": "icegate Redis Connect",
           "icegate-sqlite-traced": "icegate SQLite, tracing on"}
"""The targets; `-connect` ones are the same icegate loaded over Connect (binary protobuf,
HTTP/1.1) instead of gRPC; `-traced` is icegate SQLite with OpenTelemetry tracing on (every
call sampled, spans batched over OTLP/gRPC to `otlp_sink.py`), against `icegate-sqlite` with
it off (the default)."""
_TOTAL = re.compile(r"^(?:summary|totals):\s+(\d+)", re.M)


def _instructions(target: str, calls: int, work: Path) -> int:
    """Instructions the target's process executed, start to exit, serving `calls` calls."""
    out = work / f"callgrind-{target.replace(' ', '_')}-{calls}.out"
    valgrind = [str(VALGRIND), "--tool=callgrind", f"--callgrind-out-file={out}",
                "--dump-instr=no"]
    port = free_port()
    bodies = scenario.write_bodies(work / "bodies")
    redis: ManagedProcess | None = None
    sink: Any = None
    if target == "bare":
        argv = [sys.executable, str(targets.BENCH_DIR / "bare_grpc_server.py"), "--port",
                str(port)]
        server = ManagedProcess(f"cg-bare-{calls}", valgrind + argv, port=port, log_dir=work,
                                startup_timeout=180).start()
        endpoint = grpc_endpoint(port, scenario.ISSUE, bodies["issue"], "unused")
    elif target == "bare-connect":
        argv = [sys.executable, str(targets.BENCH_DIR / "bare_connect_server.py"), "--port",
                str(port)]
        server = ManagedProcess(f"cg-bare-connect-{calls}", valgrind + argv, port=port,
                                log_dir=work, startup_timeout=180).start()
        endpoint = connect_endpoint(port, scenario.ISSUE, bodies["issue-proto"], "unused")
    elif target == "fastapi":
        argv = [sys.executable, str(targets.BENCH_DIR / "fastapi_server.py"), "--port",
                str(port)]
        server = ManagedProcess(f"cg-fastapi-{calls}", valgrind + argv, port=port,
                                log_dir=work, startup_timeout=180).start()
        endpoint = json_endpoint(port, "/turn-credentials", bodies["json"], "unused")
    else:
        data = work / f"{target}-{calls}"
        data.mkdir(parents=True, exist_ok=True)
        store_url: str | None = None
        connect = target.endswith("-connect")
        if target.startswith("icegate-redis"):
            redis = targets.start_redis(data)
            store_url = f"redis://127.0.0.1:{redis.port}/0"
            # Redis listens now: a port picked before it started could have been its own.
            port = free_port()
        http_port = free_port() if connect else None
        env = targets.icegate_env(port, data, store_url, http_port=http_port)
        # Tracing only where asked for; the sampler may be chosen for the traced target
        # (OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=0.1: a tenth sampled).
        env = {name: value for name, value in env.items() if not name.startswith("OTEL_")
               or (target.endswith("-traced") and name.startswith("OTEL_TRACES_SAMPLER"))}
        if target.endswith("-traced"):
            from otlp_sink import OtlpSink

            sink = OtlpSink()
            env.update({"OTEL_TRACES_EXPORTER": "otlp",
                        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint})
        # Under callgrind a call runs ~50x slower: the 0.1 s default would fail some calls
        # UNAVAILABLE, and a failed call costs less than an answered one.
        env["ICEGATE_STORE_TIMEOUT"] = "5"
        try:
            server = ManagedProcess(
                f"cg-{target}-{calls}", [*valgrind, sys.executable, targets.ICEGATE_SERVER],
                port=port, log_dir=work, cwd=data, http_port=http_port,
                env=env, startup_timeout=180).start()
            key = targets.prepare_project(port).api_key
        except BaseException:
            if "server" in locals():
                server.stop(timeout=120)
            if redis is not None:
                redis.stop()
            if sink is not None:
                sink.stop()
            raise
        endpoint = (connect_endpoint(http_port, scenario.ISSUE, bodies["issue-proto"], key)
                    if http_port is not None
                    else grpc_endpoint(port, scenario.ISSUE, bodies["issue"], key))
    try:
        result = run_h2load(endpoint, clients=8, streams=4, requests=calls)
        if result.status_2xx != calls:
            raise RuntimeError(f"{target}: {result.status_2xx} of {calls} calls answered")
    finally:
        server.stop(timeout=120)
        if redis is not None:
            redis.stop()
        if sink is not None:
            sink.stop()
            # Every call's server span and its store.admit span reached the collector.
            if sink.spans < 2 * calls and "OTEL_TRACES_SAMPLER" not in os.environ:
                raise RuntimeError(f"{target}: the collector received {sink.spans} spans")
    match = _TOTAL.search(out.read_text(errors="replace"))
    if match is None:
        raise _NoTotal(f"{target}: callgrind wrote no total to {out}")
    return int(match.group(1))


class _NoTotal(RuntimeError):
    """callgrind left an empty output file (seen now and then on the Redis target)."""


def _counted(target: str, calls: int, work: Path) -> int:
    try:
        return _instructions(target, calls, work)
    except _NoTotal:
        return _instructions(target, calls, work)  # once more; a second miss is reported


def per_call(target: str, work: Path) -> float:
    return (_counted(target, MANY, work) - _counted(target, FEW, work)) / (MANY - FEW)


def measure(work: Path, chosen: Sequence[str] | None = None) -> dict[str, Any]:
    """Instructions per IssueTurnCredentials call of each target, with the ratios.

    `chosen` names targets of `TARGETS` (all of them by default; icegate-redis only when
    redis-server is installed).
    """
    if VALGRIND is None:
        return {"note": "valgrind is not installed: instructions per call not measured"}
    if chosen is None:
        chosen = [key for key in TARGETS if not key.startswith("icegate-redis")
                  or targets.redis_server_binary() is not None]
    # Two targets at a time, one per core; the Redis ones alone, since their redis-server is
    # a third busy process (beside another target it counted icegate SQLite 571k instead of
    # 530k and itself 776k instead of 741k).
    alone = [key for key in chosen if key.startswith("icegate-redis")]
    paired = [key for key in chosen if key not in alone]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(per_call, key, work) for key in paired}
        counts = {TARGETS[key]: future.result() for key, future in futures.items()}
    for key in alone:
        counts[TARGETS[key]] = per_call(key, work)
    results: dict[str, Any] = {"instructions_per_call": counts, "calls": [FEW, MANY]}
    bare, fastapi = counts.get(TARGETS["bare"]), counts.get(TARGETS["fastapi"])
    sqlite, redis = counts.get(TARGETS["icegate-sqlite"]), counts.get(TARGETS["icegate-redis"])
    if bare and sqlite:
        results["icegate_vs_bare"] = bare / sqlite
    if fastapi and sqlite:
        results["icegate_vs_fastapi"] = fastapi / sqlite
    if bare and redis:
        results["icegate_redis_vs_bare"] = bare / redis
    if sqlite and redis:
        # The Redis path's cost against the embedded one's (issue 16: at most 1.1).
        results["redis_over_sqlite"] = redis / sqlite
    traced = counts.get(TARGETS["icegate-sqlite-traced"])
    if sqlite and traced:
        results["traced_over_untraced"] = traced / sqlite
    connect = counts.get(TARGETS["icegate-sqlite-connect"])
    if connect and fastapi:
        results["connect_vs_fastapi"] = fastapi / connect
    if connect and sqlite:
        results["connect_vs_grpc"] = sqlite / connect
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help=f"targets to count, of {', '.join(TARGETS)} (default: all)")
    chosen = parser.parse_args().targets or None
    unknown = set(chosen or ()) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="icegate-instructions-") as work:
        print(measure(Path(work), chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
