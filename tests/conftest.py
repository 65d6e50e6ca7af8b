"""Fixtures for every test live in the harness (tests/harness/pytest_plugin.py; the metered
coturn's in tests/harness/coturn_observed.py)."""

pytest_plugins = ["harness.pytest_plugin", "harness.coturn_observed"]
