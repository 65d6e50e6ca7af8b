"""The soak run: a real icegate-server under a fixed, mixed load for minutes; fails on leaks.

    make soak                                   # 10 minutes, SQLite, 200 requests/s
    make soak SOAK_ARGS="--minutes 3 --store redis --report /tmp/soak.md"

What it starts (loopback only): one `icegate-server` process (SQLite in a fresh directory by
default; `--store redis` starts a throw-away redis-server and uses it) and a fake OpenAI
(`tests/fake_upstreams`, a real HTTP server in a child process). It creates `--projects`
projects, each with its own caller key, its OpenAI key and limits that the mix never reaches,
plus one small project whose rate limit is used up, then drives `--rate` requests per second
on a fixed schedule (open loop: a request goes out when its time comes, whether or not the
earlier ones have come back) from one asyncio loop with `icegate.AsyncClient`:

    IssueTurnCredentials, GetIceServers, CreateSession -> KeepAliveSession -> EndSession,
    MintEphemeralToken, GetUsage, admin calls (CreateApiKey, RevokeApiKey, UpdateProject,
    ListApiKeys), and a small share of calls asked to fail: a bad user id (INVALID_ARGUMENT
    INVALID_FIELD), the small project over its rate limit (RESOURCE_EXHAUSTED RATE_LIMITED),
    a revoked key (UNAUTHENTICATED INVALID_API_KEY).

Every 10 s it samples the server's RSS, open file descriptors and threads (from /proc), the
achieved rate, latency p50/p99 per RPC and errors by status and reason, split into "asked for"
and "unexpected". It exits 1 on any unexpected error, when RSS, fds or threads grew from the
first full minute after warm-up to the last minute beyond the bounds, or when the sessions do
not add up at the end (every session created was ended, so every project must show 0 active
leases and a monthly count equal to the sessions it created). The summary is printed and, with
`--report FILE`, written as markdown.

This file is not collected by pytest (no `test_` prefix): it is run by `make soak` only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: harness, fake_upstreams

import grpc

import icegate
from harness.icegate_server import TEST_ADMIN_KEY
from harness.redis_server import RedisServer
from harness.server_process import ServerProcess

OPENAI_KEY = "sk-test-SOAK-openai-key-0000"
CALL_TIMEOUT = 5.0
OK = "OK"

# The share of scheduled operations of each kind. A session flow is three RPCs, a key
# rotation three, the other operations one: the tick rate is set so that RPCs/s == --rate.
MIX: dict[str, float] = {
    "turn": 0.30,            # IssueTurnCredentials
    "ice": 0.30,             # GetIceServers
    "session": 0.09,         # CreateSession -> KeepAliveSession -> EndSession
    "mint": 0.08,            # MintEphemeralToken
    "usage": 0.18,           # GetUsage
    "admin": 0.02,           # CreateApiKey | key rotation | UpdateProject | ListApiKeys
    "bad_user": 0.01,        # asked for: INVALID_ARGUMENT INVALID_FIELD
    "rate_limited": 0.01,    # asked for: RESOURCE_EXHAUSTED RATE_LIMITED
    "revoked_key": 0.01,     # asked for: UNAUTHENTICATED INVALID_API_KEY
}
RPCS_PER_OP = {"session": 3.0, "admin": (1 + 3 + 1 + 1) / 4}
ADMIN_OPS = ("create_key", "rotate_key", "update_project", "list_keys")

INVALID_FIELD = ("INVALID_ARGUMENT", "INVALID_FIELD")
RATE_LIMITED = ("RESOURCE_EXHAUSTED", "RATE_LIMITED")
REVOKED = ("UNAUTHENTICATED", "INVALID_API_KEY")


# -- the fake OpenAI, in a child process so that its threads do not share our GIL ------------

def serve_fake_openai(key: str) -> None:
    """Child-process mode: runs a fake OpenAI until stdin closes; prints its base URL first."""
    from fake_upstreams import FakeUpstream, OpenAIEmulation

    with FakeUpstream(OpenAIEmulation(key)) as fake:
        def forget() -> None:  # the fake records every request; a soak must not hoard them
            while True:
                time.sleep(5)
                with fake._lock:
                    fake.requests.clear()

        threading.Thread(target=forget, daemon=True).start()
        print(fake.base_url, flush=True)
        sys.stdin.read()


class FakeOpenAIProcess:
    def __init__(self, key: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-fake-openai", key],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.base_url = self.process.stdout.readline().strip()
        if not self.base_url.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"the fake OpenAI did not start ({self.base_url!r})")

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- what the run measures ---------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    rpc: str
    started: float      # monotonic, seconds since the load began
    latency: float      # seconds
    result: str         # "OK" or "STATUS REASON" (or "EXCEPTION Type")
    expected: str       # "OK" or the "STATUS REASON" the mix asked for

    @property
    def asked_for(self) -> bool:
        return self.result != OK and self.result == self.expected

    @property
    def unexpected(self) -> bool:
        return self.result != self.expected


@dataclasses.dataclass
class Sample:
    t: float
    rss_kb: int
    fds: int
    threads: int
    rpcs: int
    rate: float
    p50_ms: float
    p99_ms: float
    per_rpc: dict[str, tuple[int, float, float]]  # rpc -> (count, p50 ms, p99 ms), OK calls
    asked_for: int
    unexpected: int
    in_flight: int
    store_rss_kb: int | None
    loadavg: float  # the machine's 1-minute load average: other work skews the latencies


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of `values` (sorted or not); 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(q / 100 * len(ordered))) - 1)]


def proc_status(pid: int) -> tuple[int, int, int]:
    """(VmRSS in kB, open fds, threads) of a live process."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd")), threads


