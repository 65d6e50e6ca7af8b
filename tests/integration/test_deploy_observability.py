"""deploy/observability/: the alert rules and the Grafana dashboard, over what a real icegate
exports.

One real server for the module (Redis store, coturn's stats stream on the same Redis, TLS with a
certificate that expires in a day, metrics on a free port) is scraped three times: at start,
after healthy traffic (calls that succeed, calls refused with INVALID_ARGUMENT,
UNAUTHENTICATED and RATE_LIMITED), and after its Redis was killed under more calls (store
errors, UNAVAILABLE answers, the stats stream down). `promtool test rules` then replays those
scrapes as the input series of two scenarios, healthy and faulty: every series is one the
server exported, with its own labels; counters rise per minute by what they rose between two
scrapes, gauges hold their scraped value (the certificate's expiry as the time it had left,
since promtool's clock starts at 0). The two series whose movement is not real are
QUOTA_EXCEEDED's and icegate_sessions_near_quota_total (exported at 0; making them rise needs
sessions against a provider, which tests/integration/test_observability.py does): the faulty
scenario raises them by one a minute to show the quota alerts fire on them.

promtool is Debian's prometheus package (scripts/install-system-packages).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import icegate
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer
from harness.pki import TestCA
from harness.pytest_plugin import require_binaries
from harness.redis_server import RedisServer
from icegate_server.clock import SystemClock

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "observability"
RULES = DEPLOY / "icegate-alerts.yaml"
DASHBOARD = DEPLOY / "icegate-dashboard.json"
JOB = "icegate"
LIMITED_PROJECT = "limited"

SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                   "info": ("_info",), "gauge": ("",)}

Sample = tuple[str, tuple[tuple[str, str], ...]]
"""A series: its sample name and sorted labels."""


class Scrape:
    """One /metrics answer: each series' value, and each family's type."""

    def __init__(self, text: str) -> None:
        self.taken_at = time.time()
        self.values: dict[Sample, float] = {}
        self.types: dict[str, str] = {}
        self.declared: set[str] = set()
        """Every sample name the families declare, those still without a series (labelled
        by a project or provider none has used yet) included."""
        for family in text_string_to_metric_families(text):
            self.declared.update(f"{family.name}{suffix}"
                                 for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)))
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # prometheus_client's creation times: not what anyone queries
                series = (sample.name, tuple(sorted(sample.labels.items())))
                self.values[series] = sample.value
                self.types[sample.name] = family.type

    def value(self, name: str, **labels: str) -> float:
        return self.values[(name, tuple(sorted(labels.items())))]

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.values}


def scrape(server: RunningServer) -> Scrape:
    answer = httpx.get(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5)
    assert answer.status_code == 200
    return Scrape(answer.text)


def scrape_until(server: RunningServer, name: str, value: float) -> Scrape:
    for _ in range(200):  # bounded: 200 scrapes, 0.1 s apart
        taken = scrape(server)
        if taken.value(name) == value:
            return taken
        time.sleep(0.1)
    raise AssertionError(f"{name} never became {value}")


@pytest.fixture(scope="module")
def scrapes(module_server_factory, tmp_path_factory) -> Iterator[dict[str, Scrape]]:
    require_binaries("redis-server", "promtool")
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    certificate = ca.issue("server", "icegate", ips=("127.0.0.1",), server=True)
    redis = RedisServer().start()
    try:
        server = module_server_factory(
            SystemClock(), store=redis.url, coturn_statsdb=redis.url,
            metrics_listen="127.0.0.1:0", tls_cert=certificate.cert, tls_key=certificate.key)
        tls = icegate.TlsConfig(ca_file=ca.cert)
        taken = {"start": scrape(server)}
        with icegate.Client(server.target, TEST_ADMIN_KEY, tls=tls) as client:
            client.create_project(LIMITED_PROJECT, rate_limit_requests=1)
            for index in range(5):
                client.issue_turn_credentials(f"user{index}")
            for _ in range(2):
                with pytest.raises(icegate.InvalidArgumentError):
                    client.issue_turn_credentials("bad:user")
            for _ in range(3):
                with pytest.raises(icegate.RateLimitedError):
                    for _ in range(2):
                        client.issue_turn_credentials("user", project_id=LIMITED_PROJECT)
        with icegate.Client(server.target, "igk_not_a_key_0123456789", tls=tls) as stranger, \
                pytest.raises(icegate.AuthenticationError):
            stranger.issue_turn_credentials("user")
        taken["healthy"] = scrape_until(server, "icegate_coturn_stats_up", 1)

        redis.kill()
        with icegate.Client(server.target, TEST_ADMIN_KEY, tls=tls) as client:
            for index in range(5):
                with pytest.raises(icegate.UnavailableError):
                    client.issue_turn_credentials(f"user{index}", timeout=5)
        taken["faulty"] = scrape_until(server, "icegate_coturn_stats_up", 0)
        yield taken
    finally:
        redis.stop()


# --- building promtool's input from the scrapes ------------------------------------------------

COUNTER_TYPES = {"counter", "histogram", "summary"}
STEPS = 30
"""Minutes each scenario lasts (promtool's interval is 1 m)."""


def series_text(series: Sample) -> str:
    name, labels = series
    shown = ",".join(f'{key}={json.dumps(value)}' for key, value in (*labels, ("job", JOB)))
    return f"{name}{{{shown}}}"


def values_text(before: float, after: float, *, counter: bool) -> str:
    if after != after:  # NaN: a gauge with no value (no TLS, no rotated secret)
        return " ".join(["NaN"] * (STEPS + 1))
    if counter:
        return f"{before:g}+{after - before:g}x{STEPS}"
    return f"{after:g}+0x{STEPS}"


def input_series(before: Scrape, after: Scrape, *,
                 rising: dict[Sample, float] | None = None) -> list[dict[str, str]]:
    rows = []
    for series, value in sorted(after.values.items()):
        name = series[0]
        if name == "icegate_tls_certificate_expiry_timestamp_seconds" and value == value:
            value -= after.taken_at  # the time it had left when scraped; promtool starts at 0
        if rising and series in rising:
            text = f"{value:g}+{rising[series]:g}x{STEPS}"
        else:
            text = values_text(before.values.get(series, 0.0), value,
                               counter=after.types[name] in COUNTER_TYPES)
        rows.append({"series": series_text(series), "values": text})
    return rows


def alert(severity: str, **labels: str) -> dict[str, str]:
    return {"severity": severity, "job": JOB, **labels}


def annotations(name: str, labels: dict[str, str]) -> dict[str, str]:
    """The rule's annotations with its `{{ $labels.x }}` filled in (they name nothing else)."""
    rule = next(rule for group in yaml.safe_load(RULES.read_text())["groups"]
                for rule in group["rules"] if rule.get("alert") == name)
    return {key: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda match: labels[match[1]], text)
            for key, text in rule["annotations"].items()}


