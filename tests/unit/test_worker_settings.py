"""Each worker of `icegate-server --workers N` gets its own metrics port."""

from icegate_server.settings import Settings
from icegate_server.workers import worker_settings


def test_workers_serve_metrics_on_consecutive_ports():
    settings = Settings(metrics_listen="127.0.0.1:9464", workers=3)
    ports = [worker_settings(settings, index).metrics_listen for index in (1, 2, 3)]
    assert ports == ["127.0.0.1:9464", "127.0.0.1:9465", "127.0.0.1:9466"]


def test_no_metrics_stays_off():
    assert worker_settings(Settings(workers=2), 2).metrics_listen == ""