def vm_rss_kb(pid: int | None) -> int | None:
    if pid is None:
        return None
    with contextlib.suppress(OSError):
        return proc_status(pid)[0]
    return None


# -- the load --------------------------------------------------------------------------

@dataclasses.dataclass
class Project:
    project_id: str
    client: icegate.AsyncClient
    spare_keys: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    sessions_created: int = 0
    sessions_ended: int = 0


class Soak:
    def __init__(self, args: argparse.Namespace, target: str,
                 server: subprocess.Popen[bytes], store_pid: int | None) -> None:
        self.args = args
        self.target = target
        self.server = server
        self.server_pid = server.pid
        self.server_died = ""
        self.store_pid = store_pid
        self.random = random.Random(args.seed)
        self.outcomes: list[Outcome] = []
        self.samples: list[Sample] = []
        self.projects: list[Project] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.max_in_flight = 0
        self.shed = 0
        self.max_lag = 0.0
        self.ticks = 0
        self.users = 0
        self.load_started = 0.0
        self.admin_counter = 0
        self.month_at_start = ""
        self.resources_after_drain: tuple[int, int, int] | None = None
        self.session_checks: list[str] = []
        self.session_problems: list[str] = []

    # --- setup ---

    async def setup(self) -> None:
        args = self.args
        self.admin = icegate.AsyncClient(self.target, TEST_ADMIN_KEY, default_timeout=10)
        for index in range(args.projects):
            project_id = f"soak-{index:03d}"
            await self.admin.create_project(
                project_id, display_name=f"soak {index}", rate_limit_requests=1_000_000,
                rate_limit_window=60, monthly_session_quota=1_000_000,
                max_concurrent_sessions=50)
            secret = (await self.admin.create_api_key(project_id, display_name="soak")).secret
            await self.admin.set_provider_key(project_id, "openai", OPENAI_KEY)
            self.projects.append(Project(project_id, icegate.AsyncClient(self.target, secret)))
        # The small project: one request a day, used up here, so every later call is refused.
        await self.admin.create_project("soak-small", rate_limit_requests=1,
                                        rate_limit_window=86400)
        small_secret = (await self.admin.create_api_key("soak-small")).secret
        self.small = icegate.AsyncClient(self.target, small_secret)
        await self.small.issue_turn_credentials("warm-up")
        # Keys revoked up front, each behind its own long-lived channel.
        self.revoked: list[icegate.AsyncClient] = []
        for project in self.projects[:3]:
            created = await self.admin.create_api_key(project.project_id, display_name="revoked")
            await self.admin.revoke_api_key(created.api_key.key_id)
            self.revoked.append(icegate.AsyncClient(self.target, created.secret))
        self.month_at_start = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m")

    async def close(self) -> None:
        for client in [self.admin, self.small, *self.revoked,
                       *(p.client for p in self.projects)]:
            await client.close()

    # --- one call ---

    async def call(self, rpc: str, expected: tuple[str, str] | None,
                   make: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
        """Makes one call and records it; (whether it succeeded, its response)."""
        started = time.monotonic()
        result: str = OK
        response = None
        try:
            response = await make()
        except icegate.IcegateError as error:
            result = f"{error.code.name} {error.reason}".strip()
        except Exception as error:  # anything else is a finding, not a crash of the run
            result = f"EXCEPTION {type(error).__name__}"
        ended = time.monotonic()
        self.outcomes.append(Outcome(rpc, started - self.load_started, ended - started, result,
                                     " ".join(expected) if expected else OK))
        return result == OK, response

    def user(self) -> str:
        self.users += 1
        return f"user-{self.users % 5000}"

    # --- the operations of the mix ---

    async def op_turn(self, project: Project) -> None:
        user = self.user()
        await self.call("IssueTurnCredentials", None, lambda: project.client.issue_turn_credentials(
            user, ttl=self.random.choice((None, 600, 3600)), timeout=CALL_TIMEOUT))

    async def op_ice(self, project: Project) -> None:
        user = self.user()
        await self.call("GetIceServers", None, lambda: project.client.get_ice_servers(
            user, timeout=CALL_TIMEOUT))

    async def op_mint(self, project: Project) -> None:
        await self.call("MintEphemeralToken", None, lambda: project.client.mint_ephemeral_token(
            "openai", voice=self.random.choice(("marin", "echo", "coral")),
            timeout=CALL_TIMEOUT))

    async def op_usage(self, project: Project) -> None:
        await self.call("GetUsage", None, lambda: project.client.get_usage(timeout=CALL_TIMEOUT))

    async def op_session(self, project: Project) -> None:
        user = self.user()
        ok, created = await self.call("CreateSession", None, lambda: project.client.create_session(
            "openai", user_id=user, voice="marin", timeout=CALL_TIMEOUT))
        if not ok:
            return
        project.sessions_created += 1
        session_id = created.session_id
        await asyncio.sleep(self.random.uniform(0.5, 4.0))
        await self.call("KeepAliveSession", None, lambda: project.client.keep_alive_session(
            session_id, timeout=CALL_TIMEOUT))
        await asyncio.sleep(self.random.uniform(0.5, 4.0))
        ok, _ = await self.call("EndSession", None, lambda: project.client.end_session(
            session_id, timeout=CALL_TIMEOUT))
        if ok:
            project.sessions_ended += 1

    async def op_admin(self, project: Project) -> None:
        operation = ADMIN_OPS[self.admin_counter % len(ADMIN_OPS)]
        self.admin_counter += 1
        admin = self.admin
        if operation == "rotate_key" and not project.spare_keys:
            operation = "create_key"
        if operation == "create_key":
            ok, created = await self.call("CreateApiKey", None, lambda: admin.create_api_key(
                project.project_id, display_name="spare", timeout=CALL_TIMEOUT))
            if ok:
                project.spare_keys.append((created.api_key.key_id, created.secret))
        elif operation == "rotate_key":
            # A fresh channel with a new key: it works, is revoked, and is refused next call.
            key_id, secret = project.spare_keys.pop(0)
            async with icegate.AsyncClient(self.target, secret) as client:
                await self.call("IssueTurnCredentials", None, lambda: client.issue_turn_credentials(
                    "rotating", timeout=CALL_TIMEOUT))
                await self.call("RevokeApiKey", None, lambda: admin.revoke_api_key(
                    key_id, timeout=CALL_TIMEOUT))
                await self.call("IssueTurnCredentials", REVOKED,
                                lambda: client.issue_turn_credentials("rotating",
                                                                      timeout=CALL_TIMEOUT))
        elif operation == "update_project":
            await self.call("UpdateProject", None, lambda: admin.update_project(
                project.project_id, display_name=f"soak {project.project_id} {self.admin_counter}",
                timeout=CALL_TIMEOUT))
        else:
            await self.call("ListApiKeys", None, lambda: admin.list_api_keys(
                project.project_id, timeout=CALL_TIMEOUT))

    async def op_bad_user(self, project: Project) -> None:
        if self.random.random() < 0.5:
            await self.call("IssueTurnCredentials", INVALID_FIELD,
                            lambda: project.client.issue_turn_credentials(
                                "bad:user", timeout=CALL_TIMEOUT))
        else:
            await self.call("GetIceServers", INVALID_FIELD,
                            lambda: project.client.get_ice_servers("bad:user",
                                                                   timeout=CALL_TIMEOUT))

    async def op_rate_limited(self, project: Project) -> None:
        del project
        if self.random.random() < 0.5:
            await self.call("IssueTurnCredentials", RATE_LIMITED,
                            lambda: self.small.issue_turn_credentials("u", timeout=CALL_TIMEOUT))
        else:
            await self.call("GetIceServers", RATE_LIMITED,
                            lambda: self.small.get_ice_servers("u", timeout=CALL_TIMEOUT))

    async def op_revoked_key(self, project: Project) -> None:
        del project
        client = self.random.choice(self.revoked)
        await self.call("IssueTurnCredentials", REVOKED,
                        lambda: client.issue_turn_credentials("u", timeout=CALL_TIMEOUT))

    # --- the schedule ---

    async def run_load(self) -> None:
        args = self.args
        kinds = list(MIX)
        weights = [MIX[k] for k in kinds]
        rpcs_per_tick = sum(MIX[k] * RPCS_PER_OP.get(k, 1.0) for k in kinds)
        tick_rate = args.rate / rpcs_per_tick
        duration = args.minutes * 60
        operations: dict[str, Callable[[Project], Awaitable[None]]] = {
            kind: getattr(self, f"op_{kind}") for kind in kinds}
        self.load_started = time.monotonic()
        sampler = asyncio.create_task(self.sample_every(args.sample_seconds, duration))
        total_ticks = int(duration * tick_rate)
        for tick in range(total_ticks):
            due = self.load_started + tick / tick_rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.max_lag = max(self.max_lag, -delay)
            if self.server_died:
                break
            if len(self.tasks) >= args.max_in_flight:
                self.shed += 1  # the server is not keeping up: counted, and fails the run
                continue
            kind = self.random.choices(kinds, weights)[0]
            task = asyncio.create_task(operations[kind](self.random.choice(self.projects)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            self.max_in_flight = max(self.max_in_flight, len(self.tasks))
            self.ticks += 1
        if self.server_died:
            sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        # Let the session flows in flight finish (each at most ~8 s of sleeps plus its calls).
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=60)
        for task in list(self.tasks):
            task.cancel()
        if self.server.poll() is None:
            self.resources_after_drain = proc_status(self.server_pid)

    async def sample_every(self, every: float, duration: float) -> None:
        last_index = 0
        tick = 1
        while tick * every <= duration + 1e-9:
            due = self.load_started + tick * every
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            window = self.outcomes[last_index:]
            last_index = len(self.outcomes)
            code = self.server.poll()
            if code is not None:  # no point driving a dead server: stop and say so
                self.server_died = (f"icegate-server exited with code {code} before "
                                    f"t={tick * every:.0f} s (see its log)")
                print(self.server_died, flush=True)
                return
            rss, fds, threads = proc_status(self.server_pid)
            latencies = [o.latency for o in window if o.result == OK]
            by_rpc: dict[str, list[float]] = defaultdict(list)
            for outcome in window:
                if outcome.result == OK:
                    by_rpc[outcome.rpc].append(outcome.latency)
            sample = Sample(
                t=tick * every, rss_kb=rss, fds=fds, threads=threads, rpcs=len(window),
                rate=len(window) / every,
                p50_ms=percentile(latencies, 50) * 1e3, p99_ms=percentile(latencies, 99) * 1e3,
                per_rpc={rpc: (len(v), percentile(v, 50) * 1e3, percentile(v, 99) * 1e3)
                         for rpc, v in sorted(by_rpc.items())},
                asked_for=sum(o.asked_for for o in window),
                unexpected=sum(o.unexpected for o in window),
                in_flight=len(self.tasks), store_rss_kb=vm_rss_kb(self.store_pid),
                loadavg=os.getloadavg()[0])
            self.samples.append(sample)
            slowest = max(sample.per_rpc.items(), key=lambda item: item[1][2], default=None)
            print(f"t={sample.t:5.0f}s rss={rss / 1024:6.1f} MiB fds={fds:3d} "
                  f"threads={threads:2d} rate={sample.rate:6.1f}/s p50={sample.p50_ms:5.1f} ms "
                  f"p99={sample.p99_ms:6.1f} ms slowest={slowest[0] if slowest else '-'} "
                  f"p99={slowest[1][2] if slowest else 0:6.1f} ms asked-for={sample.asked_for} "
                  f"unexpected={sample.unexpected} in-flight={sample.in_flight} "
                  f"load={sample.loadavg:.1f}", flush=True)
            surprises = Counter(f"{o.rpc}: {o.result}" for o in window if o.unexpected)
            for what, count in surprises.most_common(5):
                print(f"         unexpected {count} x {what}", flush=True)
            tick += 1

    # --- the end checks ---

    async def check_sessions(self) -> None:
        month_now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m")
        for project in self.projects:
            usage = await self.admin.get_usage(project.project_id)
            sessions = usage.sessions
            all_ended = project.sessions_created == project.sessions_ended
            if all_ended and sessions.active != 0:
                self.session_problems.append(
                    f"{project.project_id}: every session it created ended, yet GetUsage shows "
                    f"{sessions.active} active leases")
            if not all_ended:
                self.session_problems.append(
                    f"{project.project_id}: created {project.sessions_created} sessions, ended "
                    f"{project.sessions_ended}; GetUsage shows {sessions.active} active")
            if month_now != self.month_at_start:
                continue  # the monthly count started again at the UTC month boundary
            if sessions.used_this_month != project.sessions_created:
                self.session_problems.append(
                    f"{project.project_id}: created {project.sessions_created} sessions, the "
                    f"monthly count says {sessions.used_this_month}")
        created = sum(p.sessions_created for p in self.projects)
        ended = sum(p.sessions_ended for p in self.projects)
        self.session_checks.append(f"sessions created {created}, ended {ended}, over "
                                   f"{len(self.projects)} projects")
        if month_now != self.month_at_start:
            self.session_checks.append("the run crossed a UTC month boundary: monthly counts "
                                       "not compared")


# -- the verdict and the report --------------------------------------------------------

@dataclasses.dataclass
class Check:
    name: str
    detail: str
    passed: bool


def growth_checks(soak: Soak, args: argparse.Namespace) -> list[Check]:
    duration = args.minutes * 60
    first = [s for s in soak.samples if args.warmup < s.t <= args.warmup + 60]
    last = [s for s in soak.samples if duration - 60 < s.t <= duration]
    if duration < args.warmup + 120 or not first or not last:
        return [Check("growth", f"not judged: the run must last at least warm-up "
                      f"({args.warmup:.0f} s) + 2 minutes", True)]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    rss_first = mean([s.rss_kb / 1024 for s in first])
    rss_last = mean([s.rss_kb / 1024 for s in last])
    rss_growth = rss_last - rss_first
    rss_bound = min(args.max_rss_growth_mib, rss_first * args.max_rss_growth_pct / 100)
    fds_growth = max(s.fds for s in last) - max(s.fds for s in first)
    threads_growth = max(s.threads for s in last) - max(s.threads for s in first)
    window = (f"first minute after warm-up (t={args.warmup:.0f}-{args.warmup + 60:.0f} s) vs "
              f"last minute (t={duration - 60:.0f}-{duration:.0f} s)")
    return [
        Check("RSS growth",
              f"mean {rss_first:.1f} MiB -> {rss_last:.1f} MiB: {rss_growth:+.1f} MiB "
              f"({rss_growth / rss_first * 100:+.1f} %), bound {rss_bound:.1f} MiB "
              f"(the smaller of {args.max_rss_growth_mib:.0f} MiB and "
              f"{args.max_rss_growth_pct:.0f} %); {window}",
              rss_growth <= rss_bound),
        Check("fd growth", f"max {max(s.fds for s in first)} -> {max(s.fds for s in last)}: "
              f"{fds_growth:+d}, bound +{args.max_fd_growth}", fds_growth <= args.max_fd_growth),
        Check("thread growth",
              f"max {max(s.threads for s in first)} -> {max(s.threads for s in last)}: "
              f"{threads_growth:+d}, bound +{args.max_thread_growth}",
              threads_growth <= args.max_thread_growth),
    ]


def machine() -> str:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    return (f"{os.cpu_count()} x {cpu}, {memory} RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}, grpcio {grpc.__version__}")


def code_under_test() -> str:
    """Where icegate_server comes from, and the repository's commit (dirty or not)."""
    spec = importlib.util.find_spec("icegate_server")
    origin = Path(spec.origin).parent if spec and spec.origin else "?"
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return f"icegate_server from {origin}; repository at {commit or '?'}"


def build_report(soak: Soak, args: argparse.Namespace, checks: list[Check],
                 store_label: str, server_exit: int | None, log_problems: list[str]) -> str:
    outcomes = soak.outcomes
    duration = args.minutes * 60
    in_window = sum(o.started < duration for o in outcomes)
    loads = [s.loadavg for s in soak.samples] or [0.0]
    lines = [
        f"# icegate soak: {store_label}, {args.minutes:g} min, {args.rate:g} requests/s "
        f"target, {args.projects} projects",
        "",
        f"- when: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- command: `{' '.join(sys.argv)}`",
        f"- code: {code_under_test()}",
        f"- load: {in_window} RPCs started in {duration:.0f} s = "
        f"{in_window / duration:.1f} RPC/s achieved (target {args.rate:g}), "
        f"{len(outcomes) - in_window} more while the session flows drained; "
        f"{soak.ticks} operations scheduled open-loop; largest schedule lag "
        f"{soak.max_lag * 1e3:.1f} ms; most operations in flight {soak.max_in_flight}; "
        f"shed (in flight >= {args.max_in_flight}) {soak.shed}",
        f"- machine load average during the run (1 min, {os.cpu_count()} CPUs): "
        f"{min(loads):.1f} to {max(loads):.1f}, mean {sum(loads) / len(loads):.1f}",
        f"- verdict: **{'PASS' if all(c.passed for c in checks) else 'FAIL'}**",
        "",
        "## Checks",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {c.detail} |" for c in checks]

    lines += ["", "## Server resources (every 10 s)", "",
              "| t (s) | RSS (MiB) | fds | threads | RPC/s | p50 (ms) | p99 (ms) | asked-for "
              "errors | unexpected | in flight | load avg |" +
              (" redis RSS (MiB) |" if soak.store_pid else ""),
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" +
              ("---:|" if soak.store_pid else "")]
    for s in soak.samples:
        store = f" {s.store_rss_kb / 1024:.1f} |" if s.store_rss_kb else (
            " - |" if soak.store_pid else "")
        lines.append(f"| {s.t:.0f} | {s.rss_kb / 1024:.1f} | {s.fds} | {s.threads} | "
                     f"{s.rate:.1f} | {s.p50_ms:.1f} | {s.p99_ms:.1f} | {s.asked_for} | "
                     f"{s.unexpected} | {s.in_flight} | {s.loadavg:.1f} |{store}")
    if soak.resources_after_drain:
        rss, fds, threads = soak.resources_after_drain
        lines.append(f"\nAfter the drain (no load): RSS {rss / 1024:.1f} MiB, {fds} fds, "
                     f"{threads} threads.")

    lines += ["", "## Latency per RPC (successful calls, whole run)", "",
              "| RPC | calls | ok | asked-for errors | unexpected | p50 (ms) | p99 (ms) | "
              "max (ms) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    by_rpc: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_rpc[outcome.rpc].append(outcome)
    for rpc, group in sorted(by_rpc.items(), key=lambda item: -len(item[1])):
        ok = [o.latency for o in group if o.result == OK]
        lines.append(f"| {rpc} | {len(group)} | {len(ok)} | "
                     f"{sum(o.asked_for for o in group)} | {sum(o.unexpected for o in group)} | "
                     f"{percentile(ok, 50) * 1e3:.1f} | {percentile(ok, 99) * 1e3:.1f} | "
                     f"{max(ok, default=0) * 1e3:.1f} |")

    lines += ["", "## Errors by status and reason", "",
              "| kind | RPC | status reason | count |", "|---|---|---|---:|"]
    asked = Counter((o.rpc, o.result) for o in outcomes if o.asked_for)
    unexpected = Counter((o.rpc, f"{o.result} (expected {o.expected})")
                         for o in outcomes if o.unexpected)
    lines += [f"| asked for | {rpc} | {result} | {n} |"
              for (rpc, result), n in sorted(asked.items())]
    lines += [f"| **unexpected** | {rpc} | {result} | {n} |"
              for (rpc, result), n in sorted(unexpected.items())]
    if not unexpected:
        lines.append("| unexpected | - | none | 0 |")

    lines += ["", "## Sessions and shutdown", ""]
    lines += [f"- {line}" for line in soak.session_checks]
    lines += [f"- **{line}**" for line in soak.session_problems[:20]]
    lines.append(f"- icegate-server exit code on SIGTERM after the run: {server_exit}")
    lines.append(f"- server log lines at ERROR or with a traceback: {len(log_problems)}")
    lines += [f"  - `{line[:200]}`" for line in log_problems[:10]]
    return "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load (10)")
    parser.add_argument("--rate", type=float, default=200.0, help="RPCs per second (200)")
    parser.add_argument("--projects", type=int, default=50, help="projects (50)")
    parser.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--report", type=Path, help="write the markdown summary here")
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds before the first minute compared (60)")
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--max-rss-growth-mib", type=float, default=20.0)
    parser.add_argument("--max-rss-growth-pct", type=float, default=15.0)
    parser.add_argument("--max-fd-growth", type=int, default=5)
    parser.add_argument("--max-thread-growth", type=int, default=2)
    parser.add_argument("--max-in-flight", type=int, default=2000,
                        help="operations in flight before the schedule sheds (and fails)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="server data and logs (a fresh temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir after a pass")
    parser.add_argument("--serve-fake-openai", metavar="KEY", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0 or args.projects < 3:
        parser.error("--minutes and --rate must be positive, --projects at least 3")
    return args


def server_log_problems(server: ServerProcess) -> list[str]:
    # Plain lines ("... ERROR logger: ...") and JSON lines ({"level":"ERROR", ...}) alike.
    markers = (" ERROR ", " CRITICAL ", '"level":"ERROR"', '"level":"CRITICAL"', "Traceback")
    return [line for line in server.read_log().splitlines()
            if any(marker in line for marker in markers)]


async def soak_main(args: argparse.Namespace, server: ServerProcess,
                    store_pid: int | None) -> Soak:
    assert server.process is not None
    soak = Soak(args, server.target, server.process, store_pid)
    await soak.setup()
    try:
        await soak.run_load()
        if soak.server_died:
            soak.session_problems.append("not checked: the server is gone")
        else:
            await soak.check_sessions()
    finally:
        await soak.close()
    return soak


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.serve_fake_openai:
        serve_fake_openai(args.serve_fake_openai)
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="icegate-soak-"))
    print(f"soak: {args.minutes:g} min at {args.rate:g} RPC/s on {args.store}, "
          f"{args.projects} projects; workdir {workdir}", flush=True)
    redis: RedisServer | None = None
    fake = FakeOpenAIProcess(OPENAI_KEY)
    server: ServerProcess | None = None
    server_exit: int | None = None
    try:
        if args.store == "redis":
            redis = RedisServer().start()
            store = redis.url
        else:
            store = f"sqlite:///{workdir / 'icegate.sqlite3'}"
        server = ServerProcess(workdir, store=store, openai_base_url=fake.base_url).start()
        soak = asyncio.run(soak_main(args, server, redis.pid if redis else None))
        server_exit = server.stop(signal.SIGTERM)
    finally:
        if server is not None and server_exit is None:
            server.stop(signal.SIGTERM)
        fake.stop()
        if redis is not None:
            redis.stop()

    log_problems = server_log_problems(server)
    unexpected = [o for o in soak.outcomes if o.unexpected]
    checks = [
        Check("server stayed up", soak.server_died or "serving for the whole run",
              not soak.server_died),
        Check("unexpected errors", f"{len(unexpected)} of {len(soak.outcomes)} calls; "
              f"{sum(o.asked_for for o in soak.outcomes)} asked-for errors came as asked",
              not unexpected),
        Check("schedule kept", f"{soak.shed} operations shed (in flight >= {args.max_in_flight})",
              soak.shed == 0),
        *growth_checks(soak, args),
        Check("sessions add up", "; ".join(soak.session_checks + soak.session_problems[:3]),
              not soak.session_problems),
        Check("clean shutdown", f"exit code {server_exit} on SIGTERM; {len(log_problems)} "
              "ERROR/traceback log lines", server_exit == 0 and not log_problems),
    ]
    store_label = "Redis" if args.store == "redis" else "SQLite"
    report = build_report(soak, args, checks, store_label, server_exit, log_problems)
    print("\n" + report)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report)
        samples = [dataclasses.asdict(s) for s in soak.samples]
        args.report.with_suffix(".samples.json").write_text(json.dumps(samples, indent=1))
        print(f"report written to {args.report}")
    passed = all(c.passed for c in checks)
    if passed and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"server data and log kept in {workdir}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