def alert_tests(expected: dict[str, list[dict[str, str]]]) -> list[dict[str, object]]:
    return [{"eval_time": "20m", "alertname": name,
             "exp_alerts": [{"exp_labels": labels,
                             "exp_annotations": annotations(name, labels)}
                            for labels in alerts]}
            for name, alerts in expected.items()]


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def rule_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


CERTIFICATE_ALERTS = {
    "IcegateTlsCertificateExpiresSoon": [alert("warning")],
    "IcegateTlsCertificateExpiresVerySoon": [alert("critical")],
}


def test_promtool_accepts_the_rules():
    require_binaries("promtool")
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_fire_on_a_faulty_icegate_and_stay_quiet_on_a_healthy_one(scrapes,
                                                                           tmp_path):
    start, healthy, faulty = scrapes["start"], scrapes["healthy"], scrapes["faulty"]
    quota = ("icegate_limit_refusals_total", (("reason", "QUOTA_EXCEEDED"),))
    near_quota = ("icegate_sessions_near_quota_total", ())
    assert quota in faulty.values  # exported by the real server, at 0
    assert near_quota in faulty.values  # likewise
    quiet = {"IcegateHighErrorRate": [], "IcegateStoreUnavailable": [],
             "IcegateProjectNearSessionQuota": [],
             "IcegateProjectQuotaExhausted": [], "IcegateCoturnStatsStreamStopped": []}
    firing = {"IcegateHighErrorRate": [alert("critical")],
              "IcegateStoreUnavailable": [alert("critical")],
              "IcegateProjectNearSessionQuota": [alert("warning")],
              "IcegateProjectQuotaExhausted": [alert("warning", reason="QUOTA_EXCEEDED")],
              "IcegateCoturnStatsStreamStopped": [alert("critical")]}
    assert set(quiet) | set(CERTIFICATE_ALERTS) == set(rule_names())
    tests = [
        {"name": "healthy", "interval": "1m",
         "input_series": input_series(start, healthy),
         "alert_rule_test": alert_tests({**quiet, **CERTIFICATE_ALERTS})},
        {"name": "faulty", "interval": "1m",
         "input_series": input_series(healthy, faulty, rising={quota: 1, near_quota: 1}),
         "alert_rule_test": alert_tests({**firing, **CERTIFICATE_ALERTS})},
    ]
    test_file = tmp_path / "icegate-alerts.test.yaml"
    test_file.write_text(yaml.safe_dump({"rule_files": [str(RULES)],
                                         "evaluation_interval": "1m", "tests": tests}))
    result = run_promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_what_the_scrapes_show_a_user(scrapes):
    """The scenarios rest on these: the healthy phase had no server-side error, the faulty one
    only UNAVAILABLE answers and store errors, and the certificate had a day left."""
    healthy, faulty = scrapes["healthy"], scrapes["faulty"]
    method = "/icegate.v1.CredentialService/IssueTurnCredentials"
    assert healthy.value("icegate_rpcs_total", method=method, code="OK") >= 5
    assert healthy.value("icegate_rpcs_total", method=method, code="INVALID_ARGUMENT") == 2
    assert healthy.value("icegate_limit_refusals_total", reason="RATE_LIMITED") == 3
    assert ("icegate_rpcs_total", (("code", "UNAVAILABLE"), ("method", method))) \
        not in healthy.values
    # Each of the 5 calls, and the client's retries of UNAVAILABLE.
    assert faulty.value("icegate_rpcs_total", method=method, code="UNAVAILABLE") >= 5
    assert faulty.value("icegate_rpcs_total", method=method, code="OK") \
        == healthy.value("icegate_rpcs_total", method=method, code="OK")
    assert sum(value for (name, _), value in faulty.values.items()
               if name == "icegate_store_errors_total") > 0
    left = faulty.value("icegate_tls_certificate_expiry_timestamp_seconds") - faulty.taken_at
    assert 0 < left <= 86400


