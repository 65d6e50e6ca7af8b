"""TURN metering: how many coturn stats events per second icegate keeps up with, and how long
traffic takes to show in GetUsage.

    .venv/bin/python bench/turn_metering.py                 # SQLite and Redis stores
    .venv/bin/python bench/turn_metering.py --store redis --events 40000

An `icegate-server` process (as deployed: its own process, `ICEGATE_COTURN_STATSDB` set) meters
a throw-away stats Redis; this script plays coturn: it PUBLISHes messages exactly as coturn
4.6.1 writes them (allocations of one project, each `status new`, `traffic/peer` reports,
`status deleted` and the totals), from its own process, and reads GetUsage through the client.

- Throughput: `--events` messages published as fast as one Redis pipeline sends them; the
  figure is events / (time from the first publish until GetUsage shows every byte). icegate
  keeps up when that is close to the publish rate; coturn itself publishes a traffic report
  per 4096 packets of a session, so 10 000 events/s is roughly 40 M packets/s of relaying.
- Delay: one `traffic/peer` report at a time, then GetUsage polled every millisecond until it
  shows the bytes: publish to usage, median and 95th percentile over `--samples`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis
import scenario
import targets
from processes import ManagedProcess, free_port

import icegate

PROJECT = "metered"
REALM = "icegate.bench"


def channel(allocation: int, user: str, topic: str) -> str:
    username = f"1999999999:{PROJECT}/{user}"
    return f"turn/realm/{REALM}/user/{username}/allocation/{allocation:018d}/{topic}"


def allocation_messages(allocation: int, reports: int, report_bytes: int
                        ) -> list[tuple[str, str]]:
    """What coturn publishes over one allocation's life: new, reports, deleted, totals."""
    user = f"user-{allocation % 97}"
    half = report_bytes // 2
    messages = [(channel(allocation, user, "status"),
                 "new lifetime=600, type=UDP, local=127.0.0.1:3478, remote=127.0.0.1:40000, "
                 "ssl=NONE, cipher=NONE")]
    for _ in range(reports):
        messages.append((channel(allocation, user, "traffic"),
                         f"rcvp=2048, rcvb={half}, sentp=2048, sentb={half}"))
        messages.append((channel(allocation, user, "traffic/peer"),
                         f"rcvp=2048, rcvb={half}, sentp=2048, sentb={half}"))
    total = reports * half * 2
    messages += [(channel(allocation, user, "status"), "deleted"),
                 (channel(allocation, user, "total_traffic"),
                  f"rcvp=1, rcvb={total // 2}, sentp=1, sentb={total // 2}"),
                 (channel(allocation, user, "total_traffic/peer"),
                  f"rcvp=1, rcvb={total // 2}, sentp=1, sentb={total // 2}")]
    return messages


def relayed(client: icegate.Client) -> int:
    return int(client.get_usage(PROJECT).turn.relayed_bytes_this_month)


def wait_metering(client: icegate.Client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    from icegate.v1 import usage_pb2

    while client.get_usage(PROJECT).turn.metering != usage_pb2.TURN_METERING_LIVE:
        if time.monotonic() > deadline:
            raise RuntimeError("icegate did not start metering")
        time.sleep(0.05)


def throughput(stats: redis.Redis, client: icegate.Client, events: int) -> tuple[float, float]:
    """(events per second icegate counted, events per second published)."""
    reports, report_bytes = 8, 1000
    per_allocation = len(allocation_messages(0, reports, report_bytes))
    allocations = max(events // per_allocation, 1)
    messages = [m for a in range(allocations) for m in allocation_messages(a, reports,
                                                                           report_bytes)]
    expected = relayed(client) + allocations * reports * report_bytes
    started = time.perf_counter()
    pipe = stats.pipeline(transaction=False)
    for index, (name, text) in enumerate(messages, 1):
        pipe.publish(name, text)
        if index % 1000 == 0:
            pipe.execute()
    pipe.execute()
    published = time.perf_counter() - started
    while relayed(client) < expected:
        time.sleep(0.005)
        if time.perf_counter() - started > 600:
            raise RuntimeError("icegate did not count every event within 10 minutes")
    counted = time.perf_counter() - started
    if relayed(client) != expected:
        raise RuntimeError(f"counted {relayed(client)} bytes, expected {expected}")
    return len(messages) / counted, len(messages) / published


def delays(stats: redis.Redis, client: icegate.Client, samples: int) -> list[float]:
    """Seconds from one published traffic report to GetUsage showing it."""
    seen = []
    for sample in range(samples):
        before = relayed(client)
        allocation = 10_000_000 + sample
        stats.publish(channel(allocation, "delay", "traffic/peer"),
                      "rcvp=1, rcvb=500, sentp=1, sentb=500")
        started = time.perf_counter()
        while relayed(client) < before + 1000:
            time.sleep(0.001)
        seen.append(time.perf_counter() - started)
        stats.publish(channel(allocation, "delay", "status"), "deleted")
    return seen


def run(store: str, work: Path, events: int, samples: int) -> None:
    stats_redis = targets.start_redis(work)
    store_redis: ManagedProcess | None = None
    server: ManagedProcess | None = None
    try:
        store_url = None
        if store == "redis":
            store_redis = targets.start_redis(work)
            store_url = f"redis://127.0.0.1:{store_redis.port}/0"
        port = free_port()
        data_dir = work / f"icegate-{store}"
        data_dir.mkdir(parents=True, exist_ok=True)
        env = targets.icegate_env(port, data_dir, store_url)
        env["ICEGATE_COTURN_STATSDB"] = f"redis://127.0.0.1:{stats_redis.port}/0"
        env["ICEGATE_LOG_LEVEL"] = "WARNING"
        server = ManagedProcess(f"icegate-{store}", [targets.ICEGATE_SERVER], port=port,
                                log_dir=work, cwd=data_dir, env=env).start()
        stats = redis.Redis(port=stats_redis.port)
        with icegate.Client(f"127.0.0.1:{port}", scenario.ADMIN_KEY) as client:
            client.create_project(PROJECT)
            wait_metering(client)
            counted, published = throughput(stats, client, events)
            seen = sorted(delays(stats, client, samples))
        p95 = seen[min(len(seen) - 1, int(len(seen) * 0.95))]
        print(f"{store:6} throughput: {counted:8.0f} events/s counted "
              f"(published at {published:8.0f}/s, {events} events)")
        print(f"{store:6} delay traffic -> GetUsage: median {statistics.median(seen) * 1000:6.1f}"
              f" ms, p95 {p95 * 1000:6.1f} ms, max {seen[-1] * 1000:6.1f} ms "
              f"({samples} samples)")
    finally:
        for process in (server, store_redis, stats_redis):
            if process is not None:
                process.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("sqlite", "redis", "both"), default="both")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args(argv)
    if targets.redis_server_binary() is None:
        print("redis-server is needed (scripts/install-system-packages)", file=sys.stderr)
        return 1
    stores = ("sqlite", "redis") if args.store == "both" else (args.store,)
    with tempfile.TemporaryDirectory(prefix="icegate-metering-") as work:
        for store in stores:
            run(store, Path(work), args.events, args.samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
