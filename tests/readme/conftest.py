from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.readme_server import DevServer, dev_server


@pytest.fixture(scope="module", name="dev_server")
def module_dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """`make run`'s server, one per test module (each document starts from a fresh one)."""
    with dev_server(tmp_path_factory.mktemp("readme")) as server:
        yield server
