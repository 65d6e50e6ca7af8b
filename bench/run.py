"""`make bench`: icegate against a bare grpc.aio server and a FastAPI endpoint, on this machine.

    .venv/bin/python bench/run.py            # full: 3 runs of each measure, about 18-20 min
    BENCH_QUICK=1 .venv/bin/python bench/run.py   # 1 run of shorter measures, about 8 min

Sections (see docs/PERFORMANCE.md for the method):
  compare   capacity (closed loop) and latency at a fixed rate of IssueTurnCredentials and
            GetIceServers on: bare grpc.aio, FastAPI/uvicorn, icegate on SQLite, on Redis,
            on Redis with --workers 2 (the last two when this checkout has them);
  sessions  CreateSession against a local fake OpenAI with a fixed latency, next to a direct
            httpx call to the same fake;
  scaling   IssueTurnCredentials capacity and memory as projects and active leases grow,
            seeded through the store API.
Writes bench/results/{summary.md,bench.png,results.json}; raw output under bench/results/raw/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import instructions
import report
import scenario
import targets
from loadgen import (
    Endpoint,
    LoadResult,
    connect_endpoint,
    grpc_endpoint,
    json_endpoint,
    run_fixed_rate,
    run_h2load,
)
from processes import ManagedProcess, RssSampler, tree_rss_mib, wait_for_quiet
from seeding import seed_store

import icegate

T = TypeVar("T")
K = TypeVar("K")

RESULTS = Path(__file__).resolve().parent / "results"
BARE_CONNECT = "bare Connect (connectrpc, uvicorn)"
FLAT_PROJECTS = 10_000
"""The project count per-call cost must not grow up to (against one project)."""


@dataclass(frozen=True)
class Plan:
    """How long and how often each measure runs."""

    quick: bool
    repeats: int
    capacity_seconds: float
    latency_seconds: float
    warm_up_seconds: float
    scaling_seconds: float
    scaling_grid: tuple[tuple[int, int], ...]
    budget_seconds: float
    clients: int = 32
    streams: int = 8
    fixed_rate: int = 1000
    """Requests per second of the latency runs (as `rate_clients` clients at rate/clients)."""
    rate_clients: int = 20
    session_rate: int = 50
    max_foreign_cores: float = 0.35
    """A run during which other work took more CPU than this is run again (once)."""
    max_quiet_wait_seconds: float = 8.0
    """How long to wait, before each run, for other work on the machine to calm down."""
    noise_allowance_seconds: float = 180.0
    """The most the whole run spends waiting for, and re-running through, other work."""
    upstream_latency_ms: float = 20.0

    @classmethod
    def from_env(cls) -> Plan:
        if os.environ.get("BENCH_QUICK", "") not in ("", "0"):
            return cls(quick=True, repeats=1, capacity_seconds=3, latency_seconds=3,
                       warm_up_seconds=1, scaling_seconds=3,
                       scaling_grid=((1, 0), (10_000, 0), (100, 10_000)),
                       budget_seconds=4 * 60, max_quiet_wait_seconds=3,
                       noise_allowance_seconds=30)
        return cls(quick=False, repeats=3, capacity_seconds=6, latency_seconds=8,
                   warm_up_seconds=1, scaling_seconds=5,
                   # The lease-memory target first (100 projects with and without 100,000
                   # leases); the project counts' flatness is also measured paired.
                   scaling_grid=((100, 0), (100, 100_000), (1, 0), (10_000, 0), (100, 10_000)),
                   budget_seconds=20 * 60)


class Bench:
    def __init__(self, plan: Plan, work: Path) -> None:
        self.plan = plan
        self.work = work
        self.bodies = scenario.write_bodies(work / "bodies")
        self.notes: list[str] = []
        self.started = time.monotonic()
        self._log_counter = 0
        self.noise_allowance = plan.noise_allowance_seconds
        """Seconds left for waiting out, and re-running through, other work on the machine."""
        self.disturbed = 0.0
        """The most CPU other work on the machine took during a kept run, in cores."""

    # -- bookkeeping -------------------------------------------------------------------

    def note(self, text: str) -> None:
        print(f"NOTE: {text}", flush=True)
        self.notes.append(text)

    def out_of_time(self, what: str) -> bool:
        elapsed = time.monotonic() - self.started
        if elapsed > self.plan.budget_seconds:
            self.note(f"skipped {what}: the run's time budget "
                      f"({self.plan.budget_seconds:.0f} s) is used up")
            return True
        return False

    def log_file(self, label: str) -> Path:
        self._log_counter += 1
        path = self.work / "h2load" / f"{self._log_counter:03d}-{label}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # -- one target, one method ---------------------------------------------------------

    def success_size(self, endpoint: Endpoint) -> int:
        """The DATA bytes of one successful answer (all probes must succeed alike)."""
        probes = 20
        result = run_h2load(endpoint, clients=1, streams=1, requests=probes)
        if result.status_2xx != probes or result.data_bytes == 0 \
                or result.data_bytes % probes:
            raise RuntimeError(f"probe of {endpoint.url} did not succeed alike:\n"
                               f"{result.raw_output}")
        return result.data_bytes // probes

    @staticmethod
    def errors_by_size(result: LoadResult, size: int) -> int:
        """Calls that did not get a full successful answer (gRPC errors carry no DATA)."""
        answered_ok = result.data_bytes // size if size else result.done
        return max(result.done - min(answered_ok, result.status_2xx), 0)

    def quiet_run(self, pids: list[int], run: Callable[[], T], *, helpers: tuple[int, ...] = ()
                  ) -> tuple[T, RssSampler]:
        """One measured run; run again (once) when other work on the machine took more than
        `plan.max_foreign_cores`, keeping the less disturbed of the two."""
        best: tuple[T, RssSampler] | None = None
        for attempt in range(2):
            started = time.monotonic()
            # The servers idle between runs, so whatever is busy now is someone else's work.
            if self.noise_allowance > 0:
                wait_for_quiet(self.plan.max_foreign_cores,
                               min(self.plan.max_quiet_wait_seconds, self.noise_allowance))
            with RssSampler(pids, helpers=helpers) as sampler:
                result = run()
            if best is None or sampler.foreign_cores < best[1].foreign_cores:
                best = (result, sampler)
            # Waiting, and any run after the first, come out of the allowance.
            self.noise_allowance -= (time.monotonic() - started) if attempt else \
                (sampler.started_at - started)
            if sampler.foreign_cores <= self.plan.max_foreign_cores \
                    or self.noise_allowance <= 0:
                break
            print(f"   (other work on the machine took {sampler.foreign_cores:.2f} cores: "
                  "running again)", flush=True)
        assert best is not None
        self.disturbed = max(self.disturbed, best[1].foreign_cores)
        return best

    def measure(self, label: str, endpoint: Endpoint, pids: list[int], *,
                error_count: Callable[[LoadResult], int], rate: int,
                rate_clients: int, before_run: Callable[[], None] = lambda: None,
                helpers: tuple[int, ...] = ()) -> dict[str, Any]:
        """Warm-up, then `repeats` x (capacity run, fixed-rate run); medians of the runs."""
        plan = self.plan
        print(f"-- {label}", flush=True)
        run_h2load(endpoint, clients=plan.clients, streams=plan.streams,
                   duration=plan.warm_up_seconds)
        capacity, latency, peak = [], [], 0.0
        cores, foreign, errors_seen, cpu_per_call = [], [], [], []
        for attempt in range(plan.repeats):
            def closed_loop() -> LoadResult:
                before_run()
                result = run_h2load(endpoint, clients=plan.clients, streams=plan.streams,
                                    duration=plan.capacity_seconds)
                errors_seen.append(error_count(result))
                return result

            def fixed_rate(attempt: int = attempt) -> LoadResult:
                before_run()
                result = run_fixed_rate(endpoint, rate=rate, clients=rate_clients,
                                        seconds=plan.latency_seconds,
                                        log_file=self.log_file(f"{label}-{attempt}"))
                errors_seen.append(error_count(result))
                return result

            closed, sampler = self.quiet_run(pids, closed_loop, helpers=helpers)
            peak = max(peak, sampler.peak_mib)
            cores.append(sampler.cpu_cores)
            cpu_per_call.append(1e6 * sampler.cpu_cores / max(closed.requests_per_second, 1e-9))
            foreign.append(sampler.foreign_cores)
            fixed, fixed_sampler = self.quiet_run(pids, fixed_rate, helpers=helpers)
            foreign.append(fixed_sampler.foreign_cores)
            capacity.append(closed.requests_per_second)
            latency.append(_latency_summary(fixed))
            print(f"   run {attempt + 1}: {closed.requests_per_second:,.0f} req/s "
                  f"(server {cores[-1]:.2f} cores, other work {sampler.foreign_cores:.2f} "
                  f"cores); at {fixed.requests_per_second:,.0f} req/s p50 "
                  f"{latency[-1]['p50_ms']:.2f} p99 {latency[-1]['p99_ms']:.2f} ms; "
                  f"peak RSS {sampler.peak_mib:.0f} MiB", flush=True)
        return {
            "capacity_rps": statistics.median(capacity),
            "capacity_runs": capacity,
            "server_cores": statistics.median(cores),
            "cpu_us_per_call": statistics.median(cpu_per_call),
            "foreign_cores": max(foreign),
            "fixed_rate_rps": statistics.median(r["achieved_rps"] for r in latency),
            "p50_ms": statistics.median(r["p50_ms"] for r in latency),
            "p99_ms": statistics.median(r["p99_ms"] for r in latency),
            "p999_ms": statistics.median(r["p999_ms"] for r in latency),
            "latency_runs": latency,
            "errors": sum(errors_seen),
            "peak_rss_mib": peak,
            "runs": plan.repeats,
        }

    def measure_credentials(self, target: str, process: ManagedProcess,
                            endpoints: dict[str, Endpoint], extra_pids: tuple[int, ...] = ()
                            ) -> list[dict[str, Any]]:
        rows = []
        for method, endpoint in endpoints.items():
            size = self.success_size(endpoint)
            row = self.measure(f"{target} {method}", endpoint, [process.pid, *extra_pids],
                               error_count=lambda r, s=size: self.errors_by_size(r, s),
                               rate=self.plan.fixed_rate, rate_clients=self.plan.rate_clients)
            row.update(target=target, method=method, answer_bytes=size)
            rows.append(row)
        return rows

    # -- sections -----------------------------------------------------------------------

    def compare(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        methods = {"IssueTurnCredentials": (scenario.ISSUE, "issue", "/turn-credentials"),
                   "GetIceServers": (scenario.ICE, "ice", "/ice-servers")}

        def grpc_endpoints(port: int, key: str) -> dict[str, Endpoint]:
            return {name: grpc_endpoint(port, path, self.bodies[body], key)
                    for name, (path, body, _) in methods.items()}

        def connect_endpoints(port: int, key: str) -> dict[str, Endpoint]:
            return {name: connect_endpoint(port, path, self.bodies[f"{body}-proto"], key)
                    for name, (path, body, _) in methods.items()}

        if not self.out_of_time("bare grpc.aio"):
            with targets.start_bare_grpc(self.work) as bare:
                rows += self.measure_credentials("bare grpc.aio", bare,
                                                 grpc_endpoints(bare.port, "none"))
        if not self.out_of_time("FastAPI"):
            with targets.start_fastapi(self.work) as fastapi:
                rows += self.measure_credentials("FastAPI (uvicorn, HTTP/1.1)", fastapi, {
                    name: json_endpoint(fastapi.port, path, self.bodies["json"], "none")
                    for name, (_, _, path) in methods.items()})
        if not self.out_of_time("bare Connect"):
            with targets.start_bare_connect(self.work) as bare_connect:
                rows += self.measure_credentials(BARE_CONNECT, bare_connect,
                                                 connect_endpoints(bare_connect.port, "none"))
        for label, store, workers in self._icegate_variants():
            if self.out_of_time(label):
                continue
            with self.icegate(label, store=store, workers=workers) as (server, key, extra):
                for method in (scenario.ISSUE, scenario.ICE):
                    targets.check_call(server.port, key, method)
                    targets.check_call(f"http://127.0.0.1:{server.http_port}", key, method)
                rows += self.measure_credentials(label, server,
                                                 grpc_endpoints(server.port, key), extra)
                # The same process over Connect (binary protobuf, HTTP/1.1).
                if workers == 1 and not self.out_of_time(f"{label} Connect"):
                    assert server.http_port is not None
                    rows += self.measure_credentials(
                        f"{label} Connect", server, connect_endpoints(server.http_port, key),
                        extra)
        return rows

    def paired(self, rounds: int) -> dict[str, Any]:
        """Capacity of every target in turn, round after round, all started at once.

        This machine's speed drifts by tens of percent over minutes, and the sections above
        measure one target after another; here each round loads every target within a few
        seconds of the others, so a round's ratios share the machine's state of the moment.
        The medians of the per-round ratios are the headline ratios.
        """
        print(f"-- paired rounds ({rounds} x every target, closed loop)", flush=True)
        issue = (scenario.ISSUE, self.bodies["issue"])
        with contextlib.ExitStack() as stack:
            endpoints: dict[str, tuple[Endpoint, list[int]]] = {}
            bare = stack.enter_context(targets.start_bare_grpc(self.work))
            endpoints["bare grpc.aio"] = (grpc_endpoint(bare.port, *issue, "none"), [bare.pid])
            fastapi = stack.enter_context(targets.start_fastapi(self.work))
            endpoints["FastAPI (uvicorn, HTTP/1.1)"] = (json_endpoint(
                fastapi.port, "/turn-credentials", self.bodies["json"], "none"), [fastapi.pid])
            bare_connect = stack.enter_context(targets.start_bare_connect(self.work))
            endpoints[BARE_CONNECT] = (connect_endpoint(
                bare_connect.port, scenario.ISSUE, self.bodies["issue-proto"], "none"),
                [bare_connect.pid])
            for label, store, workers in self._icegate_variants():
                server, key, store_pids = stack.enter_context(
                    self.icegate(f"{label} paired", store=store, workers=workers))
                endpoints[label] = (grpc_endpoint(server.port, *issue, key),
                                    [server.pid, *store_pids])
                # The same server over Connect: binary protobuf, h2load --h1.
                assert server.http_port is not None
                targets.check_call(f"http://127.0.0.1:{server.http_port}", key, scenario.ISSUE)
                endpoints[f"{label} Connect"] = (connect_endpoint(
                    server.http_port, scenario.ISSUE, self.bodies["issue-proto"], key),
                    [server.pid, *store_pids])
            capacity = self.alternate(endpoints, rounds).rps
        ratios: dict[str, dict[str, float]] = {}
        for label, runs in capacity.items():
            ratios[label] = {
                "capacity_rps": statistics.median(runs),
                "x_bare": median_ratio(runs, capacity["bare grpc.aio"]),
                "x_fastapi": median_ratio(runs, capacity["FastAPI (uvicorn, HTTP/1.1)"]),
            }
            over_grpc = label.removesuffix(" Connect")
            if label.endswith(" Connect") and over_grpc in capacity:
                # Connect against the same icegate process over gRPC (issue 21: >= 1.5).
                ratios[label]["x_grpc"] = median_ratio(runs, capacity[over_grpc])
        many, one = "icegate Redis --workers 2", "icegate Redis"
        if many in capacity and one in capacity:
            ratios[many]["x_one_worker"] = median_ratio(capacity[many], capacity[one])
        for label, figures in ratios.items():
            print(f"   {label}: {figures} (runs {[round(r) for r in capacity[label]]})",
                  flush=True)
        return {"rounds": rounds, "seconds": 3, "runs": capacity, "ratios": ratios}

    def alternate(self, endpoints: dict[K, tuple[Endpoint, list[int]]],
                  rounds: int) -> Rounds[K]:
        """`rounds` rounds, each loading every endpoint in turn (a 1 s warm-up, then a 3 s
        closed loop): the paired measure that `paired` and `flatness` take ratios within."""
        measured: Rounds[K] = Rounds({key: [] for key in endpoints},
                                     {key: [] for key in endpoints})
        for _ in range(rounds):
            for key, (endpoint, pids) in endpoints.items():
                run_h2load(endpoint, clients=self.plan.clients, streams=self.plan.streams,
                           duration=1)
                result, sampler = self.quiet_run(pids, lambda endpoint=endpoint: run_h2load(
                    endpoint, clients=self.plan.clients, streams=self.plan.streams,
                    duration=3))
                measured.rps[key].append(result.requests_per_second)
                measured.cpu_us[key].append(1e6 * sampler.cpu_cores
                                            / max(result.requests_per_second, 1e-9))
        return measured

    def _icegate_variants(self) -> list[tuple[str, str, int]]:
        variants = [("icegate SQLite", "sqlite", 1)]
        if self.redis_usable():
            variants.append(("icegate Redis", "redis", 1))
        # --workers on Redis only: one process owns a SQLite file (a start is refused).
        if targets.workers_flag_available():
            if self.redis_usable():
                variants.append(("icegate Redis --workers 2", "redis", 2))
        else:
            self.note("icegate --workers 2 not measured: `icegate-server --help` has no "
                      "--workers on this checkout")
        return variants

    def stores(self) -> list[str]:
        """The store backends this run measures: SQLite, and Redis when usable."""
        return ["sqlite"] + (["redis"] if self.redis_usable() else [])

    def redis_usable(self) -> bool:
        if not targets.redis_store_available():
            self.note_once("icegate on Redis not measured: this checkout has no "
                           "icegate_server.store.redis (the Redis store is on another branch)")
            return False
        if targets.redis_server_binary() is None:
            self.note_once("icegate on Redis not measured: no redis-server on this machine")
            return False
        return True

    def note_once(self, text: str) -> None:
        if text not in self.notes:
            self.note(text)

    @contextlib.contextmanager
    def store_url(self, name: str, store: str) -> Iterator[tuple[str, tuple[int, ...]]]:
        """A fresh, empty store: a new SQLite file, or a new redis-server (and its pid)."""
        if store == "sqlite":
            data = self.work / f"{name}-data"
            data.mkdir(parents=True, exist_ok=True)
            yield f"sqlite:///{data / 'icegate.sqlite3'}", ()
            return
        redis = targets.start_redis(self.work)
        try:
            yield f"redis://127.0.0.1:{redis.port}/0", (redis.pid,)
        finally:
            redis.stop()

    @contextlib.contextmanager
    def icegate(self, label: str, *, store: str, workers: int = 1,
                openai_base_url: str | None = None
                ) -> Iterator[tuple[ManagedProcess, str, tuple[int, ...]]]:
        """A running icegate with the benchmark project; yields it, the key, and store pids."""
        name = label.replace(" ", "-").replace("/", "")
        with self.store_url(name, store) as (url, store_pids), \
                targets.start_icegate(name, self.work, store_url=url, workers=workers,
                                      openai_base_url=openai_base_url) as server:
            project = targets.prepare_project(server.port,
                                              with_openai_key=openai_base_url is not None)
            yield server, project.api_key, store_pids

    def sessions(self) -> dict[str, Any]:
        plan = self.plan
        result: dict[str, Any] = {"upstream_latency_ms": plan.upstream_latency_ms,
                                  "rate_rps": plan.session_rate, "rows": []}
        with targets.start_fake_openai(self.work, plan.upstream_latency_ms) as fake:
            base_url = f"http://127.0.0.1:{fake.port}"
            direct = [self.quiet_run([fake.pid], lambda: direct_httpx_latencies(
                base_url, plan.session_rate, plan.latency_seconds))[0]
                for _ in range(plan.repeats)]
            result["direct_httpx"] = _paced_medians(direct)
            print(f"-- direct httpx to the fake: {result['direct_httpx']}", flush=True)
            with targets.start_bare_grpc(self.work) as bare:
                floor = [self.quiet_run([bare.pid], lambda: bare_round_trip_latencies(
                    bare.port, plan.session_rate, plan.latency_seconds))[0]
                    for _ in range(plan.repeats)]
            result["grpc_round_trip"] = _paced_medians(floor)
            print(f"-- a gRPC round trip (bare server, plain grpc.aio stub): "
                  f"{result['grpc_round_trip']}", flush=True)
            stores = self.stores()
            for store in stores:
                label = f"icegate {'SQLite' if store == 'sqlite' else 'Redis'}"
                if self.out_of_time(f"CreateSession on {label}"):
                    continue
                with self.icegate(f"{label} sessions", store=store,
                                  openai_base_url=base_url) as (server, key, store_pids):
                    targets.check_call(server.port, key, scenario.CREATE_SESSION)
                    endpoint = grpc_endpoint(server.port, scenario.CREATE_SESSION,
                                             self.bodies["session"], key)
                    counted = SessionCounter(server.port, key)
                    row = self.measure(f"{label} CreateSession", endpoint,
                                       [server.pid, *store_pids], error_count=counted.errors,
                                       rate=plan.session_rate, rate_clients=5,
                                       before_run=counted.mark, helpers=(fake.pid,))
                    row.update(target=label, method="CreateSession")
                    # What a caller sees: the typed client, paced and timed in Python exactly
                    # as the direct httpx calls (h2load's p50 above also carries its own
                    # gRPC pacing, a few ms even for a call that does nothing).
                    client = [self.quiet_run([server.pid, *store_pids], lambda: (
                        client_session_latencies(server.port, key, plan.session_rate,
                                                 plan.latency_seconds)),
                        helpers=(fake.pid,))[0] for _ in range(plan.repeats)]
                    row["client"] = _paced_medians(client)
                    row["added_p50_ms"] = (row["client"]["p50_ms"]
                                           - result["direct_httpx"]["p50_ms"])
                    print(f"   typed asyncio client at {plan.session_rate} req/s: "
                          f"{row['client']}", flush=True)
                    result["rows"].append(row)
        return result

    def scaling(self) -> list[dict[str, Any]]:
        plan = self.plan
        rows = []
        stores = self.stores()
        # Point by point, both stores at each: when the budget runs out, what is skipped is
        # the last points of the grid on both, not a whole store.
        for projects, leases in plan.scaling_grid:
            for store in stores:
                label = f"{store} {projects} projects {leases} leases"
                if self.out_of_time(f"scaling {label}"):
                    continue
                rows.append(self.scaling_point(store, projects, leases))
        return rows

    def flatness(self, rounds: int) -> list[dict[str, Any]]:
        """Per-call cost with 1 and with `FLAT_PROJECTS` projects, in paired rounds.

        The scaling rows run one after another, minutes apart, and this machine's speed drifts
        more than the target's 10 % in that time; here both servers (one store each) are up
        at once and loaded in turn, round after round, as in `paired`, and the figure is the
        median of the per-round ratios.
        """
        rows = []
        for store in self.stores():
            if self.out_of_time(f"paired flatness on {store}"):
                continue
            print(f"-- flatness on {store}: 1 and {FLAT_PROJECTS:,} projects, "
                  f"{rounds} paired rounds", flush=True)
            with contextlib.ExitStack() as stack:
                endpoints: dict[int, tuple[Endpoint, list[int]]] = {}
                for projects in (1, FLAT_PROJECTS):
                    name = f"flat-{store}-{projects}p"
                    url, _ = stack.enter_context(self.store_url(name, store))
                    seeded = seed_store(url, projects=projects, leases=0)
                    server = stack.enter_context(
                        targets.start_icegate(name, self.work, store_url=url))
                    targets.check_call(server.port, seeded.load_key, scenario.ISSUE)
                    endpoints[projects] = (grpc_endpoint(server.port, scenario.ISSUE,
                                                         self.bodies["issue"], seeded.load_key),
                                           [server.pid])
                measured = self.alternate(endpoints, rounds)
            rps, cpu = measured.rps, measured.cpu_us
            row = {
                "store": store, "projects": FLAT_PROJECTS, "rounds": rounds,
                "rps_ratio": median_ratio(rps[FLAT_PROJECTS], rps[1]),
                "cpu_ratio": median_ratio(cpu[FLAT_PROJECTS], cpu[1]),
                "rps_runs": {str(k): v for k, v in rps.items()},
                "cpu_runs": {str(k): v for k, v in cpu.items()},
            }
            print(f"   req/s {row['rps_ratio']:.2f} x, CPU per call {row['cpu_ratio']:.2f} x "
                  "the 1-project figures", flush=True)
            rows.append(row)
        return rows

    def scaling_point(self, store: str, projects: int, leases: int) -> dict[str, Any]:
        plan = self.plan
        name = f"scale-{store}-{projects}p-{leases}l"
        print(f"-- scaling: {store}, {projects:,} projects, {leases:,} leases", flush=True)
        with self.store_url(name, store) as (url, store_pids):
            seeded = seed_store(url, projects=projects, leases=leases)
            print(f"   seeded in {seeded.seconds:.1f} s", flush=True)
            with targets.start_icegate(name, self.work, store_url=url) as server:
                targets.check_call(server.port, seeded.load_key, scenario.ISSUE)
                endpoint = grpc_endpoint(server.port, scenario.ISSUE, self.bodies["issue"],
                                         seeded.load_key)
                size = self.success_size(endpoint)
                run_h2load(endpoint, clients=plan.clients, streams=plan.streams,
                           duration=plan.warm_up_seconds)
                idle_server = tree_rss_mib(server.pid)
                idle_store = sum(tree_rss_mib(p) for p in store_pids)
                runs, errors, peak, cores = [], 0, 0.0, []
                cpu_per_call, foreign = [], []
                for _ in range(plan.repeats):
                    closed, sampler = self.quiet_run([server.pid], lambda: run_h2load(
                        endpoint, clients=plan.clients, streams=plan.streams,
                        duration=plan.scaling_seconds))
                    runs.append(closed.requests_per_second)
                    cores.append(sampler.cpu_cores)
                    cpu_per_call.append(1e6 * sampler.cpu_cores
                                        / max(closed.requests_per_second, 1e-9))
                    foreign.append(sampler.foreign_cores)
                    errors += self.errors_by_size(closed, size)
                    peak = max(peak, sampler.peak_mib)
                store_bytes = _store_bytes(url, store_pids)
        row = {
            "store": store, "projects": projects, "leases": leases,
            "capacity_rps": statistics.median(runs), "capacity_runs": runs,
            "server_cores": statistics.median(cores),
            "cpu_us_per_call": statistics.median(cpu_per_call), "foreign_cores": max(foreign),
            "errors": errors, "server_idle_rss_mib": idle_server, "server_peak_rss_mib": peak,
            "store_rss_mib": idle_store, "store_mib": store_bytes / 2**20,
            "seed_seconds": seeded.seconds, "runs": plan.repeats,
        }
        print(f"   {row['capacity_rps']:,.0f} req/s; server RSS {idle_server:.0f} MiB idle, "
              f"{peak:.0f} MiB peak; store {row['store_mib']:.1f} MiB", flush=True)
        return row


@dataclass(frozen=True)
class Rounds(Generic[K]):
    """Each round's figures of every endpoint of `Bench.alternate`, by endpoint."""

    rps: dict[K, list[float]]
    cpu_us: dict[K, list[float]]
    """Server CPU per call, µs."""


