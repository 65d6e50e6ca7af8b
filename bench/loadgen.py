"""h2load as the load generator: unary gRPC calls (or HTTP/1.1 JSON posts), parsed results.

A gRPC call over HTTP/2 is a POST of a length-prefixed message with `content-type:
application/grpc` and `te: trailers`. h2load sees every gRPC answer as HTTP 200, errors
included: an error is a trailers-only answer (no DATA frame), so the benchmark counts the
calls that failed from the DATA bytes received, against the size of one successful answer
(fixed for the credential calls), and from server-side counters where sizes vary.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

H2LOAD = shutil.which("h2load") or "/usr/bin/h2load"


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC message on the wire: flag 0, 4-byte big-endian length, bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass(frozen=True)
class Endpoint:
    """What h2load posts, where, and how."""

    url: str
    body: Path
    headers: tuple[str, ...] = ()
    http1: bool = False


def grpc_endpoint(port: int, method: str, body: Path, api_key: str) -> Endpoint:
    return Endpoint(
        url=f"http://127.0.0.1:{port}{method}", body=body,
        headers=("content-type: application/grpc", "te: trailers",
                 f"authorization: Bearer {api_key}"),
    )


def connect_endpoint(port: int, method: str, body: Path, api_key: str) -> Endpoint:
    """A Connect unary call: a POST of the bare message, binary protobuf, over HTTP/1.1."""
    return Endpoint(
        url=f"http://127.0.0.1:{port}{method}", body=body,
        headers=("content-type: application/proto", f"authorization: Bearer {api_key}"),
        http1=True,
    )


def json_endpoint(port: int, path: str, body: Path, api_key: str) -> Endpoint:
    return Endpoint(
        url=f"http://127.0.0.1:{port}{path}", body=body,
        headers=("content-type: application/json", f"authorization: Bearer {api_key}"),
        http1=True,
    )


@dataclass
class LoadResult:
    """One h2load run."""

    seconds: float = 0.0
    requests_per_second: float = 0.0
    done: int = 0
    succeeded: int = 0
    failed: int = 0
    errored: int = 0
    timeout: int = 0
    status_2xx: int = 0
    data_bytes: int = 0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    raw_output: str = field(default="", repr=False)

    def percentile(self, q: float) -> float | None:
        """The q-quantile (0..1) of the per-request latencies from the log file, ms."""
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        index = min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))
        return ordered[index]

    @property
    def mean_ms(self) -> float | None:
        return statistics.fmean(self.latencies_ms) if self.latencies_ms else None


_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored, (\d+) timeout")
_STATUS = re.compile(r"status codes: (\d+) 2xx")
_DATA = re.compile(r"\((\d+)\) data")


def parse_output(text: str) -> LoadResult:
    result = LoadResult(raw_output=text)
    if m := _FINISHED.search(text):
        value = float(m.group(1))
        result.seconds = value / 1000 if m.group(2) == "ms" else value
        result.requests_per_second = float(m.group(3))
    if m := _REQUESTS.search(text):
        (_, _, result.done, result.succeeded, result.failed, result.errored,
         result.timeout) = (int(g) for g in m.groups())
    if m := _STATUS.search(text):
        result.status_2xx = int(m.group(1))
    if m := _DATA.search(text):
        result.data_bytes = int(m.group(1))
    return result


def read_log(path: Path) -> list[float]:
    """Latencies (ms) of the completed requests in an h2load `--log-file`."""
    latencies = []
    with path.open() as log:
        for line in log:
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1] != "-1":
                latencies.append(int(parts[2]) / 1000)
    return latencies


def run_h2load(endpoint: Endpoint, *, clients: int, streams: int, duration: float | None = None,
               requests: int | None = None, rps_per_client: int | None = None,
               warm_up: float = 0.0, log_file: Path | None = None,
               extra: Sequence[str] = ()) -> LoadResult:
    """Runs h2load once (bounded by `duration` seconds or `requests` calls) and parses it."""
    argv = [H2LOAD, "-t", "1", "-c", str(clients), "-m", str(streams), "-d", str(endpoint.body)]
    for header in endpoint.headers:
        argv += ["-H", header]
    if endpoint.http1:
        argv.append("--h1")
    if duration is not None:
        argv += ["-D", f"{duration:g}"]
        if warm_up:
            argv += ["--warm-up-time", f"{warm_up:g}"]
        limit = duration + warm_up + 60
    else:
        assert requests is not None
        argv += ["-n", str(requests)]
        limit = 120
    if rps_per_client is not None:
        argv += ["--rps", str(rps_per_client)]
    if log_file is not None:
        argv += ["--log-file", str(log_file)]
    argv += [*extra, endpoint.url]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"h2load failed ({completed.returncode}): {completed.stderr.strip()}\n"
                           f"{completed.stdout[-2000:]}")
    result = parse_output(completed.stdout)
    if log_file is not None and log_file.exists():
        result.latencies_ms = read_log(log_file)
    return result


def run_fixed_rate(endpoint: Endpoint, *, rate: int, clients: int, seconds: float,
                   log_file: Path) -> LoadResult:
    """`rate` calls a second for `seconds`, as `clients` clients at rate/clients each, whose
    starts are spread over one client period, so calls arrive evenly spaced.

    h2load starts every `--rps` client's timer at the same instant, so by default all of them
    send together: at 1,000 req/s from 20 clients, a burst of 20 calls every 20 ms, whose
    latency is the queue the burst makes (p50 3-4 ms even on the bare server, from a call
    that costs it under 0.2 ms). Connecting one client every 1/rate seconds (`-r 1
    --rate-period`) offsets their timers instead. h2load takes `-r` only with a request
    count, not with `-D`.
    """
    period_ms = max(1, round(1000 / rate))
    return run_h2load(endpoint, clients=clients, streams=4, requests=round(rate * seconds),
                      rps_per_client=max(1, rate // clients), log_file=log_file,
                      extra=("-r", "1", "--rate-period", f"{period_ms}ms"))
