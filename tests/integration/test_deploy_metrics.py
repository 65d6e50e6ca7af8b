"""What an operator's Prometheus sees of the process: `process_*` and build info, the age of
the signing TURN secret, and failed writes of the secrets into coturn's userdb."""

from __future__ import annotations

import math
import platform
import time
from importlib.metadata import version

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import icegate
from harness.icegate_server import TEST_ADMIN_KEY
from icegate_server.clock import FrozenClock

START = 1_800_000_000.0


def scrape(server) -> dict[str, list[tuple[dict[str, str], float]]]:
    answer = httpx.get(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5)
    assert answer.status_code == 200
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def only(samples, name: str) -> float:
    ((_, value),) = samples[name]
    return value


def test_process_and_build_info(server_factory):
    server = server_factory(FrozenClock(START), metrics_listen="127.0.0.1:0")
    samples = scrape(server)
    assert only(samples, "process_resident_memory_bytes") > 10 * 2**20
    assert only(samples, "process_open_fds") > 0
    assert only(samples, "process_max_fds") >= only(samples, "process_open_fds")
    assert only(samples, "process_cpu_seconds_total") > 0
    assert abs(only(samples, "process_start_time_seconds") - time.time()) < 3600
    ((labels, value),) = samples["icegate_build_info"]
    assert value == 1
    assert labels["version"] == version("icegate")
    assert labels["python"] == platform.python_version()
    assert labels["grpc"] == grpc.__version__


def test_signing_secret_age_follows_rotations(server_factory):
    clock = FrozenClock(START)
    server = server_factory(clock, metrics_listen="127.0.0.1:0",
                            coturn_sqlite=str(server_factory.data_dir / "turndb"))
    # A secret from ICEGATE_TURN_SECRETS: icegate never saw it made.
    assert math.isnan(only(scrape(server), "icegate_turn_signing_secret_age_seconds"))
    with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.rotate_turn_secret()
    clock.advance(3600)
    assert only(scrape(server), "icegate_turn_signing_secret_age_seconds") == 3600


@pytest.mark.redis
def test_failed_coturn_syncs_are_counted_and_stop_once_it_is_back(server_factory,
                                                                  redis_server):
    server = server_factory(FrozenClock(START), metrics_listen="127.0.0.1:0",
                            coturn_redis=redis_server.url)
    assert only(scrape(server), "icegate_coturn_sync_failures_total") == 0
    redis_server.kill()
    with icegate.Client(server.target, TEST_ADMIN_KEY) as admin, \
            pytest.raises(icegate.IcegateError):
        admin.rotate_turn_secret()
    deadline = time.monotonic() + 10
    while only(scrape(server), "icegate_coturn_sync_failures_total") < 2:
        assert time.monotonic() < deadline, "the retries every second were not counted"
        time.sleep(0.2)
    redis_server.start()
    deadline = time.monotonic() + 10
    while True:
        before = only(scrape(server), "icegate_coturn_sync_failures_total")
        time.sleep(2.5)
        if only(scrape(server), "icegate_coturn_sync_failures_total") == before:
            break
        assert time.monotonic() < deadline, "syncs kept failing with coturn's Redis back"