def median_ratio(runs: list[float], against: list[float]) -> float:
    """The median of the per-round ratios of two endpoints' figures."""
    return statistics.median(a / b for a, b in zip(runs, against, strict=True))


class SessionCounter:
    """Counts failed CreateSession calls from the project's own session counter."""

    def __init__(self, port: int, key: str) -> None:
        self._port = port
        self._key = key
        self._before = 0

    def mark(self) -> None:
        self._before = targets.sessions_used(self._port, self._key)

    def errors(self, result: LoadResult) -> int:
        created = targets.sessions_used(self._port, self._key) - self._before
        return max(result.done - created, 0)


def _latency_summary(result: LoadResult) -> dict[str, float]:
    def pct(q: float) -> float:
        value = result.percentile(q)
        return float("nan") if value is None else value

    return {"achieved_rps": result.requests_per_second, "p50_ms": pct(0.50),
            "p99_ms": pct(0.99), "p999_ms": pct(0.999), "samples": len(result.latencies_ms)}


def _store_bytes(url: str, store_pids: tuple[int, ...]) -> int:
    """The SQLite file (with its WAL), or Redis' own `used_memory`."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def _paced_medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """The medians of `paced_latencies` runs, with their errors summed."""
    medians = {key: statistics.median(run[key] for run in runs)
               for key in ("p50_ms", "p99_ms", "p999_ms", "achieved_rps")}
    medians["errors"] = sum(run["errors"] for run in runs)
    return medians


def paced_latencies(rate: int, seconds: float,
                    session: Callable[[], Any]) -> dict[str, float]:
    """Starts a call `rate` times a second, each on its own task, and times each one.

    `session()` is an async context manager yielding the coroutine function of one call
    (True when it succeeded). One call is made first and not counted, so pools are warm.
    """
    import uvloop

    total = int(rate * seconds)

    async def loop() -> dict[str, float]:
        latencies: list[float] = []
        errors = 0
        async with session() as call:
            async def one() -> None:
                nonlocal errors
                started = time.perf_counter()
                ok = await call()
                latencies.append((time.perf_counter() - started) * 1000)
                errors += not ok

            await one()
            latencies.clear()
            tasks = []
            start = time.perf_counter()
            for n in range(total):
                await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
                tasks.append(asyncio.create_task(one()))
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
            elapsed = time.perf_counter() - start
        ordered = sorted(latencies)

        def pct(q: float) -> float:
            return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

        return {"p50_ms": pct(0.5), "p99_ms": pct(0.99), "p999_ms": pct(0.999),
                "achieved_rps": total / elapsed, "errors": errors}

    return uvloop.run(loop())


def direct_httpx_latencies(base_url: str, rate: int, seconds: float) -> dict[str, float]:
    """POSTs icegate's own client_secrets body to the fake, `rate` per second, with httpx."""
    import httpx

    from icegate_server.sessions.providers.base import SessionOptions
    from icegate_server.sessions.providers.openai import client_secrets_body

    body = client_secrets_body(SessionOptions(model="gpt-realtime", voice="alloy"),
                               "gpt-realtime")
    headers = {"Authorization": f"Bearer {scenario.OPENAI_KEY}"}

    @contextlib.asynccontextmanager
    async def session() -> AsyncIterator[Callable[[], Awaitable[bool]]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            async def call() -> bool:
                response = await client.post("/v1/realtime/client_secrets", json=body,
                                             headers=headers)
                response.json()
                return response.status_code == 200

            yield call

    return paced_latencies(rate, seconds, session)


def bare_round_trip_latencies(port: int, rate: int, seconds: float) -> dict[str, float]:
    """IssueTurnCredentials on the bare server through a plain grpc.aio stub, paced as the
    others: what any unary gRPC call costs a Python caller here, before icegate does anything.
    """
    import grpc.aio

    from icegate.v1 import credentials_pb2, credentials_pb2_grpc

    request = credentials_pb2.IssueTurnCredentialsRequest(user_id=scenario.USER_ID)
    request.ttl.seconds = scenario.TTL_SECONDS

    @contextlib.asynccontextmanager
    async def session() -> AsyncIterator[Callable[[], Awaitable[bool]]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = credentials_pb2_grpc.CredentialServiceStub(channel)

            async def call() -> bool:
                answer = await stub.IssueTurnCredentials(request, timeout=10)
                return bool(answer.username)

            yield call

    return paced_latencies(rate, seconds, session)


def client_session_latencies(port: int, api_key: str, rate: int,
                             seconds: float) -> dict[str, float]:
    """CreateSession through icegate's asyncio client, paced exactly as the direct calls."""
    @contextlib.asynccontextmanager
    async def session() -> AsyncIterator[Callable[[], Awaitable[bool]]]:
        async with icegate.AsyncClient(f"127.0.0.1:{port}", api_key) as client:
            async def call() -> bool:
                created = await client.create_session(
                    "openai", user_id=scenario.USER_ID, model="gpt-realtime", voice="alloy",
                    timeout=10)
                return bool(created.session_id)

            yield call

    return paced_latencies(rate, seconds, session)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    h2load = subprocess.run([shutil.which("h2load") or "h2load", "--version"],
                            capture_output=True, text=True, check=False).stdout.strip()
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "nproc": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(), "kernel": platform.release(),
        "grpcio": grpc.__version__, "h2load": h2load,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def _stop_on_sigterm(signum: int, frame: object) -> None:
    # `timeout` and CI send SIGTERM: unwind, so every server is stopped on the way out.
    raise SystemExit(128 + signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    plan = Plan.from_env()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = RESULTS / "raw" / stamp
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(plan, work)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "mode": "quick" if plan.quick else "full",
        "plan": {k: v for k, v in vars(plan).items()},
        "machine": machine(),
        "command": ("BENCH_QUICK=1 make bench" if plan.quick else "make bench"),
    }
    print(f"icegate benchmark ({results['mode']}), raw output in {work}", flush=True)
    try:
        results["paired"] = bench.paired(rounds=3 if plan.quick else 5)
        results["compare"] = bench.compare()
        results["sessions"] = bench.sessions()
        results["flatness"] = bench.flatness(rounds=3 if plan.quick else 5)
        results["scaling"] = bench.scaling()
        if os.environ.get("BENCH_INSTRUCTIONS", "1") != "0":
            print("-- instructions per call (callgrind; about 3 minutes)", flush=True)
            results["instructions"] = instructions.measure(work / "callgrind")
            print(f"   {results['instructions']}", flush=True)
    finally:
        if bench.disturbed > bench.plan.max_foreign_cores:
            bench.note(f"other work on this machine took up to {bench.disturbed:.2f} cores "
                       "during some kept runs (see 'other work' columns): those figures are low")
        results["notes"] = bench.notes
        results["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
        results["elapsed_seconds"] = round(time.monotonic() - bench.started, 1)
        (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2, default=str))
    summary = report.write(results, RESULTS)
    print(summary)
    print(f"done in {results['elapsed_seconds']:.0f} s: {RESULTS / 'summary.md'}, "
          f"{RESULTS / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
