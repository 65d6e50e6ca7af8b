"""`make profile`: a py-spy flamegraph of icegate under h2load load.

    .venv/bin/python bench/profile.py [--method issue|ice|session] [--store sqlite|redis]
                                      [--transport grpc|connect] [--seconds 10]

Starts icegate (on SQLite, or on a redis-server of its own) on a free loopback port with the
benchmark project, loads it with the same h2load closed loop as `make bench` (-c 32 -m 8),
records py-spy for `--seconds` (native frames included, idle threads left out) and writes
bench/results/raw/profile-<method>-<store>-<time>.svg, plus the collapsed stacks (.txt) and
a short "where the time goes" table of the hottest functions by own samples. Needs ptrace
rights on the server (root, or CAP_SYS_PTRACE).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import scenario
import targets
from loadgen import connect_endpoint, grpc_endpoint, run_h2load

RAW = Path(__file__).resolve().parent / "results" / "raw"
METHODS = {"issue": scenario.ISSUE, "ice": scenario.ICE, "session": scenario.CREATE_SESSION}


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install -e '.[bench]'")
    return found


def record(pid: int, seconds: int, output: Path, fmt: str, *, native: bool = False) -> None:
    subprocess.run([py_spy(), "record", "--pid", str(pid), "--duration", str(seconds),
                    "--rate", "200", "--format", fmt, "--output", str(output),
                    # py-spy must pause the process to unwind native frames.
                    *(["--native"] if native else ["--nonblocking"])],
                   check=True, timeout=seconds + 60, stdout=subprocess.DEVNULL)


def hottest(collapsed: Path, top: int = 25) -> str:
    """Own-time (leaf frame) and inclusive shares of the hottest functions."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        if frames[0].startswith("<module>"):
            threads["event loop (main thread; own time in Runner.run = uvloop and grpc "
                    "Cython/C)"] += count
        elif any("concurrent/futures/thread.py" in f for f in frames):
            threads["store executor thread (SQLite)"] += count
        else:
            threads["other threads"] += count
    lines = [f"{total} samples (non-idle, Python frames)", ""]
    lines += [f"{100 * count / total:5.1f}%  {name}" for name, count in threads.most_common()]
    lines += ["", "own %  incl %  function (file:line)"]
    for frame, count in own.most_common(top):
        lines.append(f"{100 * count / total:5.1f}  {100 * inclusive[frame] / total:6.1f}  "
                     f"{frame}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(METHODS), default="issue")
    parser.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--transport", choices=("grpc", "connect"), default="grpc",
                        help="load over gRPC, or over Connect (binary protobuf, HTTP/1.1)")
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = RAW / f"profile-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    bodies = scenario.write_bodies(work / "bodies")
    fake = redis = None
    if args.method == "session":
        fake = targets.start_fake_openai(work, 20.0)
    if args.store == "redis":
        redis = targets.start_redis(work)
    try:
        base_url = f"http://127.0.0.1:{fake.port}" if fake else None
        store_url = f"redis://127.0.0.1:{redis.port}/0" if redis else None
        with targets.start_icegate("icegate-profile", work, store_url=store_url,
                                   openai_base_url=base_url) as server:
            project = targets.prepare_project(server.port, with_openai_key=fake is not None)
            targets.check_call(server.port, project.api_key, METHODS[args.method])
            body = {"issue": "issue", "ice": "ice", "session": "session"}[args.method]
            if args.transport == "connect":
                endpoint = connect_endpoint(server.http_port, METHODS[args.method],
                                            bodies[f"{body}-proto"], project.api_key)
            else:
                endpoint = grpc_endpoint(server.port, METHODS[args.method], bodies[body],
                                         project.api_key)
            load = threading.Thread(target=run_h2load, args=(endpoint,), kwargs={
                "clients": 32, "streams": 8, "duration": args.seconds + 4}, daemon=True)
            load.start()
            time.sleep(2)  # let the load reach its steady state first
            name = f"profile-{args.method}-{args.store}-{args.transport}-{stamp}"
            svg, collapsed = RAW / f"{name}.svg", RAW / f"{name}.txt"
            record(server.pid, args.seconds, svg, "flamegraph")
            load.join(timeout=60)
            # A second, short recording in collapsed form for the table below.
            load = threading.Thread(target=run_h2load, args=(endpoint,), kwargs={
                "clients": 32, "streams": 8, "duration": min(args.seconds, 5) + 3}, daemon=True)
            load.start()
            time.sleep(1)
            record(server.pid, min(args.seconds, 5), collapsed, "raw")
            load.join(timeout=60)
    finally:
        for helper in (fake, redis):
            if helper is not None:
                helper.stop()
    table = hottest(collapsed)
    (RAW / f"{name}-top.txt").write_text(table + "\n")
    print(table)
    print(f"\nflamegraph: {svg}\ncollapsed stacks: {collapsed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