# --- the dashboard -----------------------------------------------------------------------------

METRIC_NAME = re.compile(r"\b((?:icegate|process|python)_[a-z0-9_]+)\b")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"]
            for target in panel.get("targets", [])]


def test_every_dashboard_panel_queries_something_and_is_valid_promql(tmp_path):
    require_binaries("promtool")
    dashboard = json.loads(DASHBOARD.read_text())
    graphs = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert graphs and all(panel.get("targets") for panel in graphs)
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    # promtool checks PromQL in rule files: each query as a recording rule, with Grafana's
    # variables as Grafana would fill them in.
    rules = [{"record": f"dashboard:query_{index}",
              "expr": query.replace("$__rate_interval", "5m").replace("$job", ".*")}
             for index, query in enumerate(dashboard_queries())]
    checked = tmp_path / "dashboard-queries.yaml"
    checked.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(checked))
    assert result.returncode == 0, result.stdout + result.stderr


def rule_queries() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


def test_every_metric_the_dashboard_and_the_rules_name_is_exported(scrapes):
    exported = scrapes["faulty"].declared | scrapes["healthy"].names
    dashboard = json.loads(DASHBOARD.read_text())
    variables = [variable["definition"] for variable in dashboard["templating"]["list"]
                 if "definition" in variable]
    named = {name for query in (*rule_queries(), *dashboard_queries(), *variables)
             for name in METRIC_NAME.findall(query)}
    assert {"icegate_rpcs_total", "icegate_rpc_duration_seconds_bucket",
            "icegate_limit_refusals_total", "icegate_active_leases",
            "icegate_turn_credentials_issued_total",
            "icegate_coturn_stats_up"} <= named
    missing = sorted(named - exported)
    assert not missing, f"named but not exported by icegate: {missing}"


def test_without_tls_the_certificate_alerts_have_nothing_to_fire_on():
    """No ICEGATE_TLS_CERT: the expiry series is NaN, which no comparison in the rules matches."""
    from icegate_server.observability.metrics import IcegateMetrics

    value = IcegateMetrics().registry.get_sample_value(
        "icegate_tls_certificate_expiry_timestamp_seconds")
    assert value is not None and value != value
