"""Fixtures for every test live in the harness (tests/harness/pytest_plugin.py)."""

pytest_plugins = ["harness.pytest_plugin"]
